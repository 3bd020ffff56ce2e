"""Extract-stage throughput per backbone, cold and warm image cache, vs the bare forward."""

import argparse
import logging
from pathlib import Path

import pandas as pd

from patchbank.bench.stages import bench_extract
from patchbank.features.registry import REGISTRY

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--data-root", type=Path, default=Path("../shared/data/mvtec_ad"))
p.add_argument("--category", default="bottle")
p.add_argument("--backbone", default=",".join(REGISTRY), help="comma list")
p.add_argument("--n-images", type=int, default=64)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (best of)")
args = p.parse_args()
logging.basicConfig(level=logging.WARNING)
rows = []
for name in args.backbone.split(","):
    weights = "hub" if name.startswith("efficientnet_lite") else "random"
    rows.append(bench_extract(args.data_root, args.category, name, args.n_images,
                              args.batch_size, weights, args.repeats))
    print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format="%.2f"), flush=True)
print("\nsummary:\n" + pd.DataFrame(rows).to_string(index=False, float_format="%.2f"))
