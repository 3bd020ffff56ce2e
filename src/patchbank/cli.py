"""Command-line entry points behind ``scripts/*.py``: argument parsing only, then the package."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from patchbank.core.errors import PatchbankError

log = logging.getLogger("patchbank")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data-root", type=Path, default=None,
                       help="dataset root in MVTec AD layout (default: the embedded demo dataset)")
    p.add_argument("--category", default="all", help="category name, comma list, or 'all'")
    p.add_argument("--banks-dir", type=Path, default=Path("featurebanks"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    p.add_argument("-v", "--verbose", action="store_true")


def _scores(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores-dir", type=Path, default=Path("scores"))


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="hub",
                   help="'hub' (pretrained, default), a local weights file, or 'random'")
    p.add_argument("--image-size", type=int, default=None, help="square input size")
    p.add_argument("--layers", default=None, help="comma list of tapped layers, e.g. 1,2,3")
    p.add_argument("--crop", type=int, default=None, help="centre-crop size after resizing")
    p.add_argument("--normalize", default=None, choices=["imagenet", "half", "model"],
                   help="input normalisation (default: the backbone's own)")
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
                       args.normalize)


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``["k=1", "coreset=0.1"]`` -> ``{"k": "1", "coreset": "0.1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PatchbankError(f"--param {item!r}: expected key=value, e.g. --param k=3")
        out[key.strip()] = value.strip()
    return out


def _data_root(args: argparse.Namespace) -> Path:
    from patchbank.data.demo import ensure_demo_dataset

    return args.data_root if args.data_root is not None else ensure_demo_dataset()


def _categories(args: argparse.Namespace, folder: Path, marker: str, hint: str) -> list[str]:
    """Categories for stages that read banks/scores: the given ones, or all found on disk."""
    if args.category != "all":
        return [c for c in args.category.split(",") if c]
    found = sorted({p.parent.name for p in folder.glob(f"*/{marker}")})
    if not found:
        raise PatchbankError(f"{folder}: nothing found; run {hint} first")
    return found


def extract_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Extract patch-feature banks from images.")
    p.add_argument("--backbone", required=True, help="registry name or any timm model name")
    _common(p)
    _extract_args(p)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")

    def run(args: argparse.Namespace) -> None:
        from patchbank.data.mvtec import resolve_categories
        from patchbank.stages.extract import ExtractConfig, extract

        root = _data_root(args)
        spec = _spec(args, args.backbone)
        config = ExtractConfig(spec, args.batch_size, args.workers, args.device,
                               args.image_cache)
        done = extract(root, resolve_categories(root, args.category), config, args.banks_dir,
                       args.overwrite)
        tag = spec.tag()
        for category, splits in done.items():
            print(f"{args.backbone}/{tag}/{category}: " + ", ".join(f"{s} {v}" for s, v in
                                                                     splits.items()))

    _main(p, run, argv)


def score_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Score cached banks with an anomaly detector.")
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
    _common(p, data=False)
    _scores(p)

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.score import score_category

        params = parse_params(args.param)
        cats = _categories(args, Path(args.banks_dir, args.backbone), "*/test.json",
                           "scripts/extract.py")
        for category in cats:
            name, status = score_category(
                args.banks_dir, args.scores_dir, args.backbone, args.method, category, params,
                bank=args.bank, name=args.name, holdout=args.holdout, device=args.device,
                overwrite=args.overwrite)
            print(f"{args.backbone}/{name}/{category}: {status}")

    _main(p, run, argv)


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

        cats = _categories(args, Path(args.scores_dir, args.backbone, args.method), "run.json",
                           "scripts/score.py")
        table = evaluate(args.scores_dir, args.backbone, args.method, cats, args.data_root,
                         args.eval_size, figures=not args.no_figures, overwrite=args.overwrite)
        print(table[["category", "image_auroc", "pixel_auroc", "pro", "best_dice",
                     "overall_score"]].to_string(index=False, float_format="%.4f"))
        leaderboard(args.scores_dir)

    _main(p, run, argv)


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
    _common(p)
    _scores(p)
    _extract_args(p)
    p.set_defaults(weights="auto")

    def run(args: argparse.Namespace) -> None:
        from patchbank.stages.evaluate import leaderboard_markdown
        from patchbank.stages.pipeline import run_pipeline

        specs = [_spec(args, b) for b in args.backbone.split(",") if b]
        board = run_pipeline(
            args.data_root, args.category, specs, args.method.split(","),
            banks_dir=args.banks_dir, scores_dir=args.scores_dir, device=args.device,
            params=parse_params(args.param), holdout=args.holdout, overwrite=args.overwrite,
            figures=not args.no_figures, eval_size=args.eval_size, batch_size=args.batch_size,
            image_cache=args.image_cache,
        )
        print(f"\nLeaderboard ({args.scores_dir / 'leaderboard.md'}):\n")
        print(leaderboard_markdown(board))

    _main(p, run, argv)


def _main(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
          argv: Sequence[str] | None) -> None:
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except PatchbankError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished banks and runs are kept; re-run to continue",
              file=sys.stderr)
        sys.exit(130)
