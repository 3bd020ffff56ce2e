"""Evaluate-stage benchmark at full resolution on real MVTec masks (bottle: 83 x 900x900).

1. all metrics on synthetic maps (blurred noisy masks; ``--copies N`` repeats the images to
   check scaling towards the largest categories);
2. the real evaluate path on an existing score run (masks + upsampled, smoothed maps + metrics),
   when ``scores/<backbone>/<method>/<category>`` exists;
3. with ``--bootstrap B``: the point metrics vs B-replicate confidence intervals on that run.
"""

import argparse
import logging
from pathlib import Path

import pandas as pd

from patchbank.bench.stages import bench_bootstrap, bench_evaluate, bench_metrics
from patchbank.core.errors import ScoresError

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data-root", type=Path, default=Path("../shared/data/mvtec_ad"))
p.add_argument("--category", default="bottle")
p.add_argument("--copies", type=int, default=1)
p.add_argument("--scores-dir", type=Path, default=Path("scores"))
p.add_argument("--backbone", default="efficientnet_lite0")
p.add_argument("--method", default="patchcore,padim")
p.add_argument("--bootstrap", type=int, default=0,
               help="also time B-replicate confidence intervals on the real runs (0: skip)")
args = p.parse_args()
logging.basicConfig(level=logging.WARNING)
row = bench_metrics(args.data_root / args.category, args.copies)
print(pd.DataFrame([row]).to_string(index=False, float_format="%.3f"))
rows = []
for method in args.method.split(","):
    try:
        rows.append(bench_evaluate(args.scores_dir, args.backbone, method, args.category,
                                   args.data_root))
    except ScoresError as err:
        print(f"skipped {method}: {err}")
if rows:
    print("\n" + pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))
if args.bootstrap:
    for method in args.method.split(","):
        try:
            boot = bench_bootstrap(args.scores_dir, args.backbone, method, args.category,
                                   args.data_root, args.bootstrap)
        except ScoresError as err:
            print(f"skipped {method}: {err}")
            continue
        print("\n" + "\n".join(f"{k:>18} {v:.4f}" if isinstance(v, float) else f"{k:>18} {v}"
                               for k, v in boot.items()))
