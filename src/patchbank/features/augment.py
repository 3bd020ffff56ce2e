"""Offline augmentation of training images at extraction (``--augment N``).

Each training image gets ``N`` seeded augmented copies, made from its resized (S, S, 3) uint8
pixels (what the image cache holds) and added to the **train** bank only. A copy applies the
spec's ops in the order given; every random choice comes from a generator seeded with
(:data:`SEED`, the image's row, the copy number), so a copy does not depend on the batch size,
the worker count or whether the pixels came from the cache. Ops (``augment_ops``):

- ``flip``: horizontal and vertical flip, each with probability 0.5;
- ``rot90``: a random multiple of 90 degrees;
- ``dihedral``: copy k is the k-th of the 7 non-identity elements of the square's symmetry group
  (rotations by 90/180/270 degrees, each with and without a horizontal flip; cycles after 7);
- ``rot8``: AnomalyDINO's rotations: copy k is rotated by 45 * k degrees (k mod 8, so 7 copies
  give 45..315) about the centre, bilinear, the corners filled by reflection without repeating
  the edge (its reference code's ``cv2.warpAffine`` with ``BORDER_DEFAULT`` = reflect-101);
- ``scale``: zoom by 0.9-1.1 about the centre (a zoom-out is padded by reflection);
- ``blur``: Gaussian blur, radius 0-1 px (at 224 px; scaled with S);
- ``noise``: Gaussian pixel noise, sigma 0-5 grey levels;
- ``jitter``: colour jitter, brightness/contrast/saturation/hue 0.1
  (:func:`patchbank.data.shapes.colour_jitter`).

The default (:data:`DEFAULT_OPS`) keeps the orientation (flips and rotations turn some normal
parts into defects, e.g. MVTec's metal_nut ``flip``); ask for ``flip``/``rot90``/``rot8`` when
the product has no preferred orientation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from patchbank.core.errors import PatchbankError
from patchbank.data.shapes import colour_jitter

SEED = 0xA06
OPS: tuple[str, ...] = ("flip", "rot90", "dihedral", "rot8", "scale", "blur", "noise", "jitter")
DEFAULT_OPS = "scale,blur,noise,jitter"
#: Extra bank CSV columns of an augmented train bank: ``augment`` (0 for the image itself, k for
#: its k-th copy) and ``augment_of`` (the bank row of the image a copy was made from).
AUGMENT_COLUMNS = ["augment", "augment_of"]


def parse_ops(ops: str | None) -> tuple[str, ...]:
    """``"flip,rot8"`` -> ``("flip", "rot8")``; None -> the default; unknown names refused."""
    names = tuple(o.strip() for o in (ops or DEFAULT_OPS).split(",") if o.strip())
    bad = [o for o in names if o not in OPS]
    if bad or not names:
        raise PatchbankError(f"--augment-ops {ops!r}: choose a comma list of {', '.join(OPS)}")
    return names


def _dihedral(arr: np.ndarray, k: int) -> np.ndarray:
    element = 1 + (k - 1) % 7  # 1..7: never the identity
    out = np.rot90(arr, element % 4, axes=(0, 1))
    return out[:, ::-1] if element >= 4 else out


def _rotate_reflect(arr: np.ndarray, angle: float) -> np.ndarray:
    """``arr`` rotated counter-clockwise by ``angle`` degrees about its centre (bilinear), the
    corners filled by reflect-101: rotate a symmetrically reflect-padded copy, crop it back."""
    h, w = arr.shape[:2]
    pad = int(np.ceil(0.21 * max(h, w))) + 2  # (sqrt(2) - 1) / 2 of the side covers 45 degrees
    widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2)
    big = np.pad(arr, widths, mode="reflect")
    turned = np.asarray(Image.fromarray(np.ascontiguousarray(big)).rotate(
        angle, resample=Image.Resampling.BILINEAR))
    return turned[pad:pad + h, pad:pad + w]


def augment_image(pixels: np.ndarray, ops: Sequence[str], row: int, copy: int) -> np.ndarray:
    """Copy ``copy`` (1-based) of the (S, S, 3) uint8 image of bank row ``row``."""
    rng = np.random.default_rng([SEED, int(row), int(copy)])
    arr = np.asarray(pixels, dtype=np.uint8)
    size = arr.shape[0]
    for op in ops:
        if op == "flip":
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            if rng.random() < 0.5:
                arr = arr[::-1]
        elif op == "rot90":
            arr = np.rot90(arr, int(rng.integers(4)), axes=(0, 1))
        elif op == "dihedral":
            arr = _dihedral(arr, copy)
        elif op == "rot8":
            angle = 45.0 * (copy % 8)
            if angle:
                arr = _rotate_reflect(arr, angle)
        elif op == "scale":
            s = rng.uniform(0.9, 1.1)
            new = max(1, round(size * s))
            img = Image.fromarray(np.ascontiguousarray(arr)).resize(
                (new, new), Image.Resampling.BILINEAR)
            big = np.asarray(img)
            if new >= size:
                off = (new - size) // 2
                arr = big[off:off + size, off:off + size]
            else:
                before = (size - new) // 2
                pad = ((before, size - new - before), (before, size - new - before), (0, 0))
                arr = np.pad(big, pad, mode="reflect")
        elif op == "blur":
            radius = rng.uniform(0.0, 1.0) * size / 224
            arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).filter(
                ImageFilter.GaussianBlur(radius)))
        elif op == "noise":
            sigma = rng.uniform(0.0, 5.0)
            noisy = arr.astype(np.float64) + rng.normal(0.0, sigma, size=arr.shape)
            arr = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        elif op == "jitter":
            arr = colour_jitter(np.ascontiguousarray(arr), rng, 0.1)
        else:  # parse_ops refuses these
            raise PatchbankError(f"unknown augmentation op {op!r}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


class Augmenter:
    """Expands a batch of original images into originals + ``n`` copies each, interleaved:
    bank row ``i * (1 + n)`` is image ``i``, the next ``n`` rows its copies, so consecutive
    batches stay consecutive rows (the bank writer streams them)."""

    def __init__(self, n: int, ops: str | None = None) -> None:
        if n < 1:
            raise PatchbankError(f"--augment {n}: give a positive number of copies")
        self.n = int(n)
        self.ops = parse_ops(ops)

    def rows(self, n_images: int) -> int:
        """Bank rows for ``n_images`` originals."""
        return n_images * (1 + self.n)

    def expand(self, pixels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) originals of images ``indices`` (consecutive) -> (B * (1 + n), S, S, 3)
        and their bank rows."""
        out = []
        for img, i in zip(pixels, indices, strict=True):
            out.append(np.asarray(img))
            out.extend(augment_image(img, self.ops, int(i), k) for k in range(1, self.n + 1))
        first = int(indices[0]) * (1 + self.n)
        return np.stack(out), np.arange(first, first + len(out))

    def meta_columns(self, n_images: int) -> dict[str, list[int]]:
        """The :data:`AUGMENT_COLUMNS` for ``n_images`` originals, in bank row order."""
        copies = np.tile(np.arange(1 + self.n), n_images)
        of = np.repeat(np.arange(n_images) * (1 + self.n), 1 + self.n)
        return {"augment": copies.tolist(), "augment_of": of.tolist()}

    def describe(self) -> str:
        return f"{self.n} copies ({','.join(self.ops)})"


__all__ = ["AUGMENT_COLUMNS", "Augmenter", "DEFAULT_OPS", "OPS", "augment_image", "parse_ops"]
