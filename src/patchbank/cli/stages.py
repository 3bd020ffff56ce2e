"""``patchbank extract|score|evaluate|run``: argument parsing only, then the stages."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchbank.cli.runtime import categories, data_root, each_item, parse_params, run_command
from patchbank.core.errors import PartialFailure, PatchbankError

log = logging.getLogger("patchbank")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data-root", type=Path, default=None,
                       help="dataset root in MVTec AD layout (default: the embedded demo dataset)")
    p.add_argument("--category", default="all", help="category name, comma list, or 'all'")
    p.add_argument("--banks-dir", type=Path, default=Path("featurebanks"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failing category (default: finish the others, "
                        "then report every failure)")
    p.add_argument("-v", "--verbose", action="store_true")


def _scores(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores-dir", type=Path, default=Path("scores"))


def _shots_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=_shots, default=None,
                   help="few-shot: fit on this many seeded training images ('all': every one)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the few-shot subset and the hold-out split (default 0)")


def _shots(text: str) -> int | None:
    """``--shots`` value: a positive integer or ``all``."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer or 'all'")
    return value


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="hub",
                   help="'hub' (pretrained, default), a local weights file, or 'random'")
    p.add_argument("--image-size", type=int, default=None, help="square input size")
    p.add_argument("--layers", default=None, help="comma list of tapped layers, e.g. 1,2,3")
    p.add_argument("--crop", type=int, default=None, help="centre-crop size after resizing")
    p.add_argument("--normalize", default=None, choices=["imagenet", "half", "model"],
                   help="input normalisation (default: the backbone's own)")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="add N seeded augmented copies of every training image to the train "
                        "bank (default 0)")
    p.add_argument("--augment-ops", default=None,
                   help="comma list of augmentations: flip, rot90, dihedral, rot8 "
                        "(AnomalyDINO's 45-degree steps), scale, blur, noise, jitter "
                        "(default scale,blur,noise,jitter)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-image-cache", dest="image_cache", action="store_false",
                   help="do not keep resized images under <banks-dir>/_imagecache for reuse")


def _spec(args: argparse.Namespace, backbone: str) -> Any:
    from patchbank.features.spec import ExtractSpec

    try:
        layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    except ValueError:
        raise PatchbankError(f"--layers {args.layers!r}: expected a comma list of integers, "
                             "e.g. --layers 1,2,3") from None
    return ExtractSpec(backbone, args.weights, layers, args.image_size, args.crop,
                       args.normalize, getattr(args, "augment", 0),
                       getattr(args, "augment_ops", None))










def extract_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Extract patch-feature banks from images.")
    p.add_argument("--backbone", required=True, help="registry name or any timm model name")
    _common(p)
    _extract_args(p)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")

    def run(args: argparse.Namespace) -> None:
        from patchbank.data.mvtec import resolve_categories
        from patchbank.stages.extract import ExtractConfig, extract

        root = data_root(args)
        spec = _spec(args, args.backbone)
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


def score_main(argv: Sequence[str] | None = None) -> None:
    from patchbank.scorers import methods_help

    p = argparse.ArgumentParser(description="Score cached banks with an anomaly detector.",
                                epilog=methods_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--param", action="append", default=[], help="key=value, repeatable")
    p.add_argument("--bank", default=None,
                   help="bank configuration tag (or a unique prefix) under <banks-dir>/<backbone>;"
                        " needed when several exist")
    p.add_argument("--name", default=None,
                   help="output folder name (default: method, bank settings and a hash)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of train images held out for an unsupervised threshold (0: off)")
    _shots_args(p)
    _common(p, data=False)
    _scores(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.score import score_category

        params = parse_params(args.param)
        tags = f"{args.bank}*" if args.bank else "*"
        cats = categories(
            args, Path(args.banks_dir, args.backbone),
            [f"{tags}/*/{split}.{ext}" for split in ("train", "test") for ext in ("json", "csv")]
            + [f"{tags}/*/*.layer*.npy"],
            f"python scripts/extract.py --backbone {args.backbone} --data-root DATA_ROOT "
            f"--banks-dir {args.banks_dir}")

        def one(category: str) -> None:
            name, status = score_category(
                args.banks_dir, args.scores_dir, args.backbone, args.method, category, params,
                bank=args.bank, name=args.name, holdout=args.holdout, seed=args.seed,
                shots=args.shots, device=args.device, overwrite=args.overwrite)
            print(f"{args.backbone}/{name}/{category}: {status}")

        each_item(cats, args.fail_fast, one)

    run_command(p, run, argv)


def evaluate_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate score runs: metrics, leaderboard, figures.")
    p.add_argument("--backbone", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate pixel metrics at this longer side instead of full resolution")
    p.add_argument("--no-figures", action="store_true")
    _common(p)
    _scores(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.evaluate import evaluate, leaderboard

        cats = categories(
            args, Path(args.scores_dir, args.backbone, args.method),
            [f"*/{f}" for f in ("run.json", "image_scores.csv", "maps.npz", "model.npz",
                                "metrics.json")],
            f"python scripts/score.py --backbone {args.backbone} --method METHOD "
            f"--banks-dir {args.banks_dir} --scores-dir {args.scores_dir}")

        def report(table: Any) -> None:
            if table is not None and not table.empty:
                print(table[["category", "image_auroc", "pixel_auroc", "pro", "best_dice",
                             "overall_score"]].to_string(index=False, float_format="%.4f"))
            leaderboard(args.scores_dir)

        try:
            table = evaluate(args.scores_dir, args.backbone, args.method, cats, args.data_root,
                             args.eval_size, figures=not args.no_figures,
                             overwrite=args.overwrite, fail_fast=args.fail_fast)
        except PartialFailure as err:
            report(err.result)
            raise
        report(table)

    run_command(p, run, argv)


def run_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="extract -> score -> evaluate, then the leaderboard.")
    p.add_argument("--backbone", default="efficientnet_lite0", help="comma list")
    p.add_argument("--method", default="padim,patchcore", help="comma list")
    p.add_argument("--param", action="append", default=[],
                   help="key=value for all methods, or method.key=value for one")
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of train images held out for an unsupervised threshold (0: off)")
    _shots_args(p)
    _common(p)
    _scores(p)
    _extract_args(p)
    p.set_defaults(weights="auto")

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.evaluate import leaderboard_markdown
        from patchbank.stages.pipeline import run_pipeline

        specs = [_spec(args, b) for b in args.backbone.split(",") if b]

        def report(board: Any) -> None:
            if board is not None and not board.empty:
                print(f"\nLeaderboard ({args.scores_dir / 'leaderboard.md'}):\n")
                print(leaderboard_markdown(board))

        try:
            board = run_pipeline(
                args.data_root, args.category, specs, args.method.split(","),
                banks_dir=args.banks_dir, scores_dir=args.scores_dir, device=args.device,
                params=parse_params(args.param), holdout=args.holdout, shots=args.shots,
                seed=args.seed, overwrite=args.overwrite, figures=not args.no_figures,
                eval_size=args.eval_size, batch_size=args.batch_size,
                image_cache=args.image_cache, fail_fast=args.fail_fast,
            )
        except PartialFailure as err:
            report(err.result)
            raise
        report(board)

    run_command(p, run, argv)


