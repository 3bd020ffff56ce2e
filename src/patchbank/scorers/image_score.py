"""Image scores from anomaly maps: the rules a scorer's ``image_score`` parameter names.

Each pixel-level method scores an image as its official code does (the default of its
``image_score`` parameter); the others stay named alternatives:

- ``max_grid``: the maximum of the map on the feature grid (PatchCore's official
  ``PatchMaker.score``; DFR's maximum of its map);
- ``max_map``: the maximum of the map upsampled bilinearly (``align_corners=False``) to the
  model input and smoothed with the method's Gaussian (``map_sigma`` input pixels): the map the
  evaluation scores, at input resolution (PaDiM's official code, and anomalib's);
- ``topk_mean``: the mean of the largest cells of the grid (AnomalyDINO's ``mean_top1p``;
  the fraction is the method's own parameter);
- method-specific rules: ``pooled_knn`` (SPADE's image-level k-NN on pooled features).

The smoothing pads by replicating the border (scipy ``mode="nearest"``, ``truncate=4``), as the
evaluation does; the official PaDiM and PatchCore code reflect at the border (scipy's default),
which changes values only within about 4 sigma of the edge.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

#: rules shared by every pixel-level method (the base class applies the first two).
MAP_RULES = ("max_grid", "max_map", "topk_mean")
#: the stride of the finest tap assumed when a scorer is used on bare arrays without an
#: ``input_size`` (a CNN's stride-4 layer): the map is then upsampled 4x.
DEFAULT_STRIDE = 4
#: maps upsampled per batch (bounds memory at input resolution).
BATCH = 32


def upsample_smooth(maps: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """(N, h, w) maps resized bilinearly to ``size`` = (H, W) and smoothed with ``sigma`` pixels
    (in output pixels): (N, H, W) float32."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        for i in range(len(up)):
            up[i] = gaussian_filter(up[i], sigma=sigma, mode="nearest")
    return up


def smoothed_max(maps: np.ndarray, input_size: int | None, sigma: float) -> np.ndarray:
    """``max_map``: per image, the maximum of its map upsampled to the model input
    (``input_size`` rows; ``None``: ``DEFAULT_STRIDE`` times the grid's) and smoothed with
    ``sigma`` input pixels; (N,) float64."""
    maps = np.asarray(maps)
    n, h, w = maps.shape
    rows = int(input_size or DEFAULT_STRIDE * h)
    size = (rows, max(1, round(w * rows / h)))  # the input is square: so is the grid
    out = np.empty(n, dtype=np.float64)
    for lo in range(0, n, BATCH):
        up = upsample_smooth(maps[lo:lo + BATCH], size, sigma)
        out[lo:lo + len(up)] = up.reshape(len(up), -1).max(axis=1)
    return out


def grid_max(maps: np.ndarray) -> np.ndarray:
    """``max_grid``: per image, the maximum of its (h, w) map; (N,) float64."""
    maps = np.asarray(maps)
    return maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
