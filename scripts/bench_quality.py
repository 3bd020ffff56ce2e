"""Quality benchmark: method x setting over several datasets (see patchbank.bench_quality).

Writes a CSV (one row per run) and prints a Markdown summary; runs are cached under
--banks-dir/--scores-dir, so an interrupted or extended benchmark resumes.
"""

import argparse
import logging
from pathlib import Path

from patchbank.bench.quality import VARIANTS, run_quality, summary
from patchbank.data.demo import ensure_demo_dataset
from patchbank.data.mvtec import list_categories

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--datasets", default="bottle,magnetic_tile,demo",
               help="comma list of bottle, magnetic_tile, demo (every demo category)")
p.add_argument("--backbones", default="efficientnet_lite0")
p.add_argument("--sizes", default="224,256")
p.add_argument("--norms", default="half,imagenet")
p.add_argument("--variants", default="all", help="'all' or comma list of labels' first words")
p.add_argument("--large-coreset", type=float, default=0.01,
               help="PatchCore coreset fraction on magnetic_tile (597k patches), to bound time")
p.add_argument("--out", type=Path, default=Path("bench/quality.csv"))
p.add_argument("--banks-dir", type=Path, default=Path("bench/featurebanks"))
p.add_argument("--scores-dir", type=Path, default=Path("bench/scores"))
args = p.parse_args()
logging.basicConfig(level=logging.WARNING)

datasets = []
for name in args.datasets.split(","):
    if name == "bottle":
        datasets.append(("bottle", SHARED / "mvtec_ad", "bottle"))
    elif name == "magnetic_tile":
        datasets.append(("magnetic_tile", SHARED / "magnetic_tile", "magnetic_tile"))
    elif name == "demo":
        root = ensure_demo_dataset()
        datasets += [(c, root, c) for c in list_categories(root)]
    else:
        p.error(f"unknown dataset {name!r}")
variants = [v for v in VARIANTS if args.variants == "all"
            or v.label.split()[0] in args.variants.split(",") or v.label in args.variants]
table = run_quality(datasets, args.backbones.split(","), [int(s) for s in args.sizes.split(",")],
                    args.norms.split(","), variants, args.banks_dir, args.scores_dir,
                    extra={"magnetic_tile": {"coreset": str(args.large_coreset)}})
args.out.parent.mkdir(parents=True, exist_ok=True)
table.to_csv(args.out, index=False, float_format="%.5g")
print(summary(table))
