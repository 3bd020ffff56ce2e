"""Dataset layer: discover MVTec AD-layout folders, decode images and masks, build transforms.

Layout (MVTec AD or any custom dataset laid out the same way)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect_type>/*.png           # "good" = defect-free
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   # optional

Without a ``ground_truth/`` folder a category still works for image-level results
(``Sample.mask_path`` is None and :func:`has_masks` is False).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from patchbank.core.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
SPLITS = ("train", "test")
LAYOUT_HINT = "expected MVTec layout <root>/<category>/train/good/*.png"

# What PIL raises on corrupt, truncated or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    """One image of a category: where it is, its split, defect type, label and mask."""

    path: Path
    category: str
    split: str  # "train" | "test"
    defect_type: str  # "good" or the defect folder name
    label: int  # 0 good, 1 defective
    mask_path: Path | None


# --------------------------------------------------------------------------- discovery


def _is_image(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (path.suffix.lower() in IMAGE_EXTENSIONS)
    )


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by file name."""
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: data root missing or not a folder; {LAYOUT_HINT} — check --data-root"
        )
    return root


def list_categories(root: Path) -> list[str]:
    """Sorted names of the folders under ``root`` that contain ``train/good``."""
    root = _check_root(root)
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "train" / GOOD).is_dir()
    )


def resolve_categories(root: Path, category: str) -> list[str]:
    """Expand ``"all"``, one name or a comma-separated list into validated category names."""
    available = list_categories(root)
    if not available:
        raise DatasetError(
            f"{root}: no category folders with train/good found; {LAYOUT_HINT} — check --data-root"
        )
    if category.strip().lower() == "all":
        return available
    names = list(dict.fromkeys(c.strip() for c in category.split(",") if c.strip()))
    if not names:
        raise DatasetError(
            f"{root}: empty category {category!r}; choose 'all' or one of: {', '.join(available)}"
        )
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DatasetError(
            f"{Path(root) / unknown[0]}: unknown category {unknown[0]!r} (no train/good folder); "
            f"choose 'all' or one of: {', '.join(available)}"
        )
    return names


def has_masks(root: Path, category: str) -> bool:
    """True when the category has a ``ground_truth/`` folder (pixel-level evaluation possible)."""
    return (Path(root) / category / "ground_truth").is_dir()


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map image stem -> mask file for ``<stem>_mask.<ext>`` files in ``folder`` (png first)."""
    if not folder.is_dir():
        return {}
    index: dict[str, Path] = {}
    masks = sorted(
        (p for p in folder.iterdir() if _is_image(p) and p.stem.endswith("_mask")),
        key=lambda p: (p.suffix.lower() != ".png", p.name),
    )
    for p in masks:
        index.setdefault(p.stem[: -len("_mask")], p)
    return index


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a missing or undecodable image file into a one-line DatasetError naming it."""
    try:
        yield
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file missing — check the dataset folder") from err
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"{path}: cannot read image ({type(err).__name__}: {_one_line(err)}): "
            "re-download or remove it"
        ) from err


def header_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file header only (no pixel decode)."""
    with _reading(path), Image.open(path) as img:
        return img.size


def _test_samples(ddir: Path, category: str, gt_dir: Path, with_masks: bool) -> list[Sample]:
    """The test samples of one ``test/<defect_type>`` folder, each defective image's mask found
    and size-checked when the category has ``ground_truth/``."""
    images = _images_in(ddir)
    if not images:
        raise DatasetError(
            f"{ddir}: folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "add images or remove the folder"
        )
    defect = ddir.name
    label = 0 if defect == GOOD else 1
    masks = _mask_index(gt_dir / defect) if label == 1 and with_masks else {}
    samples: list[Sample] = []
    for img in images:
        mask: Path | None = None
        if label == 1 and with_masks:
            mask = masks.get(img.stem)
            if mask is None:
                expected = gt_dir / defect / f"{img.stem}_mask.png"
                raise DatasetError(
                    f"{expected}: mask missing for defective image {img}; add the mask "
                    "or remove the ground_truth folder for image-level results only"
                )
            img_size, mask_size = header_size(img), header_size(mask)
            if img_size != mask_size:
                raise DatasetError(_size_message(mask, mask_size, img_size))
        samples.append(Sample(img, category, "test", defect, label, mask))
    return samples


def discover(root: Path, category: str, split: str) -> list[Sample]:
    """List the samples of one split, sorted by (defect_type, file name), validating the layout.

    For the test split every defective image must have a mask of the same size when the
    category has ``ground_truth/`` (sizes are read from file headers only).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = _check_root(root)
    cat_dir = root / category
    if not cat_dir.is_dir():
        available = list_categories(root)
        raise DatasetError(
            f"{cat_dir}: unknown category {category!r}; available: "
            f"{', '.join(available) if available else '(none)'} — check --category/--data-root"
        )
    train_good = cat_dir / "train" / GOOD
    if not train_good.is_dir():
        raise DatasetError(f"{train_good}: missing; {LAYOUT_HINT} — check --data-root")

    if split == "train":
        images = _images_in(train_good)
        if not images:
            raise DatasetError(
                f"{train_good}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add defect-free training images"
            )
        samples = [Sample(p, category, "train", GOOD, 0, None) for p in images]
        logger.debug("%s/train: %d images", category, len(samples))
        return samples

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(
            f"{test_dir}: missing; expected MVTec layout <root>/<category>/test/<defect_type>/*.png"
            " — add test images"
        )
    defect_dirs = sorted(
        (p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not defect_dirs:
        raise DatasetError(
            f"{test_dir}: no <defect_type> folders; expected test/good/*.png and "
            "test/<defect_type>/*.png — add test images"
        )
    gt_dir = cat_dir / "ground_truth"
    with_masks = gt_dir.is_dir()
    samples = [s for ddir in defect_dirs for s in _test_samples(ddir, category, gt_dir, with_masks)]
    logger.debug(
        "%s/test: %d images (%d defective) in %d folders",
        category,
        len(samples),
        sum(s.label for s in samples),
        len(defect_dirs),
    )
    return samples


# --------------------------------------------------------------------------- decoding


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _size_message(mask: Path, mask_size: tuple[int, int], img_size: tuple[int, int]) -> str:
    return (
        f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image is "
        f"{img_size[0]}x{img_size[1]} (WxH); regenerate or resize the mask to the image size"
    )


def _open_decoded(path: Path) -> tuple[Image.Image, int | None]:
    """Fully decoded image of ``path`` and its declared bits per sample (TIFF), if any.

    Any failure becomes a one-line DatasetError naming the file.
    """
    path = Path(path)
    with _reading(path), Image.open(path) as img:
        img.load()
        return img.copy(), _declared_bits(img)


def _declared_bits(img: Image.Image) -> int | None:
    """Bits per sample declared by the file (TIFF tag 258), if any."""
    tag = getattr(img, "tag_v2", None)
    if tag is None:
        return None
    bits = tag.get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale integers of ``bits`` bit depth to 0..255 (rounding, not clipping)."""
    scale = (2**bits - 1) / 255.0
    out = np.rint(np.clip(arr.astype(np.float64), 0, 2**bits - 1) / scale)
    return out.astype(np.uint8)


def _high_depth_to_rgb(img: Image.Image, declared: int | None) -> Image.Image:
    """Grayscale 16/32-bit integer or float images -> 8-bit RGB by their bit depth."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray = _to_uint8(arr, 16)  # 65535 / 257 = 255
    elif img.mode == "I":
        if declared in (8, 16):
            bits = declared
        else:
            # 32-bit containers usually hold 16-bit data (e.g. TIFFs from 16-bit cameras)
            bits = 16 if arr.size == 0 or int(arr.max()) <= 65535 else 32
        gray = _to_uint8(arr, bits)
    else:  # "F": floats in [0, 1] or [0, 255]
        arr = np.nan_to_num(arr.astype(np.float64))
        peak = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        gray = np.rint(np.clip(arr / peak, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)))


def load_image(path: Path) -> Image.Image:
    """Fully decoded 8-bit RGB image.

    Grayscale, 16-bit (scaled by bit depth, e.g. /257 for ``I;16``), palette, alpha (dropped)
    and CMYK images all become 3-channel 8-bit. Unreadable files raise DatasetError.
    """
    img, declared_bits = _open_decoded(path)
    try:
        if img.mode == "RGB":
            return img
        if img.mode.startswith("I") or img.mode == "F":
            return _high_depth_to_rgb(img, declared_bits)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise DatasetError(
            f"{path}: cannot convert image mode {img.mode} to RGB ({_one_line(err)}): "
            "re-save it as 8-bit RGB or grayscale PNG"
        ) from err


def load_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (H, W) defect mask (nonzero = defect); ``size`` (W, H) must match if given."""
    path = Path(path)
    if size is not None:
        mask_size = header_size(path)
        if tuple(mask_size) != tuple(size):
            raise DatasetError(_size_message(path, mask_size, (int(size[0]), int(size[1]))))
    img, _ = _open_decoded(path)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
            arr = arr[..., :-1]
        return np.any(arr != 0, axis=2)
    return arr != 0


# --------------------------------------------------------------------------- hashing


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or absolute when it lies outside ``root``."""
    full = Path(path).resolve()
    try:
        return full.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return full.as_posix()


def files_hash(samples: Sequence[Sample], root: Path, masks: bool = True) -> str:
    """sha256 over sorted (relative path, size, mtime_ns) of the samples' images (and masks)."""
    paths = {s.path for s in samples}
    if masks:
        paths |= {s.mask_path for s in samples if s.mask_path is not None}
    rows: list[tuple[str, int, int]] = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError as err:
            raise DatasetError(f"{p}: file missing — dataset changed; re-run discovery") from err
        rows.append((relative_path(p, root), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256()
    for rel, size, mtime in sorted(rows):
        digest.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


class ImageDataset(Dataset):
    """(samples, transform) -> items ``(transform(image), index)``; run it in DataLoader workers.

    A bad image raises DatasetError naming the file.
    """

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.samples[index].path)), index


__all__ = [
    "GOOD",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Sample",
    "discover",
    "files_hash",
    "has_masks",
    "list_categories",
    "load_image",
    "load_mask",
    "relative_path",
    "resolve_categories",
]
