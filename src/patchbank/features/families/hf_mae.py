"""MAE through Hugging Face ``transformers.ViTMAEModel``, masking off, patch order kept.

Layer indices are 0-based transformer blocks; the tap is that block's patch tokens (CLS
dropped) in raster order. ``--weights PATH`` may be a ``save_pretrained`` directory or a
state-dict file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from patchbank.core.errors import WeightsError
from patchbank.features.families.base import BackboneFamily, FeatureExtractor
from patchbank.features.registry import BackboneSpec
from patchbank.features.weights import (
    RANDOM_SEED,
    apply_state_dict,
    hub_error,
    load_state_dict_file,
    sha16,
    strip_prefixes,
)


class MaeExtractor(FeatureExtractor):
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


def _pretrained(spec: BackboneSpec, mode: str, path: Path | None) -> tuple[nn.Module, str]:
    """A hub model or a ``save_pretrained`` directory."""
    from transformers import ViTMAEModel

    source = spec.model_id if mode == "hub" else str(path)
    try:
        model = ViTMAEModel.from_pretrained(source, mask_ratio=0.0)
    except Exception as err:
        if mode == "hub":
            raise hub_error(spec.name, spec.model_id, err) from None
        raise WeightsError(f"{spec.name}: {path} is not a loadable ViTMAE model directory "
                           f"({type(err).__name__}); pass a directory saved with "
                           "save_pretrained or a state-dict file") from None
    assert mode == "hub" or path is not None
    weights_id = f"hub:{spec.model_id}" if mode == "hub" else f"file:sha256:{sha16(path)}"
    return model, weights_id


def _from_file(spec: BackboneSpec, path: Path) -> nn.Module:
    """A default-config model sized from the file's position embeddings, weights loaded."""
    from transformers import ViTMAEConfig, ViTMAEModel

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
    return model


def _load(spec: BackboneSpec, mode: str, path: Path | None,
          image_size: int) -> tuple[nn.Module, str]:
    if mode == "hub" or (mode == "file" and path is not None and path.is_dir()):
        return _pretrained(spec, mode, path)
    if mode == "file":
        assert path is not None
        return _from_file(spec, path), f"file:sha256:{sha16(path)}"
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(RANDOM_SEED)
    model = ViTMAEModel(ViTMAEConfig(mask_ratio=0.0, image_size=image_size))
    return model, f"random:seed{RANDOM_SEED}"


def build(spec: BackboneSpec, mode: str, path: Path | None, layers: tuple[int, ...],
          image_size: int) -> tuple[FeatureExtractor, str]:
    """The MAE encoder, masking off, blocks after the last tap dropped."""
    model, weights_id = _load(spec, mode, path, image_size)
    model.config.mask_ratio = 0.0
    FAMILY.check_layers(spec, layers, model.config.num_hidden_layers)
    # Run only the blocks up to the last tap (transformers 5: model.layers; 4.x: encoder.layer).
    holder, attr = (model, "layers") if hasattr(model, "layers") else (model.encoder, "layer")
    setattr(holder, attr, getattr(holder, attr)[: max(layers) + 1])
    model.config.num_hidden_layers = max(layers) + 1
    return MaeExtractor(model, image_size, layers), weights_id


FAMILY = BackboneFamily(
    name="mae", build=build, weight_kinds=frozenset({"hub", "file", "random"}),
    weights_fix="no PyPI weights for MAE; use --weights hub, PATH or random", accepts_dir=True,
    no_classifier="MAE has no classifier head; use a timm backbone",
)
