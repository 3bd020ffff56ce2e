"""Score-stage benchmark: fit/score seconds per method, PaDiM fit memory at 1x and 2x train."""

import argparse
import logging
from pathlib import Path

import pandas as pd

from patchbank.bench.stages import bench_score, fit_peak_memory
from patchbank.scorers import SCORERS

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--banks-dir", type=Path, default=Path("featurebanks"))
p.add_argument("--backbone", default="efficientnet_lite0")
p.add_argument("--category", default="bottle")
p.add_argument("--method", default=",".join(SCORERS), help="comma list")
args = p.parse_args()
logging.basicConfig(level=logging.WARNING)
times = pd.DataFrame(bench_score(args.banks_dir, args.backbone, args.category,
                                 args.method.split(",")))
print(times.to_string(index=False, float_format="%.2f"))
memory = pd.DataFrame([fit_peak_memory(args.banks_dir, args.backbone, args.category, "padim", c)
                       for c in (1, 2)])
print("\n" + memory.to_string(index=False, float_format="%.1f"))
