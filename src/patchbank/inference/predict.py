"""Score new images with a loaded run: the extract stage's feature path, then the fitted scorer.

Features are computed exactly as the extract stage computes banks — decode
(:func:`patchbank.data.mvtec.load_image`), resize to uint8 (:meth:`Preprocess.resize`),
crop/normalise on the device (:meth:`Preprocess.batch`), ``model.grids``, rounding to float16
as the bank stores them, (B, h, w, C) per tap — so a test image of the run gets the score and
map that ``image_scores.csv`` and ``maps.npz`` hold (tested). Decoding runs in DataLoader
workers for batches of files; CUDA with autocast (as the extract stage) when present.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from patchbank.core.errors import DatasetError, PatchbankError
from patchbank.data.mvtec import IMAGE_EXTENSIONS, load_image
from patchbank.evaluation.heatmap import place_map
from patchbank.features.preprocess import Preprocess
from patchbank.inference.model import RunModel, Threshold

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray
ANOMALOUS, GOOD = "anomalous", "good"
#: matplotlib colour map of the overlays (as the evaluate stage's heatmap figures).
OVERLAY_CMAP = "jet"


@dataclass
class Prediction:
    """One image's result. ``heatmap`` covers ``box`` of the image (all of it without crop)."""

    source: str
    index: int
    score: float
    threshold: Threshold
    seconds: float
    height: int
    width: int
    grid_map: np.ndarray | None = None  # (h, w) float32 on the feature grid (as maps.npz)
    heatmap: np.ndarray | None = None  # smoothed, at image resolution (or max_side)
    box: tuple[slice, slice] | None = None
    pixel_threshold: Threshold | None = None
    mask: np.ndarray | None = None  # heatmap >= pixel threshold
    image: np.ndarray | None = None  # decoded (H, W, 3) uint8 when keep_images
    error: str | None = None  # the image could not be read (on_error="skip")

    @property
    def anomalous(self) -> bool:
        return self.error is None and self.score >= self.threshold.value

    @property
    def decision(self) -> str:
        return "error" if self.error is not None else ANOMALOUS if self.anomalous else GOOD

    def row(self) -> dict[str, Any]:
        """The prediction table's row (see ``scripts/predict.py``)."""
        row: dict[str, Any] = {
            "path": self.source, "score": self.score, "decision": self.decision,
            "threshold": self.threshold.value, "threshold_kind": self.threshold.kind,
            "seconds": round(self.seconds, 4),
        }
        if self.pixel_threshold is not None:
            row.update(pixel_threshold=self.pixel_threshold.value,
                       pixel_threshold_kind=self.pixel_threshold.kind,
                       defect_fraction=float(self.mask.mean()) if self.mask is not None
                       else math.nan)
        if self.error is not None:
            row["error"] = self.error
        return row


# --------------------------------------------------------------------------- inputs


def list_images(spec: str | Path) -> list[Path]:
    """Image files named by a file, a folder (recursively) or a glob pattern, sorted."""
    text = str(spec)
    path = Path(text).expanduser()
    if any(c in text for c in "*?["):
        anchor = Path(path.anchor) if path.is_absolute() else Path(".")
        pattern = str(path.relative_to(anchor)) if path.is_absolute() else text
        found = sorted(p for p in anchor.glob(pattern) if p.is_file())
        what = f"pattern {text!r}"
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        what = f"folder {path}"
    elif path.is_file():
        return [path]
    else:
        raise DatasetError(f"{path}: no such file or folder; pass --images FILE, DIR or a "
                           "quoted glob like 'imgs/*.png'")
    images = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS
              and not p.name.startswith(".")]
    if not images:
        raise DatasetError(f"{what}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _name(item: ImageInput, index: int) -> str:
    if isinstance(item, str | Path):
        return str(item)
    return str(getattr(item, "filename", "") or f"<image {index}>")


def _decode(item: ImageInput) -> Image.Image:
    if isinstance(item, str | Path):
        return load_image(Path(item))
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise DatasetError(f"in-memory image of shape {arr.shape} and dtype {arr.dtype}: pass "
                           "(H, W, 3) uint8 RGB pixels, a PIL image or a file path")
    return Image.fromarray(arr)


class _Images(Dataset):
    """Items ``(uint8 (S, S, 3) pixels, index, height, width, image or None, error or None)``;
    a bad image becomes an error message, not an exception, so one file cannot stop a batch."""

    def __init__(self, items: Sequence[ImageInput], preprocess: Preprocess,
                 keep_images: bool) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.keep_images = keep_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple:
        size = self.preprocess.image_size
        try:
            img = _decode(self.items[index])
        except DatasetError as err:
            return torch.zeros(size, size, 3, dtype=torch.uint8), index, 0, 0, None, str(err)
        pixels = self.preprocess.resize(img)
        kept = np.asarray(img) if self.keep_images else None
        return pixels, index, img.height, img.width, kept, None


def _collate(batch: list[tuple]) -> tuple:
    pixels, index, height, width, images, errors = zip(*batch, strict=True)
    return torch.stack(pixels), list(index), list(height), list(width), list(images), \
        list(errors)


def default_workers(n_images: int, batch_size: int) -> int:
    """Decode workers: none for a single batch (a worker's start costs more than it saves),
    else the extract stage's choice (cores - 1, at most 8)."""
    if n_images <= batch_size:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1, math.ceil(n_images / batch_size)))


def _batches(dataset: _Images, batch_size: int, workers: int, device: torch.device) -> Iterator:
    if workers == 0:
        for lo in range(0, len(dataset), batch_size):
            yield _collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
        return
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4)
    # Fork the workers while torch's OpenMP pool is single-threaded (as the extract stage):
    # forking a process whose pool has several threads can deadlock the workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = iter(loader)
    finally:
        torch.set_num_threads(threads)
    yield from batches


def features(model: RunModel, pixels: torch.Tensor) -> dict[int, np.ndarray]:
    """Taps of a (B, S, S, 3) uint8 batch, as the bank stores them: ``{layer: (B, h, w, C)
    float16}`` (the extract stage's exact path)."""
    device = model.device
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode():
        images = model.preprocess.batch(pixels.to(device, non_blocking=True))
        with amp:
            grids = model.extractor.grids(images)
        taps = [t.half().permute(0, 2, 3, 1).contiguous().cpu().numpy() for t in grids]
    return dict(zip(model.layers, taps, strict=True))


def iter_predict(
    model: RunModel,
    images: Sequence[ImageInput],
    *,
    threshold: str | float | Threshold = "auto",
    pixel_threshold: str | float | Threshold | None = None,
    maps: bool = False,
    max_side: int | None = None,
    keep_images: bool = False,
    batch_size: int = 16,
    num_workers: int | None = None,
    on_error: str = "raise",
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Prediction]:
    """Predictions for ``images`` (paths, PIL images or uint8 RGB arrays), in order.

    ``threshold``: "auto" | "f1" | a number (:meth:`RunModel.image_threshold`).
    ``maps``: also place each map on its image (``heatmap`` at original resolution, or longer
    side ``max_side``). ``pixel_threshold`` ("auto" | "oracle" | a number | None): with
    ``maps``, the binary ``mask`` = heatmap >= it (pixel-level runs only). ``keep_images``:
    return the decoded pixels too (for overlays). ``on_error``: "raise" stops at the first
    unreadable image with its one-line DatasetError; "skip" yields a Prediction with ``error``
    set instead. ``progress(done, total)`` is called after each batch. ``seconds`` per image is
    its share of its batch's wall time (decode wait, forward, scoring) plus its own heatmap.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise PatchbankError(f"--batch-size {batch_size}: must be at least 1")
    thr = model.image_threshold(threshold)
    pix = None
    if maps and model.pixel_level and pixel_threshold is not None:
        pix = model.pixel_threshold(pixel_threshold)
    items = list(images)
    if not items:
        return
    workers = default_workers(len(items), batch_size) if num_workers is None else num_workers
    dataset = _Images(items, model.preprocess, keep_images)
    done = 0
    batches = _batches(dataset, batch_size, workers, model.device)
    while True:
        t0 = time.perf_counter()
        try:
            pixels, index, height, width, kept, errors = next(batches)
        except StopIteration:
            break
        ok = [k for k, e in enumerate(errors) if e is None]
        if on_error == "raise" and len(ok) < len(errors):
            raise DatasetError(next(e for e in errors if e is not None))
        scores = grid_maps = None
        if ok:
            taps = features(model, pixels[ok] if len(ok) < len(errors) else pixels)
            scores, grid_maps = model.scorer.score(taps)
        share = (time.perf_counter() - t0) / max(1, len(ok))
        position = {k: j for j, k in enumerate(ok)}
        for k, i in enumerate(index):
            if errors[k] is not None:
                yield Prediction(source=_name(items[i], i), index=i, score=math.nan,
                                 threshold=thr, seconds=0.0, height=0, width=0, error=errors[k])
                continue
            t1 = time.perf_counter()
            j = position[k]
            pred = Prediction(source=_name(items[i], i), index=i, score=float(scores[j]),
                              threshold=thr, seconds=share, height=int(height[k]),
                              width=int(width[k]), image=kept[k])
            if grid_maps is not None:
                pred.grid_map = grid_maps[j]
                if maps:
                    pred.heatmap, pred.box = place_map(grid_maps[j], model.info.geometry, height[k],
                                                       width[k], max_side)
                    if pix is not None:
                        pred.pixel_threshold = pix
                        pred.mask = pred.heatmap >= pix.value
            pred.seconds += time.perf_counter() - t1
            yield pred
        done += len(index)
        if progress is not None:
            progress(done, len(items))


def predict(model: RunModel, images: Sequence[ImageInput], **kwargs: Any) -> list[Prediction]:
    """:func:`iter_predict` as a list (same arguments)."""
    return list(iter_predict(model, images, **kwargs))


# --------------------------------------------------------------------------- overlays


def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The ``width``-pixel inner border of a boolean mask."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    return mask & ~binary_erosion(mask, iterations=max(1, int(width)), border_value=0)


def overlay(image: np.ndarray, heatmap: np.ndarray | None, box: tuple[slice, slice] | None = None,
            value_range: tuple[float, float] | None = None, alpha: float = 0.5,
            mask: np.ndarray | None = None, cmap: str = OVERLAY_CMAP,
            outline: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The image with the heatmap blended on ``box`` (opacity ``alpha``) and the defect mask's
    outline drawn; (H, W, 3) uint8. ``heatmap``/``mask`` have the box's shape (as predicted);
    ``value_range`` (vmin, vmax) fixes the colour scale (default: the heatmap's own range)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if heatmap is None:
        return out
    ys, xs = box if box is not None else (slice(0, out.shape[0]), slice(0, out.shape[1]))
    region = out[ys, xs]
    if region.shape[:2] != heatmap.shape:
        region = np.asarray(Image.fromarray(region).resize(heatmap.shape[::-1],
                                                           Image.Resampling.BILINEAR))
    lo, hi = value_range if value_range is not None else (float(np.nanmin(heatmap)),
                                                          float(np.nanmax(heatmap)))
    hi = hi if hi > lo else lo + 1e-12
    idx = np.clip((heatmap - lo) * (255.0 / (hi - lo)), 0, 255)
    colour = _lut(cmap)[np.nan_to_num(idx).astype(np.uint8)]
    a = float(np.clip(alpha, 0.0, 1.0))
    blended = (region.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a)
    blended = blended.round().astype(np.uint8)
    if mask is not None and mask.any():
        width = max(1, round(max(heatmap.shape) / 300))
        blended[mask_outline(mask, width)] = outline
    if blended.shape[:2] != out[ys, xs].shape[:2]:
        blended = np.asarray(Image.fromarray(blended).resize(
            (out[ys, xs].shape[1], out[ys, xs].shape[0]), Image.Resampling.BILINEAR))
    out[ys, xs] = blended
    return out


def prediction_overlay(model: RunModel, pred: Prediction, alpha: float = 0.5,
                       image: np.ndarray | None = None) -> np.ndarray:
    """:func:`overlay` of a prediction (its kept image, or ``image``, or its file re-read)."""
    if image is None:
        image = pred.image
    if image is None:
        image = np.asarray(load_image(Path(pred.source)))
    return overlay(image, pred.heatmap, pred.box, model.map_range, alpha, pred.mask)
