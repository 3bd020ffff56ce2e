"""The contracts every backbone family implements: the extractor module, its description and
the :class:`BackboneFamily` record the family registry (:mod:`patchbank.features.families`)
holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbank.core.errors import WeightsError
from patchbank.features.registry import BackboneSpec

#: The ``--weights`` kinds a family may accept (``--weights PATH`` is "file").
WEIGHT_KINDS = frozenset({"hub", "file", "random", "pypi"})


@dataclass(frozen=True)
class ExtractorInfo:
    """What an extractor produces and from which weights (goes into bank fingerprints)."""

    backbone: str
    model_id: str
    weights_id: str
    layers: tuple[int, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]
    channels: int
    stride: int
    #: (h, w, C) of each tapped layer's own grid, in ``layers`` order (finest first).
    tap_shapes: tuple[tuple[int, int, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class FeatureExtractor(nn.Module):
    """Frozen backbone: normalised ``(B, 3, S, S)`` images -> ``(B, C, h, w)`` float32 grids.

    A family subclasses it and implements :meth:`taps`."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        self.image_size = image_size

    def taps(self, x: Tensor) -> list[Tensor]:
        """The tapped maps, each ``(B, C_i, h_i, w_i)``, first one the finest."""
        raise NotImplementedError

    def grids(self, x: Tensor) -> list[Tensor]:
        """Each tapped layer at its own resolution, float32 ``(B, C_i, h_i, w_i)``: what the
        extract stage stores, so every scorer can combine the taps as its paper does."""
        self._check(x)
        return [m.float() for m in self.taps(x)]

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, got "
                             f"{tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Tap the layers, upsample every map to the first one's grid, concatenate channels."""
        self._check(x)
        maps = self.taps(x)
        size = maps[0].shape[-2:]
        out = [maps[0]] + [
            m if m.shape[-2:] == size else
            F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]
        ]
        return torch.cat(out, dim=1).float()


#: ``(spec, mode, path, layers, image_size) -> (extractor, weights_id)``: builds the feature
#: model stopping at the last tapped layer, the layers validated; ``mode`` is one of the
#: family's weight kinds, ``path`` the weights file (or directory) for "file" and "pypi".
Builder = Callable[[BackboneSpec, str, Path | None, tuple[int, ...], int],
                   tuple[FeatureExtractor, str]]
#: ``(spec, mode, path) -> (full classifier model, weights_id)``, for weights sanity checks.
ClassifierBuilder = Callable[[BackboneSpec, str, Path | None], tuple[nn.Module, str]]


@dataclass(frozen=True)
class BackboneFamily:
    """One way of building backbones: a :class:`~patchbank.features.registry.BackboneSpec`'s
    ``family`` names one of these in :data:`patchbank.features.families.FAMILIES`."""

    name: str
    build: Builder
    #: The ``--weights`` kinds accepted, a subset of :data:`WEIGHT_KINDS`.
    weight_kinds: frozenset[str]
    #: How layer indices are called in error messages ("block indices", ...).
    tap_name: str = "block indices"
    #: The message tail when a weights kind is refused ("no PyPI weights for ViTs; use ...").
    weights_fix: str = ""
    #: ``--weights PATH`` may be a directory (a Hugging Face model folder).
    accepts_dir: bool = False
    #: The full classifier with the same weights (``build_classifier``); None: no head.
    classifier: ClassifierBuilder | None = None
    #: The message tail when there is no classifier.
    no_classifier: str = ""

    def __post_init__(self) -> None:
        if not self.weight_kinds or not self.weight_kinds <= WEIGHT_KINDS:
            raise ValueError(f"family {self.name}: weight_kinds {sorted(self.weight_kinds)} must "
                             f"be a non-empty subset of {sorted(WEIGHT_KINDS)}")

    def check_weights(self, spec: BackboneSpec, mode: str) -> None:
        """WeightsError when this family cannot take ``mode`` weights."""
        if mode not in self.weight_kinds:
            fix = self.weights_fix or (f"no {mode} weights for {self.name} backbones; use "
                                       f"--weights {' or '.join(sorted(self.weight_kinds))}")
            raise WeightsError(f"{spec.name}: {fix}")

    def check_layers(self, spec: BackboneSpec, layers: tuple[int, ...], n: int) -> None:
        """WeightsError unless every tap is one of the model's ``n`` layer indices."""
        if not layers or min(layers) < 0 or max(layers) >= n:
            raise WeightsError(f"{spec.name}: layers {list(layers)} out of range; valid "
                               f"{self.tap_name} are 0..{n - 1}; pass --layers within that range")
