"""Settings benchmark (issue 21): defaults chosen on the real datasets with intervals and
paired tests (see patchbank.bench.settings). Writes settings.csv (one row per run),
settings_pairs.csv (the compare stage's rows, reference vs each alternative) and
settings.md (tables and the decision per method) to --out; runs are cached."""

import argparse
import logging
from pathlib import Path

from patchbank.bench.settings import decide, markdown, paired, run_settings
from patchbank.data.demo import ensure_demo_dataset
from patchbank.data.mvtec import list_categories

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = {"bottle": (SHARED / "mvtec_ad", "bottle"),
        "magnetic_tile": (SHARED / "magnetic_tile", "magnetic_tile")}

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--datasets", default="bottle,magnetic_tile,demo",
               help="comma list of bottle, magnetic_tile, demo (reported, never votes)")
p.add_argument("--backbone", default="efficientnet_lite0")
p.add_argument("--weights", default="hub")
p.add_argument("--bootstrap", type=int, default=1000)
p.add_argument("--large-partitions", default="8",
               help="PatchCore partitions on magnetic_tile (597k patches), to bound time")
p.add_argument("--out", type=Path, default=Path("bench/settings"))
p.add_argument("--banks-dir", type=Path, default=Path("bench/featurebanks"))
p.add_argument("--scores-dir", type=Path, default=Path("bench/scores"))
args = p.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

datasets = []
for name in args.datasets.split(","):
    if name in REAL:
        datasets.append((name, *REAL[name]))
    elif name == "demo":
        root = ensure_demo_dataset()
        datasets += [(c, root, c) for c in list_categories(root)]
    else:
        p.error(f"unknown dataset {name!r}")
table = run_settings(datasets, args.backbone, args.banks_dir, args.scores_dir,
                     weights=args.weights, n_boot=args.bootstrap,
                     extra={"magnetic_tile": {"partitions": args.large_partitions}})
args.out.mkdir(parents=True, exist_ok=True)
table.to_csv(args.out / "settings.csv", index=False, float_format="%.5g")
real = [d for d in REAL if d in set(table["dataset"])]
pairs = paired(table, args.scores_dir, args.backbone, real, args.bootstrap, args.out / "compare")
pairs.to_csv(args.out / "settings_pairs.csv", index=False, float_format="%.5g")
text = markdown(table, pairs, decide(pairs), real)
(args.out / "settings.md").write_text(text)
print(text)
