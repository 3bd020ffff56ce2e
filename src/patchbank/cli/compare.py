"""``patchbank compare`` (``scripts/compare.py``): paired comparison of score runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from patchbank.cli.runtime import add_verbose, new_parser, run_command
from patchbank.core.errors import PatchbankError


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = new_parser(
        prog, "Paired comparison of score runs on the same test images: per category and "
              "metric both values, their difference a - b with a paired bootstrap interval and "
              "p-value (DeLong's test for image AUROC), the mean over categories with a "
              "Wilcoxon signed-rank test, Holm-adjusted with more than two runs. Writes "
              "compare.csv, compare.md and compare_forest.png.",
        "patchbank compare --backbone efficientnet_lite0 --category all --runs patchcore,padim")
    p.add_argument("--scores-dir", type=Path, default=Path("scores"),
                   help="folder of the score runs (default: scores)")
    p.add_argument("--backbone", required=True, help="backbone whose runs are compared")
    p.add_argument("--category", default="all",
                   help="category name, comma list, or 'all': every category all runs scored "
                        "(default: all)")
    p.add_argument("--runs", required=True,
                   help="comma list of two or more runs: run folder names, unique prefixes, "
                        "or methods that have exactly one run, e.g. patchcore,padim")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <scores-dir>/<backbone>/compare)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="bootstrap replicates (default 1000; 0: no intervals, DeLong only)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset root, where the masks are found when the runs were scored "
                        "elsewhere (default: the paths stored in the runs)")
    p.add_argument("--image-only", action="store_true",
                   help="compare image metrics only (default: pixel metrics too, when the runs "
                        "have maps and the test set masks)")
    add_verbose(p)
    return p


def compare_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.compare import compare_runs

        runs = [r.strip() for r in args.runs.split(",") if r.strip()]
        if len(runs) < 2:
            raise PatchbankError(f"--runs {args.runs!r}: give at least two runs, e.g. "
                                 "--runs patchcore,padim")
        compare_runs(args.scores_dir, args.backbone, runs, args.category, args.data_root,
                     args.bootstrap, args.seed, args.out, pixel=not args.image_only)
        out = args.out or Path(args.scores_dir, args.backbone, "compare")
        print((out / "compare.md").read_text())
        print(f"wrote {out / 'compare.csv'}, compare.md, compare_forest.png")

    run_command(_parser(prog), run, argv)
