"""AUPIMO: per-image overlap area under the curve (Bertoldo et al. 2024, arXiv 2401.01984).

Definition (matches anomalib's ``AUPIMO`` metric, ``anomalib.metrics.pimo``; own code):

* Images are *good* when their mask is empty (or ``None``) and *defective* otherwise.
* ``K`` thresholds (``num_thresholds``, anomalib's default 300 000) are spaced linearly between
  the lowest and the highest score of the good images' maps (float32, ascending).
* The shared FPR at threshold ``t`` is the mean over good images of each one's fraction of
  pixels with score >= ``t`` (with equal image sizes this is the pooled FPR of all good pixels).
* Each defective image's TPR at ``t`` is the fraction of its defect pixels with score >= ``t``.
* The integration range is the slice of thresholds between the one whose shared FPR is closest
  to ``fpr_bounds[1]`` and the one closest to ``fpr_bounds[0]`` (a warning when either is more
  than 1 % away from the bound). Points whose FPR is 0 are dropped. AUPIMO is the trapezoid area
  under TPR vs ln(FPR) over the points in that slice, divided by ln(upper / lower), clipped to
  [0, 1]: the mean TPR over the log-FPR range, 1 for a defect found at every pixel.
* Good images get NaN. ``aupimo`` is the mean over defective images.

Undefined cases (no good or no defective images, constant good maps, an FPR range the good
pixels cannot reach, 30 points or fewer in the range) give NaN with a logged warning, where
anomalib raises; fewer than 300 points only warns, as anomalib does.

Memory: each good image's map is copied to float32 and sorted on its own (so the peak extra is
one image, 4 bytes a pixel), and only ``K`` float64 FPR sums are kept; each defective image's
defect pixels are sorted and counted with ``searchsorted`` at the thresholds inside the range
only. No per-threshold masks are ever formed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from patchbank.core.errors import ScoresError

log = logging.getLogger(__name__)

#: anomalib's defaults: integration range and number of linearly spaced thresholds.
FPR_BOUNDS = (1e-5, 1e-4)
NUM_THRESHOLDS = 300_000
#: as anomalib: at most this many points in the range -> undefined; fewer than WARN_POINTS warns.
MIN_POINTS = 30
WARN_POINTS = 300


def _inputs(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
            fpr_bounds: tuple[float, float], num_thresholds: int) -> list[np.ndarray | None]:
    """Validated boolean masks (None for a good image); raises ScoresError on bad input."""
    if len(masks) != len(maps):
        raise ScoresError(f"AUPIMO: {len(masks)} masks but {len(maps)} maps; pass one mask "
                          "(empty or None for a good image) per anomaly map")
    if len(maps) == 0:
        raise ScoresError("AUPIMO: no masks/maps given; pass one mask and one map per image")
    lo, hi = fpr_bounds
    if not 0 < lo < hi <= 1:
        raise ScoresError(f"AUPIMO: fpr_bounds {fpr_bounds} must satisfy 0 < lower < upper <= 1")
    if int(num_thresholds) < 2:
        raise ScoresError(f"AUPIMO: num_thresholds={num_thresholds}; use at least 2")
    out: list[np.ndarray | None] = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        shape = np.shape(amap)
        if len(shape) != 2:
            raise ScoresError(f"AUPIMO: image {i}: anomaly map has shape {shape}, expected 2-D "
                              "(H, W); squeeze channel/batch axes before evaluating")
        if not np.isfinite(np.asarray(amap, dtype=np.float32)).all():
            raise ScoresError(f"AUPIMO: image {i}: anomaly map contains NaN or inf; fix the "
                              "scorer output before evaluating")
        if mask is None:
            out.append(None)
            continue
        if np.shape(mask) != shape:
            raise ScoresError(f"AUPIMO: image {i}: mask shape {np.shape(mask)} != map shape "
                              f"{shape}; resize the map to the mask resolution first")
        m = np.asarray(mask)
        m = m if m.dtype == bool else m != 0
        out.append(m if m.any() else None)
    return out


def _thresholds(good: list[np.ndarray], num_thresholds: int) -> np.ndarray | None:
    """Linearly spaced float32 thresholds over the good maps' score range (None if constant)."""
    lo = min(float(np.min(a)) for a in good)
    hi = max(float(np.max(a)) for a in good)
    if not lo < hi:
        return None
    return np.linspace(np.float32(lo), np.float32(hi), int(num_thresholds), dtype=np.float32)


def _ge_counts(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the (ascending) scores are >= each threshold."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def shared_fpr(good_maps: Sequence[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    """Mean over the good maps of each map's fraction of pixels with score >= each threshold."""
    total = np.zeros(thresholds.size, dtype=np.float64)
    for amap in good_maps:
        s = np.array(amap, dtype=np.float32).ravel()  # a copy: sorted in place
        s.sort()
        total += _ge_counts(s, thresholds) / s.size
        del s
    return total / len(good_maps)


def _range(fpr: np.ndarray, fpr_bounds: tuple[float, float]) -> tuple[int, int] | None:
    """Threshold indices (first, last) of the integration range, or None (warning logged)."""
    lo, hi = fpr_bounds
    if lo < fpr.min() or hi > fpr.max():
        log.warning("AUPIMO undefined: the good images' FPR spans [%.3g, %.3g], which does not "
                    "contain the range [%g, %g] (too few good pixels?); returning NaN",
                    fpr.min(), fpr.max(), lo, hi)
        return None
    first = int(np.argmin(np.abs(fpr - hi)))  # lower threshold = upper FPR
    last = int(np.argmin(np.abs(fpr - lo)))
    for bound, got in ((lo, fpr[last]), (hi, fpr[first])):
        if not np.isclose(got, bound, rtol=1e-2):
            log.warning("AUPIMO: FPR bound %g is only reached as %.4g (more than 1%% off); "
                        "raise num_thresholds", bound, got)
    if first >= last:
        log.warning("AUPIMO undefined: both FPR bounds %s fall on the same threshold; raise "
                    "num_thresholds; returning NaN", fpr_bounds)
        return None
    return first, last


def aupimo_scores(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                  fpr_bounds: tuple[float, float] = FPR_BOUNDS,
                  num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """AUPIMO of every image (NaN for good images), as in anomalib's ``AUPIMO``.

    ``masks`` and ``maps`` are the per-image lists of
    :func:`patchbank.stages.evaluate.masks_and_maps` (an empty mask or ``None`` = good image).
    Returns float64 values in [0, 1]; all NaN, with a logged reason, when undefined.
    """
    bool_masks = _inputs(masks, maps, fpr_bounds, num_thresholds)
    out = np.full(len(maps), np.nan)
    good = [a for m, a in zip(bool_masks, maps, strict=True) if m is None]
    defective = [i for i, m in enumerate(bool_masks) if m is not None]
    if not good or not defective:
        log.warning("AUPIMO undefined: %d good and %d defective images (needs both); "
                    "returning NaN", len(good), len(defective))
        return out
    thresholds = _thresholds(good, num_thresholds)
    if thresholds is None:
        log.warning("AUPIMO undefined: the good images' maps are constant; returning NaN")
        return out
    fpr = shared_fpr(good, thresholds)
    span = _range(fpr, fpr_bounds)
    if span is None:
        return out
    first, last = span
    thr = thresholds[first:last + 1][::-1]  # descending thresholds = ascending FPR
    log_fpr = np.log(fpr[first:last + 1][::-1])
    keep = np.isfinite(log_fpr)
    thr, log_fpr = thr[keep], log_fpr[keep]
    if thr.size <= MIN_POINTS:
        log.warning("AUPIMO undefined: only %d thresholds inside the FPR range %s; raise "
                    "num_thresholds; returning NaN", thr.size, fpr_bounds)
        return out
    if thr.size < WARN_POINTS:
        log.warning("AUPIMO may be inaccurate: only %d thresholds inside the FPR range %s; "
                    "raise num_thresholds", thr.size, fpr_bounds)
    norm = float(np.log(fpr_bounds[1] / fpr_bounds[0]))
    for i in defective:
        pos = np.asarray(maps[i], dtype=np.float32)[bool_masks[i]]
        pos.sort()
        tpr = _ge_counts(pos, thr) / pos.size
        out[i] = float(np.clip(np.trapezoid(tpr, log_fpr) / norm, 0.0, 1.0))
    log.debug("AUPIMO: %d points in the FPR range, %d defective images", thr.size,
              len(defective))
    return out


def aupimo(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
           fpr_bounds: tuple[float, float] = FPR_BOUNDS,
           num_thresholds: int = NUM_THRESHOLDS) -> float:
    """Mean AUPIMO over the defective images (NaN, with a logged reason, when undefined)."""
    scores = aupimo_scores(masks, maps, fpr_bounds, num_thresholds)
    valid = scores[~np.isnan(scores)]
    return float(valid.mean()) if valid.size else float("nan")
