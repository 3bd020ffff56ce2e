"""PatchCore coreset selection time against the number of patches (10 % coreset by default).

Points: a saved (patches, 128) float32 projected matrix (``--points``; ``--save-points`` builds
one from a train bank with PatchCore's aggregation and projection); sizes larger than the file
are capped. Prints a markdown table; CPU seconds are the process's (all threads).
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from patchbank.bench.stages import bench_coreset, coreset_points

DEFAULT_POINTS = [Path("/tmp/coreset_points_597k.npy"), Path("/tmp/coreset_points_164k.npy")]

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--points", type=Path, help="(patches, dim) .npy; default: the first of "
               + ", ".join(map(str, DEFAULT_POINTS)) + " that exists")
p.add_argument("--save-points", type=Path, help="build the points from --banks-dir first")
p.add_argument("--banks-dir", type=Path, default=Path("featurebanks"))
p.add_argument("--backbone", default="efficientnet_lite0")
p.add_argument("--category", default="bottle")
p.add_argument("--sizes", default="50000,100000,200000,400000,600000", help="comma list")
p.add_argument("--methods", default="pruned", help="comma list of greedy_kcenter methods")
p.add_argument("--fraction", type=float, default=0.1)
p.add_argument("--partitions", type=int, default=1,
               help="> 1: time the approximate partitioned sampler")
args = p.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")
if args.save_points:
    np.save(args.save_points, coreset_points(args.banks_dir, args.backbone, args.category))
    args.points = args.points or args.save_points
path = args.points or next((q for q in DEFAULT_POINTS if q.exists()), None)
if path is None:
    p.error("no points file: give --points, or --save-points with --banks-dir and --category")
points = np.load(path, mmap_mode="r")
print(f"points: {path} {points.shape}, torch threads {torch.get_num_threads()}\n")
rows = bench_coreset(points, [int(s) for s in args.sizes.split(",")], args.methods.split(","),
                     args.fraction, partitions=args.partitions)
cols = list(rows[0])
print("| " + " | ".join(cols) + " |\n|" + "---:|" * len(cols))
for r in rows:
    print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c])
                            for c in cols) + " |")
