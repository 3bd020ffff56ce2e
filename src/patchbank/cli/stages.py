"""``patchbank extract|score|evaluate|run``: argument parsing only, then the stages."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchbank.cli.args import (
    add_bootstrap,
    add_common,
    add_extract,
    add_holdout,
    add_run_choice,
    add_scores_dir,
    add_shots,
    check_methods,
    extract_spec,
)
from patchbank.cli.runtime import (
    categories,
    data_root,
    each_item,
    new_parser,
    parse_params,
    run_command,
)
from patchbank.core.errors import PartialFailure

log = logging.getLogger("patchbank")

BACKBONE_HELP = "registry name (see the README's backbone table) or any timm model name"


def extract_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = new_parser(prog, "Extract patch-feature banks (one npy per tapped layer) from images.",
                   "patchbank extract --backbone efficientnet_lite0 --category demo_object")
    p.add_argument("--backbone", required=True, help=BACKBONE_HELP)
    add_common(p)
    add_extract(p)
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding DataLoader workers (default: from the CPU count)")

    def run(args: argparse.Namespace) -> None:
        from patchbank.data.mvtec import resolve_categories
        from patchbank.stages.extract import ExtractConfig, extract

        root = data_root(args)
        spec = extract_spec(args, args.backbone)
        config = ExtractConfig(spec, args.batch_size, args.workers, args.device,
                               args.image_cache)
        tag = spec.tag()

        def report(done: dict[str, dict[str, str]]) -> None:
            for category, splits in done.items():
                print(f"{args.backbone}/{tag}/{category}: " + ", ".join(
                    f"{s} {v}" for s, v in splits.items()))

        try:
            report(extract(root, resolve_categories(root, args.category), config,
                           args.banks_dir, args.overwrite, fail_fast=args.fail_fast))
        except PartialFailure as err:
            report(err.result or {})
            raise

    run_command(p, run, argv)


def score_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    from patchbank.scorers import methods_help

    p = new_parser(prog, "Score cached banks with an anomaly detector; writes one run folder "
                   "<scores-dir>/<backbone>/<run>/<category>/ and prints its name.",
                   "patchbank score --backbone efficientnet_lite0 --method patchcore "
                   "--category demo_object --param coreset=0.1",
                   epilog="methods and their parameters (--param key=value):\n"
                          + methods_help())
    p.add_argument("--backbone", required=True, help="backbone whose banks are scored")
    p.add_argument("--method", required=True, help="scoring method (listed below)")
    p.add_argument("--param", action="append", default=[],
                   help="method parameter key=value, repeatable (listed below)")
    p.add_argument("--bank", default=None,
                   help="bank configuration tag (or a unique prefix) under <banks-dir>/<backbone>;"
                        " needed when several exist")
    p.add_argument("--name", default=None,
                   help="run folder name (default: method, bank settings and a hash)")
    add_holdout(p)
    add_shots(p)
    add_common(p, data=False)
    add_scores_dir(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.score import score_category

        check_methods([args.method])
        params = parse_params(args.param)
        tags = f"{args.bank}*" if args.bank else "*"
        cats = categories(
            args, Path(args.banks_dir, args.backbone),
            [f"{tags}/*/{split}.{ext}" for split in ("train", "test") for ext in ("json", "csv")]
            + [f"{tags}/*/*.layer*.npy"],
            f"patchbank extract --backbone {args.backbone} --data-root DATA_ROOT "
            f"--banks-dir {args.banks_dir}")

        def one(category: str) -> None:
            name, status = score_category(
                args.banks_dir, args.scores_dir, args.backbone, args.method, category, params,
                bank=args.bank, name=args.name, holdout=args.holdout, seed=args.seed,
                shots=args.shots, device=args.device, overwrite=args.overwrite)
            print(f"{args.backbone}/{name}/{category}: {status}")

        each_item(cats, args.fail_fast, one)

    run_command(p, run, argv)


def evaluate_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = new_parser(prog, "Evaluate score runs (official MVTec AD metrics), then rewrite "
                   "metrics.csv, the leaderboard and the figures.",
                   "patchbank evaluate --backbone efficientnet_lite0 --method patchcore "
                   "--category demo_object")
    p.add_argument("--backbone", required=True, help="backbone whose runs are evaluated")
    add_run_choice(p)
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate pixel metrics at this longer side (default: each image's "
                        "full resolution)")
    p.add_argument("--no-figures", action="store_true",
                   help="skip heatmaps, curves and histograms")
    add_bootstrap(p)
    add_common(p)
    add_scores_dir(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.evaluate import evaluate, leaderboard
        from patchbank.store.catalog import find_runs

        wanted = [c.strip() for c in args.category.split(",") if c.strip()]
        runs = find_runs(args.scores_dir, args.backbone, method=args.method, run=args.run,
                         categories=wanted)

        def report(name: str, table: Any) -> None:
            if table is not None and not table.empty:
                print(f"{args.backbone}/{name}:")
                print(table[["category", "image_auroc", "pixel_auroc", "pro", "best_dice",
                             "overall_score"]].to_string(index=False, float_format="%.4f"))

        failures: list[tuple[str, BaseException]] = []
        total = 0
        try:
            for ref in runs:
                cats = list(ref.categories) if "all" in wanted else wanted
                total += len(cats)
                try:
                    report(ref.name, evaluate(
                        args.scores_dir, args.backbone, ref.name, cats, args.data_root,
                        args.eval_size, figures=not args.no_figures, overwrite=args.overwrite,
                        fail_fast=args.fail_fast, bootstrap=args.bootstrap, ci=args.ci))
                except PartialFailure as err:  # some categories failed, the others finished
                    report(ref.name, err.result)
                    failures += err.failures
        finally:
            leaderboard(args.scores_dir)
        if failures:
            raise PartialFailure(failures, total=total)

    run_command(p, run, argv)


def run_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = new_parser(prog, "extract -> score -> evaluate on every category, then the "
                   "leaderboard (each stage skips what is up to date).",
                   "patchbank run --category demo_object --method padim,patchcore")
    p.add_argument("--backbone", default="efficientnet_lite0", help="comma list of backbones")
    p.add_argument("--method", default="padim,patchcore", help="comma list of methods")
    p.add_argument("--param", action="append", default=[],
                   help="key=value for all methods, or method.key=value for one; repeatable")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate pixel metrics at this longer side (default: full resolution)")
    p.add_argument("--no-figures", action="store_true",
                   help="skip heatmaps, curves and histograms")
    add_bootstrap(p)
    add_holdout(p)
    add_shots(p)
    add_common(p)
    add_scores_dir(p)
    add_extract(p)
    p.set_defaults(weights="auto")

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.evaluate import leaderboard_markdown
        from patchbank.stages.pipeline import run_pipeline

        methods = check_methods([m for m in args.method.split(",") if m])
        specs = [extract_spec(args, b) for b in args.backbone.split(",") if b]

        def report(board: Any) -> None:
            if board is not None and not board.empty:
                print(f"\nLeaderboard ({args.scores_dir / 'leaderboard.md'}):\n")
                print(leaderboard_markdown(board))

        try:
            board = run_pipeline(
                args.data_root, args.category, specs, methods,
                banks_dir=args.banks_dir, scores_dir=args.scores_dir, device=args.device,
                params=parse_params(args.param), holdout=args.holdout, shots=args.shots,
                seed=args.seed, overwrite=args.overwrite, figures=not args.no_figures,
                eval_size=args.eval_size, batch_size=args.batch_size,
                image_cache=args.image_cache, fail_fast=args.fail_fast,
                bootstrap=args.bootstrap, ci=args.ci,
            )
        except PartialFailure as err:
            report(err.result)
            raise
        report(board)

    run_command(p, run, argv)
