"""Anomaly maps <-> images: the one place that knows how a run's maps sit on the original images.

A map covers the model input: the whole image resized to ``image_size``, or with ``--crop`` the
centre ``crop`` x ``crop`` of it, i.e. the :func:`crop_box` of the original image. To compare a map
with an image or mask, that region of the original is taken at some output shape (original
resolution, or scaled so the longer side is at most ``max_side``: :func:`eval_shape`), and the
map is upsampled bilinearly to it and smoothed with the method's sigma (given at model-input
resolution) scaled to it (:func:`eval_sigma`). :func:`run_map` does all of that for image ``i``
of a run; the evaluate stage (metrics), the figures and the notebook all go through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchbank.core.errors import ScoresError
from patchbank.scorers.image_score import upsample_smooth
from patchbank.store.runs import ScoreRun, map_info_problems


def reroot(path: str, data_root: Path | None, category: str) -> Path:
    """``path`` as stored, or moved under ``data_root`` when the dataset now lives there."""
    p = Path(path)
    if data_root is None or p.exists():
        return p
    parts = p.parts
    if category in parts:
        i = len(parts) - 1 - parts[::-1].index(category)
        return Path(data_root, *parts[i:])
    return p


def crop_box(height: int, width: int, image_size: int, crop: int | None) -> tuple[slice, slice]:
    """Region of the original image that a centre crop of the resized input covers."""
    if not crop:
        return slice(0, height), slice(0, width)
    fy, fx = crop / image_size * height, crop / image_size * width
    y0, x0 = int(round((height - fy) / 2)), int(round((width - fx) / 2))
    return slice(y0, y0 + int(round(fy))), slice(x0, x0 + int(round(fx)))


def eval_shape(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """Output (H, W): as given, or scaled so the longer side is ``max_side`` (never enlarged)."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    f = max_side / max(height, width)
    return max(1, round(height * f)), max(1, round(width * f))


def upsample_map(amap: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Resize an (h, w) map to ``size`` = (H, W) bilinearly and smooth it with ``sigma`` pixels.

    ``sigma`` is in output pixels; callers scale a method's sigma (given at model-input
    resolution) by ``H / input_size`` so smoothing covers the same part of the object. The
    same operation as the scorers' ``max_map`` image score (``scorers.image_score``).
    """
    return upsample_smooth(np.asarray(amap)[None], size, sigma)[0]


def eval_sigma(map_sigma: float, eval_height: int, input_size: int) -> float:
    """Convert a smoothing sigma given at model-input resolution to evaluation resolution."""
    return float(map_sigma) * eval_height / float(input_size)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask at ``shape`` (bilinear, then >= 0.5); unchanged when already that shape."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    return upsample_map(mask.astype(np.float32), shape) >= 0.5


def run_map(run: ScoreRun, index: int, height: int, width: int, max_side: int | None = None,
            ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Map ``index`` of ``run`` on its image of original size ``height`` x ``width``.

    Returns ``(heatmap, box)``: ``box`` is the region of the original image the map covers
    (:func:`crop_box`; the whole image without ``--crop``), ``heatmap`` the map upsampled to
    that region at :func:`eval_shape` ``(region, max_side)`` and smoothed with the run's
    ``map_sigma`` scaled to it. Crop the image or mask with ``box`` and bring it to
    ``heatmap.shape`` to compare them pixel by pixel.

    Raises :class:`ScoresError` for an image-level run or a run whose ``run.json`` lacks (or has
    malformed) ``map_sigma``, ``input_size`` or ``image_size``.
    """
    if run.maps is None:
        raise ValueError("run has no anomaly maps (image-level method)")
    info = run.info
    problems = map_info_problems(info)
    if problems:
        raise ScoresError(f"{info.get('method', 'run')}: run.json of a pixel-level run is "
                          f"malformed ({', '.join(problems)}); re-score with --overwrite")
    ys, xs = crop_box(int(height), int(width), int(info["image_size"]), info.get("crop"))
    shape = eval_shape(len(range(int(height))[ys]), len(range(int(width))[xs]), max_side)
    sigma = eval_sigma(info["map_sigma"], shape[0], int(info["input_size"]))
    return upsample_map(run.maps[index], shape, sigma), (ys, xs)
