"""Stratified bootstrap confidence intervals of the image and pixel metrics (pure numpy).

Resampling. A replicate draws, with replacement, as many good images (label 0) from the good
test images and as many defective images from the defective ones as the test set has
(:func:`stratified_indices`): both classes keep their size, so every replicate has both and
every metric stays defined. Intervals are percentile intervals of ``n_boot`` replicates
(``np.percentile``, linear interpolation), seeded by ``np.random.default_rng(seed)``.

Image level: the replicates are exact and vectorised over all replicates at once: AUROC from
average ranks (ties count 1/2, as scikit-learn), AP and best F1 from one sort per replicate
with tied scores grouped (the definitions of :mod:`patchbank.evaluation.metrics`).

Pixel level (the documented approximation). Re-sorting tens of millions of pixels 1000 times
is too slow, so :class:`PixelStats` makes one pass over the (mask, map) pairs and keeps per
image histograms over shared bin edges: defect-free pixels, defect pixels and, per defect
region (8-connected component of the mask, as in metrics.py), that region's pixels. A
replicate's counts are those histograms weighted by how often it drew each image, so a
replicate costs O(images x bins), not a sort. Bin edges: about 2048 quantiles of the
defect-free and 2048 of the defect scores (from a strided subsample), snapped onto a uniform
grid of 2**20 cells over [min, max] so binning is arithmetic and tied scores always share a bin.
Every bin edge is a threshold at which the counts, hence FPR, TPR, PRO and Dice, are exact for
the replicate; what is approximate is the curve between edges (PRO: chords between exact
curve points, up to FPR 0.3 with linear interpolation at 0.3 and normalised by 0.3, as
metrics.py; AUROC: pixels in the same bin count as tied; AP and best Dice: thresholds only at
the edges). The error is below 1e-3 on the tested cases (tests/test_bootstrap.py). When exact
point estimates are passed (``pixel_points``), every pixel replicate is shifted by the
approximation's error on the observed sample (exact minus binned value at weights all ones),
which cancels its bias to first order and keeps degenerate intervals on the exact value (the
shifted replicates are clipped to [0, 1]).

Undefined cases never raise: a single class, constant scores, NaN or inf give NaN intervals
with a logged reason. Only ``n_boot`` in 1..99 is refused (:class:`ScoresError`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from patchbank.core.errors import ScoresError

log = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1")
PIXEL_METRICS = ("pixel_auroc", "pro", "best_dice")
CI_METRICS = IMAGE_METRICS + PIXEL_METRICS
MIN_BOOT = 100
_NAN = float("nan")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_GRID = 2 ** 20


def check_n_boot(n_boot: int) -> int:
    """``n_boot`` as an int; 0 (off) or >= 100, else a one-line ScoresError."""
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0 or 0 < n_boot < MIN_BOOT:
        raise ScoresError(f"bootstrap replicates = {n_boot!r}: use 0 (no intervals) or at least "
                          f"{MIN_BOOT} (1000 recommended)")
    return int(n_boot)


def check_ci(ci: float) -> float:
    """``ci`` as a float in (0, 1), else a one-line ScoresError."""
    if not 0.0 < float(ci) < 1.0:
        raise ScoresError(f"confidence level {ci!r} is not in (0, 1); use e.g. 0.95")
    return float(ci)


def stratified_indices(labels: Sequence | np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) int indices into ``labels``: per replicate, the good (label 0) and defective
    positions are each refilled with draws (with replacement) from their own class."""
    y = np.asarray(labels).ravel() != 0
    rng = np.random.default_rng(seed)
    out = np.empty((int(n_boot), y.size), dtype=np.intp)
    for cls in (False, True):
        members = np.flatnonzero(y == cls)
        if members.size:
            out[:, members] = members[rng.integers(0, members.size, (int(n_boot), members.size))]
    return out


def category_seed(seed: int, category: str) -> int:
    """The bootstrap seed of one category: categories draw independently of each other, and
    two runs of the same category draw the same indices (for paired comparisons)."""
    return int(seed) ^ zlib.crc32(category.encode())


def index_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64 multiplicities of each image in each replicate of ``indices`` (B, m)."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def mean_replicates(values: Sequence[float] | np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) weighted means of the finite per-image ``values`` (n,) under each row of image
    multiplicities ``weights`` (B, n) (e.g. AUPIMO over the resampled defective images); NaN
    for a replicate that drew none of them."""
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v)
    num = w[:, ok] @ v[ok]
    den = w[:, ok].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), _NAN)


# --------------------------------------------------------------------------- image level


def image_replicates(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                     indices: np.ndarray) -> dict[str, np.ndarray]:
    """Exact image_auroc, image_ap and image_f1 of every replicate (rows of ``indices``)."""
    y_all = np.asarray(labels).ravel() != 0
    s_all = np.asarray(scores, dtype=np.float64).ravel()
    y, s = y_all[indices], s_all[indices]
    n_pos = y.sum(axis=1).astype(np.float64)
    n_neg = y.shape[1] - n_pos
    ranks = rankdata(s, axis=1)
    auroc = ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    order = np.argsort(-s, axis=1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=1)
    y_sorted = np.take_along_axis(y, order, axis=1)
    tp = np.cumsum(y_sorted, axis=1, dtype=np.float64)
    fp = np.arange(1, y.shape[1] + 1)[None, :] - tp
    end = np.ones_like(y_sorted)
    end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]  # last position of a run of tied scores
    pos = np.where(end, np.arange(y.shape[1])[None, :], y.shape[1] - 1)
    group_end = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1]
    precision = np.take_along_axis(tp / (tp + fp), group_end, axis=1)
    ap = (precision * y_sorted).sum(axis=1) / n_pos
    f1 = np.where(end, 2 * tp / (tp + fp + n_pos[:, None]), -np.inf).max(axis=1)
    return {"image_auroc": auroc, "image_ap": ap, "image_f1": f1}


def image_problem(labels: np.ndarray, scores: np.ndarray) -> str | None:
    """Why image-level intervals are undefined for these labels/scores, else None."""
    if labels.shape != scores.shape or labels.size == 0:
        return f"{labels.size} labels but {scores.size} scores"
    if not np.isfinite(scores).all():
        return "image scores contain NaN or inf"
    if (labels != 0).all() or (labels == 0).all():
        return "the test images are all of one class"
    if np.ptp(scores) == 0:
        return "every image has the same score"
    return None


# --------------------------------------------------------------------------- pixel level


class PixelStats:
    """Per-image pixel histograms over shared bins, built once; :meth:`metrics` gives pixel
    AUROC, AP, PRO (to FPR ``max_fpr``) and best Dice of any weighting of the images.

    ``masks``/``maps`` as for :func:`patchbank.evaluation.metrics.pixel_metrics`. A run whose
    maps hold NaN/inf, or that has no defect or no defect-free pixel, gives NaN metrics
    (``problem`` says why).
    """

    def __init__(self, masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                 n_bins: int = 4096, max_fpr: float = 0.3) -> None:
        if len(masks) != len(maps) or len(maps) == 0:
            raise ScoresError(f"{len(masks)} masks but {len(maps)} maps; pass one mask "
                              "(None for a good image) per anomaly map")
        self.n_images = len(maps)
        self.max_fpr = float(max_fpr)
        self.problem: str | None = None
        bools = [np.zeros(np.shape(a), bool) if m is None else np.asarray(m) != 0
                 for m, a in zip(masks, maps, strict=True)]
        finite = [bool(np.isfinite(a).all()) for a in maps]
        if not all(finite):
            self.problem = f"image {finite.index(False)}: anomaly map contains NaN or inf"
            return
        lo = min(float(np.min(a)) for a in maps)
        hi = max(float(np.max(a)) for a in maps)
        self._lo, self._scale = lo, (_GRID / (hi - lo) if hi > lo else 0.0)
        self._lookup = self._edges(bools, maps, n_bins)
        k = self.n_bins
        self.neg = np.zeros((self.n_images, k))
        self.pos = np.zeros((self.n_images, k))
        region_rows: list[np.ndarray] = []
        region_image: list[int] = []
        for i, (m, amap) in enumerate(zip(bools, maps, strict=True)):
            b = self._bin(np.asarray(amap, dtype=np.float32))
            if not m.any():
                self.neg[i] = np.bincount(b, minlength=k)
                continue
            flat = m.ravel()
            self.neg[i] = np.bincount(b[~flat], minlength=k)
            self.pos[i] = np.bincount(b[flat], minlength=k)
            lab, n_reg = ndimage.label(m, structure=_EIGHT_CONNECTED)
            hist = np.bincount((lab.ravel()[flat] - 1) * k + b[flat],
                               minlength=n_reg * k).reshape(n_reg, k)
            region_rows.append(hist / hist.sum(axis=1, keepdims=True))
            region_image += [i] * n_reg
        # fraction of each region's pixels with score >= each bin's lower edge
        self.region_frac = (np.cumsum(np.concatenate(region_rows)[:, ::-1], axis=1)[:, ::-1]
                            if region_rows else np.zeros((0, k)))
        self.region_image = np.asarray(region_image, dtype=np.intp)
        if not self.pos.any() or not self.neg.any():
            self.problem = "no defect pixels or no defect-free pixels"

    def _bin(self, a: np.ndarray) -> np.ndarray:
        cell = ((a.ravel() - self._lo) * self._scale).astype(np.int64)
        return self._lookup[np.clip(cell, 0, _GRID - 1)]

    def _edges(self, bools: list[np.ndarray], maps: Sequence[np.ndarray],
               n_bins: int) -> np.ndarray:
        """The cell -> bin lookup table: quantile edges of both classes, snapped to cells."""
        total = sum(np.size(a) for a in maps)
        step = max(1, total // 4_000_000)
        neg, pos = [], []
        for m, amap in zip(bools, maps, strict=True):
            a = np.asarray(amap, dtype=np.float32).ravel()[::step]
            mm = m.ravel()[::step]
            neg.append(a[~mm])
            pos.append(a[mm])
        q = np.linspace(0.0, 1.0, n_bins // 2 + 1)
        values = [np.quantile(np.concatenate(v), q) for v in (neg, pos) if sum(map(len, v))]
        cells = np.unique(np.clip(((np.concatenate(values) - self._lo) * self._scale)
                                  .astype(np.int64), 0, _GRID - 1))
        cells = np.union1d(cells, [0])
        self.n_bins = len(cells)
        lookup = np.zeros(_GRID, dtype=np.int32)
        lookup[cells[1:]] = 1
        return np.cumsum(lookup, dtype=np.int32)

    def metrics(self, weights: Sequence[float] | np.ndarray) -> dict[str, float]:
        """pixel_auroc, pixel_ap, pro and best_dice with image ``i`` counted ``weights[i]``
        times (all ones: the observed sample, approximately :func:`metrics.pixel_metrics`)."""
        w = np.asarray(weights, dtype=np.float64).reshape(1, -1)
        return {k: float(v[0]) for k, v in self.replicates(w).items()}

    def replicates(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`metrics` of every row of ``weights`` (B, n_images), as (B,) arrays."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != self.n_images:
            raise ScoresError(f"weights of shape {w.shape}; expected (B, {self.n_images})")
        keys = ("pixel_auroc", "pixel_ap", "pro", "best_dice")
        if self.problem is not None:
            return {k: np.full(len(w), _NAN) for k in keys}
        # chunks of 64 replicates keep the (chunk, bins) temporaries in cache (~3x faster)
        parts = [self._chunk(w[i:i + 64]) for i in range(0, len(w), 64)]
        return {k: np.concatenate([p[k] for p in parts]) if parts else np.empty(0)
                for k in keys}

    def _chunk(self, w: np.ndarray) -> dict[str, np.ndarray]:
        neg, pos = w @ self.neg, w @ self.pos
        neg_ge = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]  # counts with score >= edge k
        pos_ge = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
        n_neg, n_pos = neg_ge[:, 0].copy(), pos_ge[:, 0].copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            # AUROC = 1 - sum_k pos_k * (negatives >= edge k - half the negatives in bin k) / PN
            neg *= -0.5
            neg += neg_ge
            auroc = 1.0 - np.einsum("bk,bk->b", pos, neg) / (n_pos * n_neg)
            denom = pos_ge + neg_ge
            np.maximum(denom, 1e-300, out=denom)  # empty top bins of a replicate: precision 0
            ap = np.einsum("bk,bk->b", pos, pos_ge / denom) / n_pos
            denom += n_pos[:, None]
            dice = 2 * np.divide(pos_ge, denom, out=denom).max(axis=1)
            neg_ge /= n_neg[:, None]
            return {"pixel_auroc": auroc, "pixel_ap": ap, "best_dice": dice,
                    "pro": self._pro(w, neg_ge)}

    def _pro(self, w: np.ndarray, fpr: np.ndarray) -> np.ndarray:
        """Area under PRO(FPR) through the bin edges up to max_fpr, divided by max_fpr."""
        if len(self.region_image) == 0:
            return np.full(len(w), _NAN)
        # only the edges up to the first one past max_fpr (in every replicate) matter
        start = max(0, int((fpr > self.max_fpr).sum(axis=1).min()) - 1)
        fpr = fpr[:, start:]
        wr = w[:, self.region_image]
        pro = (wr @ self.region_frac[:, start:]) / wr.sum(axis=1, keepdims=True)
        # thresholds descending, starting at (0, 0): x nondecreasing up to past max_fpr
        x = np.concatenate([np.zeros((len(w), 1)), fpr[:, ::-1]], axis=1)
        y = np.concatenate([np.zeros((len(w), 1)), pro[:, ::-1]], axis=1)
        full = x[:, 1:] <= self.max_fpr
        area = (0.5 * (y[:, 1:] + y[:, :-1]) * np.diff(x, axis=1) * full).sum(axis=1)
        i = full.sum(axis=1)  # x[i] <= max_fpr < x[i + 1] (or x[i] == 1)
        rows = np.arange(len(w))
        j = np.minimum(i + 1, x.shape[1] - 1)
        x0, x1, y0, y1 = x[rows, i], x[rows, j], y[rows, i], y[rows, j]
        gap = np.where(x1 > x0, x1 - x0, 1.0)
        y_max = y0 + (y1 - y0) * (self.max_fpr - x0) / gap
        area += np.where(x0 < self.max_fpr, 0.5 * (y_max + y0) * (self.max_fpr - x0), 0.0)
        return area / self.max_fpr


# --------------------------------------------------------------------------- intervals


def bootstrap_replicates(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                         pixel_stats: PixelStats | None, n_boot: int = 1000, seed: int = 0, *,
                         pixel_points: Mapping[str, float] | None = None,
                         indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(n_boot,) replicates of every metric of :data:`CI_METRICS` (all NaN where undefined,
    with the reason logged). ``pixel_points``: exact pixel point estimates (bias correction,
    see the module docstring); ``indices``: precomputed :func:`stratified_indices`."""
    n_boot = check_n_boot(n_boot)
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    out = {k: np.full(n_boot, _NAN) for k in CI_METRICS}
    if n_boot == 0:
        return out
    problem = image_problem(y, s)
    if problem is not None:
        log.warning("confidence intervals undefined: %s; reporting NaN", problem)
        return out
    idx = stratified_indices(y, n_boot, seed) if indices is None else indices
    out.update(image_replicates(y, s, idx))
    if pixel_stats is None:
        return out
    if pixel_stats.problem is not None:
        log.warning("pixel confidence intervals undefined: %s; reporting NaN",
                    pixel_stats.problem)
        return out
    reps = pixel_stats.replicates(index_weights(idx, y.size))
    base = pixel_stats.metrics(np.ones(y.size)) if pixel_points else {}
    for k in PIXEL_METRICS:
        shift = float(pixel_points.get(k, _NAN)) - base[k] if pixel_points else 0.0
        out[k] = np.clip(reps[k] + (shift if np.isfinite(shift) else 0.0), 0.0, 1.0)
    return out


def percentile_interval(replicates: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite replicates; (NaN, NaN) when there are none."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return _NAN, _NAN
    a = 100 * (1 - check_ci(ci)) / 2
    lo, hi = np.percentile(r, [a, 100 - a])
    return float(lo), float(hi)


def bootstrap_cis(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                  pixel_stats: PixelStats | None, n_boot: int = 1000, ci: float = 0.95,
                  seed: int = 0, *, pixel_points: Mapping[str, float] | None = None,
                  ) -> dict[str, tuple[float, float]]:
    """``{metric: (lo, hi)}`` percentile intervals for :data:`CI_METRICS` (NaN when off or
    undefined)."""
    check_ci(ci)
    reps = bootstrap_replicates(labels, scores, pixel_stats, n_boot, seed,
                                pixel_points=pixel_points)
    return {k: percentile_interval(v, ci) for k, v in reps.items()}
