"""Exact evaluation metrics following the official MVTec AD protocol.

Image level: AUROC, AP, best F1 (oracle threshold), precision/recall/F1 at a given threshold and
the unsupervised mean + n·σ threshold of held-out train scores (scikit-learn does the counting).

Pixel level: AUROC, AP, best Dice (= best pixel F1 over all thresholds) and PRO (per-region
overlap integrated up to FPR 0.3, as in MVTec's ``generic_util.compute_pro``), all exact — every
distinct score is a threshold and tied scores are handled together.

How the pixel metrics stay fast and small. Every metric only needs, for each threshold ``t``, the
counts of defect-free pixels (negatives) and of defect pixels (positives) with score >= t, plus
the per-region overlaps. So :func:`pixel_metrics` makes one pass over the images that copies
the negative scores into one float32 array and sorts it in place (no index array), and
argsorts the few positive pixels together with their region ids. That shared sort of all pixels
serves all four metrics:

* TP and the per-region overlap change only at distinct positive scores; FP counts there come from
  ``searchsorted`` into the sorted negatives (integer counts, no float64 copy of every pixel).
* AUROC is the tie-aware Mann-Whitney statistic; AP and best F1 are sums/maxima over the
  distinct positive scores (the only thresholds where recall changes, and the only
  candidates for the F1 optimum). Both are identical to scikit-learn's definitions.
* The PRO curve between two consecutive distinct positive scores is horizontal (PRO constant
  while FPR grows), so the curve through all distinct thresholds is the same polyline as the
  one through two points per distinct positive score ``v``: (FPR(> v), PRO before v) and
  (FPR(>= v), PRO(>= v)). Its area up to ``max_fpr`` (linear interpolation at exactly
  ``max_fpr``) is therefore identical to the official per-threshold computation.

Memory: 4 bytes per defect-free pixel (the float32 copy of the negatives, sorted in place) plus
at most about 80 bytes per defect pixel (scores, region ids, argsort order, per-threshold
counts; less when scores tie), on top of the caller's maps and per-image temporaries. Measured
with ``scripts/bench_metrics.py`` on 2 CPU cores: MVTec bottle at 900x900 (83 images, 67M
pixels, 3.9M defect) takes 1.3 s and +0.49 GiB peak RSS; the same images three times (202M
pixels, more than the largest MVTec AD category) 6.3 s and +1.0 GiB.

Scores are compared at float32 precision (maps are cast to float32). Undefined metrics (a
single class, no defect pixels, no defect-free pixels) are NaN with a logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from tqdm.auto import tqdm

from patchbank.core.errors import ScoresError

log = logging.getLogger(__name__)

_NAN = float("nan")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def _image_inputs(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (bool labels, float64 scores)."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ScoresError(f"labels ({y.size}) and scores ({s.size}) differ in length; "
                          "pass one label and one score per test image")
    if y.size == 0:
        raise ScoresError("no image labels/scores given; pass one label and one score per image")
    if np.isnan(s).any():
        raise ScoresError(f"image scores contain NaN (first at index {int(np.isnan(s).argmax())})"
                          "; fix the scorer output before evaluating")
    return y != 0, s


def _two_classes(y: np.ndarray, what: str) -> bool:
    """True when both classes are present; logs a warning otherwise."""
    if y.all() or not y.any():
        log.warning("%s undefined: labels contain only one class; returning NaN", what)
        return False
    return True


def image_auroc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Image-level ROC AUC (labels: nonzero = defective; higher score = more anomalous)."""
    y, s = _image_inputs(labels, scores)
    return float(roc_auc_score(y, s)) if _two_classes(y, "image AUROC") else _NAN


def image_ap(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Image-level average precision (scikit-learn's step-wise definition)."""
    y, s = _image_inputs(labels, scores)
    return float(average_precision_score(y, s)) if _two_classes(y, "image AP") else _NAN


def best_f1(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
            ) -> tuple[float, float, float, float]:
    """(f1, threshold, precision, recall) at the F1-optimal threshold (score >= threshold).

    The threshold is chosen on these very scores, so this is an oracle figure. Among equal F1
    values the lowest threshold wins.
    """
    y, s = _image_inputs(labels, scores)
    if not _two_classes(y, "best F1"):
        return _NAN, _NAN, _NAN, _NAN
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # last point (P=1, R=0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i]), float(precision[i]), float(recall[i])


def threshold_metrics(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                      threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of the rule ``score >= threshold``.

    Returns keys precision, recall, f1, threshold; precision is 0 when nothing is predicted
    defective and recall is NaN when there are no defective images.
    """
    y, s = _image_inputs(labels, scores)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    n_pred, n_pos = int(np.count_nonzero(pred)), int(np.count_nonzero(y))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_pos if n_pos else _NAN
    f1 = 2 * tp / (n_pred + n_pos) if n_pred + n_pos else _NAN
    return {"precision": precision, "recall": recall, "f1": f1, "threshold": float(threshold)}


def unsupervised_threshold(train_scores: Sequence | np.ndarray, n_sigma: float = 3.0) -> float:
    """mean + n_sigma * std (sample std, ddof=1) of scores of held-out defect-free images."""
    s = np.asarray(train_scores, dtype=np.float64).ravel()
    if s.size < 2 or not np.isfinite(s).all():
        raise ScoresError(f"unsupervised threshold needs >= 2 finite held-out train scores, got "
                          f"{s.size} (finite: {int(np.isfinite(s).sum())}); hold out more "
                          "train images when scoring")
    return float(s.mean() + n_sigma * s.std(ddof=1))


def composite_scores(image_auroc: float, image_ap: float, pixel_auroc: float,
                     best_dice: float) -> dict[str, float]:
    """image_score, pixel_score and overall_score (plain means of the given metrics).

    image_score = mean(image AUROC, image AP); pixel_score = mean(pixel AUROC, best Dice);
    overall_score = mean(image_score, pixel_score). A NaN pixel part (image-only method, dataset
    without masks) makes pixel_score NaN and, deliberately, overall_score NaN too: an overall
    score made of image metrics alone would not be comparable with full ones.
    """
    image_score = (float(image_auroc) + float(image_ap)) / 2
    pixel_score = (float(pixel_auroc) + float(best_dice)) / 2
    return {"image_score": image_score, "pixel_score": pixel_score,
            "overall_score": (image_score + pixel_score) / 2}


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    """Counts at the distinct positive scores (ascending), shared by all pixel metrics."""

    n_neg: int
    n_pos: int
    n_regions: int
    values: np.ndarray  # distinct positive scores, ascending (float32)
    count: np.ndarray  # positives with exactly that score
    tp_ge: np.ndarray  # positives with score >= value
    fp_ge: np.ndarray  # negatives with score >= value
    fp_gt: np.ndarray  # negatives with score > value
    pro_ge: np.ndarray  # mean region overlap at threshold = value


def _gather(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
            progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted negatives, positive scores, positive region ids, region sizes."""
    if len(masks) != len(maps):
        raise ScoresError(f"{len(masks)} masks but {len(maps)} maps; pass one mask "
                          "(None for a good image) per anomaly map")
    if len(maps) == 0:
        raise ScoresError("no masks/maps given; pass one mask and one anomaly map per image")
    bool_masks: list[np.ndarray | None] = []
    n_neg = 0
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        shape = np.shape(amap)
        if len(shape) != 2:
            raise ScoresError(f"image {i}: anomaly map has shape {shape}, expected 2-D (H, W); "
                              "squeeze channel/batch axes before evaluating")
        if mask is None:
            bool_masks.append(None)
            n_neg += int(np.prod(shape))
            continue
        if np.shape(mask) != shape:
            raise ScoresError(f"image {i}: mask shape {np.shape(mask)} != map shape {shape}; "
                              "resize the anomaly map to the mask resolution before evaluating")
        m = np.asarray(mask)
        m = m if m.dtype == bool else m != 0
        bool_masks.append(m)
        n_neg += int(m.size - np.count_nonzero(m))

    neg = np.empty(n_neg, dtype=np.float32)
    pos_scores: list[np.ndarray] = []
    pos_regions: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    offset = n_regions = 0
    items = zip(bool_masks, maps, strict=True)
    for i, (m, amap) in enumerate(tqdm(items, total=len(maps), desc="pixel metrics",
                                       leave=False, disable=not progress)):
        a = np.asarray(amap, dtype=np.float32)
        if np.isnan(a).any():
            raise ScoresError(f"image {i}: anomaly map contains NaN; fix the scorer output "
                              "before evaluating")
        if m is None or not m.any():
            neg[offset:offset + a.size] = a.ravel()
            offset += a.size
            continue
        n = int(m.size - np.count_nonzero(m))
        neg[offset:offset + n] = a[~m]
        offset += n
        labels, k = ndimage.label(m, structure=_EIGHT_CONNECTED)
        lab = labels[m]
        pos_scores.append(a[m])
        pos_regions.append((lab - 1 + n_regions).astype(np.int32))
        sizes.append(np.bincount(lab, minlength=k + 1)[1:])
        n_regions += k
    neg.sort()
    if not pos_scores:
        return neg, np.empty(0, np.float32), np.empty(0, np.int32), np.empty(0, np.int64)
    return neg, np.concatenate(pos_scores), np.concatenate(pos_regions), np.concatenate(sizes)


def _counts(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
            progress: bool) -> _Counts:
    """One pass over the images: the counts every pixel metric is computed from."""
    neg, pos, regions, sizes = _gather(masks, maps, progress)
    n_neg, n_pos = neg.size, pos.size
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    regions = regions[order]
    del order
    # weight of a positive pixel in the PRO average: 1 / (n_regions * its region's size)
    weights = (1.0 / (len(sizes) * sizes.astype(np.float64)))[regions] if n_pos else pos
    del regions
    # suffix sums in ascending order = PRO at threshold = each pixel's score
    suffix = np.cumsum(weights[::-1])[::-1]
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if n_pos else np.empty(0, np.intp)
    values = pos[first]
    pro_ge = suffix[first]
    del suffix, weights, pos
    lt = np.searchsorted(neg, values, side="left")
    le = np.searchsorted(neg, values, side="right")
    return _Counts(
        n_neg=n_neg, n_pos=n_pos, n_regions=len(sizes), values=values,
        count=np.diff(np.r_[first, n_pos]), tp_ge=n_pos - first,
        fp_ge=n_neg - lt, fp_gt=n_neg - le, pro_ge=np.clip(pro_ge, 0.0, 1.0))


def _defined(c: _Counts, what: str) -> bool:
    """True when both defect and defect-free pixels exist; logs a warning otherwise."""
    if c.n_pos == 0 or c.n_neg == 0:
        log.warning("%s undefined: %d defect and %d defect-free pixels; returning NaN",
                    what, c.n_pos, c.n_neg)
        return False
    return True


def _auroc(c: _Counts) -> float:
    """Tie-aware Mann-Whitney AUROC (ties count 1/2), exact in integers."""
    if not _defined(c, "pixel AUROC"):
        return _NAN
    lt = c.n_neg - c.fp_ge  # negatives < value
    le = c.n_neg - c.fp_gt  # negatives <= value
    twice = int(np.dot(c.count, lt + le))
    return twice / (2.0 * c.n_pos * c.n_neg)


def _ap(c: _Counts) -> float:
    """sum over thresholds of (recall step) * precision, as scikit-learn defines AP."""
    if not _defined(c, "pixel AP"):
        return _NAN
    precision = c.tp_ge / (c.tp_ge + c.fp_ge)
    return float(np.dot(c.count, precision) / c.n_pos)


def _best_dice(c: _Counts) -> tuple[float, float]:
    """(best F1 over thresholds, its threshold); the optimum is at a distinct positive score."""
    if not _defined(c, "best Dice"):
        return _NAN, _NAN
    f1 = 2.0 * c.tp_ge / (c.tp_ge + c.fp_ge + c.n_pos)
    i = int(np.argmax(f1))
    return float(f1[i]), float(c.values[i])


def _pro_curve(c: _Counts) -> tuple[np.ndarray, np.ndarray]:
    """The PRO polyline from (0, 0) to FPR 1, without points on its horizontal stretches."""
    fp_gt, fp_ge, pro = c.fp_gt[::-1], c.fp_ge[::-1], c.pro_ge[::-1]  # descending thresholds
    k = len(pro)
    fpr = np.empty(2 * k + 2)
    out = np.empty(2 * k + 2)
    fpr[0] = out[0] = 0.0
    fpr[1:-1:2], fpr[2:-1:2] = fp_gt / c.n_neg, fp_ge / c.n_neg
    out[1:-1:2], out[2:-1:2] = np.r_[0.0, pro[:-1]], pro
    fpr[-1], out[-1] = 1.0, pro[-1] if k else 0.0
    keep = np.r_[True, (np.diff(fpr) != 0) | (np.diff(out) != 0)]
    return fpr[keep], out[keep]


def _area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x <= x_max, interpolating y linearly at x_max."""
    correction = 0.0
    if not np.any(x == x_max):
        i = int(np.searchsorted(x, x_max, side="right"))  # 0 < i < len(x): x[0]=0, x[-1]=1
        y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_max + y[i - 1]) * (x_max - x[i - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def _pro(c: _Counts, max_fpr: float) -> float:
    """Normalised area under the PRO curve up to max_fpr."""
    if not 0.0 < max_fpr <= 1.0:
        raise ScoresError(f"max_fpr must be in (0, 1], got {max_fpr}; MVTec uses 0.3")
    if c.n_regions == 0 or not _defined(c, "PRO"):
        return _NAN
    fpr, pro = _pro_curve(c)
    return _area(fpr, pro, max_fpr) / max_fpr


def pixel_metrics(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                  max_fpr: float = 0.3, *, progress: bool = True) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pro (up to max_fpr) and best_dice from one shared sort.

    ``masks[i]`` (bool/uint8, nonzero = defect; None = defect-free image) must have the shape of
    ``maps[i]`` (float, higher = more anomalous); sizes may differ between images.
    """
    c = _counts(masks, maps, progress)
    return {"pixel_auroc": _auroc(c), "pixel_ap": _ap(c), "pro": _pro(c, max_fpr),
            "best_dice": _best_dice(c)[0]}


def pixel_auroc(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray]) -> float:
    """Pixel-level ROC AUC over all pixels of all images (equals scikit-learn's)."""
    return _auroc(_counts(masks, maps, progress=False))


def pixel_ap(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray]) -> float:
    """Pixel-level average precision over all pixels of all images (equals scikit-learn's)."""
    return _ap(_counts(masks, maps, progress=False))


def best_dice(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray]) -> float:
    """Best pixel F1 (Dice) over all thresholds ``map >= t``, pixels of all images pooled."""
    return _best_dice(_counts(masks, maps, progress=False))[0]


def pro(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
        max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to FPR ``max_fpr``, divided by ``max_fpr`` (NaN: no regions).

    Regions are 8-connected components of each mask; FPR is over all defect-free pixels of all
    images; PRO is the mean over all regions of the fraction of the region's pixels >= t.
    """
    return _pro(_counts(masks, maps, progress=False), max_fpr)


def pro_curve(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
              ) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) float64 arrays, thresholds descending, starting at (0, 0) and ending at FPR 1.

    This is the polyline through one point per distinct threshold, with the points that lie
    inside horizontal stretches (thresholds where only FPR changes) left out: same curve, same
    area, far fewer points. Empty arrays when there are no regions or no defect-free pixels.
    """
    c = _counts(masks, maps, progress=False)
    if c.n_regions == 0 or c.n_neg == 0:
        return np.empty(0), np.empty(0)
    return _pro_curve(c)
