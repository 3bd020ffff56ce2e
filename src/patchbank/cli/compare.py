"""``scripts/compare.py``: paired comparison of score runs (argument parsing only)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from patchbank.cli.runtime import run_command
from patchbank.core.errors import PatchbankError

EPILOG = """example:
  python scripts/compare.py --scores-dir scores --backbone efficientnet_lite0 \\
      --category all --runs patchcore,padim
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Paired comparison of score runs on the same test images: per category and "
                    "metric both values, their difference a - b with a paired bootstrap "
                    "interval and p-value (DeLong's test for image AUROC), the mean over "
                    "categories with a Wilcoxon signed-rank test, Holm-adjusted with more than "
                    "two runs. Writes compare.csv, compare.md and compare_forest.png.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores-dir", type=Path, default=Path("scores"),
                   help="folder of the score runs (default: scores)")
    p.add_argument("--backbone", required=True, help="backbone whose runs are compared")
    p.add_argument("--category", default="all",
                   help="category name, comma list, or 'all': every category all runs scored "
                        "(default: all)")
    p.add_argument("--runs", required=True,
                   help="comma list of two or more run folder names or unique prefixes, "
                        "e.g. patchcore,padim")
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
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def compare_main(argv: Sequence[str] | None = None) -> None:
    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.compare import compare_runs

        runs = [r.strip() for r in args.runs.split(",") if r.strip()]
        if len(runs) < 2:
            raise PatchbankError(f"--runs {args.runs!r}: give at least two runs, e.g. "
                                 "--runs patchcore,padim")
        compare_runs(args.scores_dir, args.backbone, runs, args.category,
                             args.data_root, args.bootstrap, args.seed, args.out,
                             pixel=not args.image_only)
        out = args.out or Path(args.scores_dir, args.backbone, "compare")
        print((out / "compare.md").read_text())
        print(f"wrote {out / 'compare.csv'}, compare.md, compare_forest.png")

    run_command(_parser(), run, argv)
