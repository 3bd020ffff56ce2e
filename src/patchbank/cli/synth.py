"""Command lines of ``scripts/synth.py`` and ``scripts/select_config.py``: parsing, then the
package."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from patchbank.cli.args import add_data_root
from patchbank.cli.runtime import add_verbose, new_parser, run_command


def synth_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Write MVTec-layout synthetic validation sets (``scripts/synth.py``)."""
    from patchbank.synth.dataset import DEFAULT_KINDS
    from patchbank.synth.generators import GENERATORS

    p = new_parser(prog, "Write an MVTec-layout validation set whose defects are synthetic, "
                   "made from a seeded held-out part of train/good (test images are never "
                   "read).", "patchbank synth --category demo_object --out synth")
    add_data_root(p)
    p.add_argument("--category", default="all", help="category name, comma list, or 'all'")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (gets <out>/<category>/...); must lie outside the dataset")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma list of defect kinds from {', '.join(GENERATORS)}")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of train/good held out: half test/good, half defect sources")
    p.add_argument("--max-holdout", type=int, default=None,
                   help="at most this many held-out images (caps the test set of big categories)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out and the defects")
    p.add_argument("--perlin-source", default="image", choices=["image", "procedural"],
                   help="texture of Perlin defects: another training image, or generated")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic set made with other settings")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failing category")
    add_verbose(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.cli.runtime import data_root, each_item
        from patchbank.data.mvtec import resolve_categories
        from patchbank.synth.dataset import write_synthetic_set

        root = data_root(args)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]

        def one(category: str) -> None:
            status = write_synthetic_set(root, category, args.out, kinds=kinds,
                                         holdout=args.holdout, seed=args.seed,
                                         perlin_source=args.perlin_source,
                                         max_holdout=args.max_holdout,
                                         overwrite=args.overwrite)
            print(f"{args.out / category}: {status}")

        each_item(resolve_categories(root, args.category), args.fail_fast, one)

    run_command(p, run, argv)


def select_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Rank configurations on a synthetic validation set; compare with real metrics
    (``scripts/select_config.py``)."""
    from patchbank.synth.select import METRICS

    p = new_parser(prog, "Pick backbone x method x setting per category from their metrics "
                   "on a synthetic validation set (scores evaluated with patchbank run or "
                   "score + evaluate); with --real-scores-dir, compare the pick with the "
                   "oracle and the default on the real test set.",
                   "patchbank select --scores-dir synth-scores --real-scores-dir scores")
    p.add_argument("--scores-dir", type=Path, required=True,
                   help="scores folder of runs evaluated on the synthetic set")
    p.add_argument("--real-scores-dir", type=Path, default=None,
                   help="scores folder of the same configurations evaluated on the real set")
    p.add_argument("--category", default="all", help="category name, comma list, or 'all'")
    p.add_argument("--metric", default="image_auroc", choices=METRICS,
                   help="metric that ranks the configurations")
    p.add_argument("--default", default="efficientnet_lite0/patchcore",
                   help="the fixed default configuration as backbone/method")
    p.add_argument("--top", type=int, default=5, help="configurations listed per category")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the tables to this Markdown file (default: print only)")
    add_verbose(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.core.atomic import atomic_write_text
        from patchbank.synth.select import collect, compare, markdown, pick, ranking_markdown

        cats = None if args.category == "all" else [
            c.strip() for c in args.category.split(",") if c.strip()]
        synthetic = collect(args.scores_dir, cats)
        text = f"## Ranking on the synthetic set by {args.metric}\n\n"
        text += ranking_markdown(synthetic, args.metric, args.top)
        picks = pick(synthetic, args.metric)
        text += "\n## Pick per category\n\n" + "\n".join(
            f"- {row['category']}: {row['config']} ({args.metric} {100 * row[args.metric]:.1f} "
            "on the synthetic set)" for _, row in picks.iterrows()) + "\n"
        if args.real_scores_dir is not None:
            table = compare(synthetic, collect(args.real_scores_dir, cats), args.metric,
                            args.default)
            text += (f"\n## Synthetic pick vs oracle vs default on the real test set "
                     f"({args.metric}, %)\n\n" + markdown(table, args.metric))
        print(text)
        if args.out is not None:
            atomic_write_text(args.out, text)

    run_command(p, run, argv)
