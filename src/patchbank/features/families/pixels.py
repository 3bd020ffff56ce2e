"""Raw pixels as a bank (the pixel autoencoder's input): no model and no weights.

Layer L is the normalised input pixels area-averaged over 2^L x 2^L blocks (0 = the pixels
themselves); 2^L must divide the image size.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from patchbank.core.errors import WeightsError
from patchbank.features.families.base import BackboneFamily, FeatureExtractor
from patchbank.features.registry import BackboneSpec
from patchbank.features.weights import RANDOM_SEED


class PixelExtractor(FeatureExtractor):
    """The normalised pixels themselves, area-pooled by 2^L per tapped layer L."""

    def __init__(self, image_size: int, layers: tuple[int, ...]) -> None:
        super().__init__(nn.Identity(), image_size)
        self.layers = layers

    def taps(self, x: Tensor) -> list[Tensor]:
        return [F.avg_pool2d(x, 2 ** layer) if layer else x for layer in self.layers]


def build(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
          image_size: int) -> tuple[FeatureExtractor, str]:
    """The pooling "model"; every layer L must have 2^L dividing ``image_size``."""
    bad = [layer for layer in layers if image_size % (2 ** layer)]
    if not layers or min(layers) < 0 or bad:
        raise WeightsError(f"{spec.name}: layers {list(layers)} do not fit image size "
                           f"{image_size} (layer L area-pools by 2^L, which must divide the "
                           "size); pass e.g. --layers 2 with --image-size 256")
    weights_id = f"random:seed{RANDOM_SEED}" if mode == "random" else "none"
    return PixelExtractor(image_size, layers), weights_id


FAMILY = BackboneFamily(
    name="pixels", build=build, weight_kinds=frozenset({"hub", "random"}),
    weights_fix="raw pixels have no weights; use --weights hub (the default)",
    tap_name="pooling levels", no_classifier="raw pixels have no classifier head; use a timm "
    "backbone",
)
