"""timm ViTs through ``forward_intermediates``: DINOv2, DeiT, any plain ViT-style timm model.

Layer indices are 0-based transformer blocks; the tap is that block's output patch tokens
(class/register tokens dropped; the final norm only when the spec's ``final_norm`` says so).
The ViT defaults (7, 10) are blocks 8 and 11 of 12 counted from one: late-middle blocks,
skipping the last block, whose tokens are the most specialised to the pre-training objective.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from patchbank.features.families.base import BackboneFamily, FeatureExtractor
from patchbank.features.registry import BackboneSpec, meta_timm
from patchbank.features.weights import create_timm, timm_weights


class VitExtractor(FeatureExtractor):
    """timm ViT, blocks pruned after the last tap; patch tokens of the tapped blocks."""

    def __init__(self, model: nn.Module, image_size: int, layers: tuple[int, ...],
                 norm: bool = False) -> None:
        super().__init__(model, image_size)
        self.layers = list(layers)
        self.norm = norm

    def taps(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.layers, return_prefix_tokens=False, norm=self.norm,
            output_fmt="NCHW", intermediates_only=True)


def build(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
          image_size: int) -> tuple[FeatureExtractor, str]:
    """The ViT at ``image_size``, blocks after the last tap (and the head) pruned."""
    FAMILY.check_layers(spec, layers, len(meta_timm(spec.model_id).blocks))
    model = create_timm(spec, mode, img_size=image_size)
    weights_id = timm_weights(model, spec, mode, path, vit=True)
    model.prune_intermediate_layers(list(layers), prune_norm=not spec.final_norm,
                                    prune_head=True)
    return VitExtractor(model, image_size, layers, spec.final_norm), weights_id


def classifier(spec: BackboneSpec, mode: str, path: Path | None) -> tuple[nn.Module, str]:
    """The full timm ViT classifier at the spec's image size, with the same weights."""
    model = create_timm(spec, mode, img_size=spec.image_size)
    return model, timm_weights(model, spec, mode, path, vit=True)


FAMILY = BackboneFamily(
    name="vit", build=build, weight_kinds=frozenset({"hub", "file", "random"}),
    weights_fix="no PyPI weights for ViTs; use --weights hub, PATH or random",
    classifier=classifier,
)
