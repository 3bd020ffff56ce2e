"""Anomaly maps from feature grid to image resolution: bilinear upsampling, Gaussian smoothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def upsample_map(amap: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Resize an (h, w) map to ``size`` = (H, W) bilinearly and smooth it with ``sigma`` pixels.

    ``sigma`` is in output pixels; callers scale a method's sigma (given at model-input
    resolution) by ``H / input_size`` so smoothing covers the same part of the object.
    """
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    if sigma > 0:
        # truncate=4 (scipy's default) keeps the kernel at ~8 sigma wide, as PatchCore's blur does.
        up = gaussian_filter(up, sigma=sigma, mode="nearest")
    return up


def eval_sigma(map_sigma: float, eval_height: int, input_size: int) -> float:
    """Convert a smoothing sigma given at model-input resolution to evaluation resolution."""
    return float(map_sigma) * eval_height / float(input_size)
