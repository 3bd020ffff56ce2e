"""What a user chooses about extraction, as one frozen, validated object.

Its canonical JSON names the bank cache: :meth:`ExtractSpec.tag` is a short readable part plus
a hash of the resolved spec, so banks of different layers, sizes, crops, normalisations or
weights live side by side and a known spec is a skip. The CLI, the pipeline and sweeps all
build this same object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from patchbank.core.errors import PatchbankError
from patchbank.features.registry import NORMALIZATIONS, get_spec


@dataclass(frozen=True)
class ExtractSpec:
    """Backbone, weights and input settings; ``None`` means the registry's default."""

    backbone: str
    weights: str = "hub"
    layers: tuple[int, ...] | None = None
    image_size: int | None = None
    crop: int | None = None
    normalize: str | None = None
    #: Augmented copies of each training image in the train bank (0: none) and their ops
    #: (:mod:`patchbank.features.augment`); with 0 both are left out of the canonical JSON, so
    #: the tags of banks made before augmentation existed are unchanged.
    augment: int = 0
    augment_ops: str | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = tuple(sorted({int(x) for x in self.layers}))
            if not layers or min(layers) < 0:
                raise PatchbankError(f"--layers {self.layers}: give one or more layer indices "
                                     ">= 0, e.g. --layers 1,2,3")
            object.__setattr__(self, "layers", layers)
        if self.image_size is not None and self.image_size < 8:
            raise PatchbankError(f"--image-size {self.image_size}: must be at least 8")
        if self.normalize is not None and self.normalize not in (*NORMALIZATIONS, "model"):
            raise PatchbankError(f"--normalize {self.normalize!r}: choose "
                                 f"{' or '.join((*NORMALIZATIONS, 'model'))}")
        if int(self.augment) < 0:
            raise PatchbankError(f"--augment {self.augment}: give 0 (none) or a positive number "
                                 "of copies per training image")
        object.__setattr__(self, "augment", int(self.augment))
        if self.augment_ops is not None:
            from patchbank.features.augment import parse_ops

            object.__setattr__(self, "augment_ops", ",".join(parse_ops(self.augment_ops)))
        size = self.image_size
        if self.crop is not None and size is not None and not 0 < self.crop <= size:
            raise PatchbankError(f"--crop {self.crop} must be between 1 and the image size "
                                 f"{size}; pass a smaller --crop or a larger --image-size")

    def resolved(self) -> ExtractSpec:
        """Every default filled in from the backbone registry (layers, size, normalisation)."""
        reg = get_spec(self.backbone)
        norm = self.normalize
        if norm is None:
            norm = next((k for k, (m, s) in NORMALIZATIONS.items()
                         if tuple(m) == tuple(reg.mean) and tuple(s) == tuple(reg.std)), "model")
        ops = None
        if self.augment:
            from patchbank.features.augment import DEFAULT_OPS

            ops = self.augment_ops or DEFAULT_OPS
        out = replace(self, layers=self.layers or reg.layers,
                      image_size=self.image_size or reg.image_size, normalize=norm,
                      augment_ops=ops)
        if out.crop is not None and not 0 < out.crop <= out.image_size:
            raise PatchbankError(f"--crop {out.crop} must be between 1 and the image size "
                                 f"{out.image_size}; pass a smaller --crop or a larger "
                                 "--image-size")
        return out

    def canonical(self) -> dict[str, Any]:
        """The resolved spec as a JSON-ready dict (the cache key)."""
        d = asdict(self.resolved())
        d["layers"] = list(d["layers"])
        if not d["augment"]:
            del d["augment"], d["augment_ops"]
        return d

    def tag(self) -> str:
        """Folder name: readable settings plus 8 hex digits of the canonical JSON's sha256,
        e.g. ``s224-l1.2.3-half-hub-1a2b3c4d``."""
        r = self.resolved()
        digest = hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode())
        weights = r.weights if r.weights in ("hub", "random", "pypi") else "file"
        parts = [f"s{r.image_size}" + (f"c{r.crop}" if r.crop else ""),
                 "l" + ".".join(str(x) for x in r.layers), str(r.normalize), weights,
                 digest.hexdigest()[:8]]
        if r.augment:
            parts.insert(-1, f"aug{r.augment}")
        return "-".join(parts)
