"""Paired comparison of two runs on the same test images: DeLong, paired bootstrap, Holm.

Everything here is pure numpy/scipy on arrays (no files); :mod:`patchbank.stages.compare`
reads the runs and writes the tables.

* :func:`delong` — DeLong, DeLong & Clarke-Pearson (1988) test for two correlated AUROCs on
  the same images, in the midrank form of Sun & Xu (2014); ties count 1/2.
* :func:`stratified_indices`, :func:`index_weights` — those of
  :mod:`patchbank.evaluation.bootstrap` (re-exported): good and defective images resampled
  separately, with replacement (seeded). Row ``b`` keeps every label in place:
  ``labels[idx[b]] == labels``. The *same* rows serve both runs, so the replicates are paired.
* :class:`ImageStats` — image AUROC, AP and best F1 of a replicate from image multiplicities
  (weights), exactly as if the images were repeated (identical to scikit-learn's weighted
  definitions). Pixel metrics plug in the same way: any callable ``weights -> {metric: value}``
  per run (e.g. ``PixelStats.metrics`` of :mod:`patchbank.evaluation.bootstrap`).
* :func:`paired_difference` — the difference ``a - b`` with its percentile interval and a
  two-sided bootstrap p-value: ``min(1, 2 min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (B + 1))``
  (the p-value that inverts the percentile interval; identical runs give 1).
* :func:`across_categories` — the mean difference over categories with its interval from the
  mean of the categories' replicates (every category resampled at once, each with its own
  indices) and a Wilcoxon signed-rank test over the categories' differences.
* :func:`holm` — Holm's step-down adjustment of a family of p-values (NaN left out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

from patchbank.core.errors import ScoresError
from patchbank.evaluation.bootstrap import index_weights, stratified_indices

__all__ = ["index_weights", "stratified_indices"]  # one definition, in bootstrap.py

log = logging.getLogger(__name__)

#: Image metrics of :class:`ImageStats`, in table order.
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1")
#: Pixel metrics a pixel callable is expected to return.
PIXEL_METRICS = ("pixel_auroc", "pro", "best_dice")
#: Fewest bootstrap replicates allowed (0 turns the bootstrap off).
MIN_BOOT = 100

#: metric of a replicate given image weights (multiplicities, shape ``(n,)``)
ReplicateFn = Callable[[np.ndarray], Mapping[str, float]]


# --------------------------------------------------------------------------- DeLong


class DeLongResult(NamedTuple):
    """DeLong's test of ``auc_a - auc_b`` (two-sided ``p`` from the normal ``z``)."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p: float


def _binary_inputs(labels: Sequence | np.ndarray, *scores: Sequence | np.ndarray,
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(labels).ravel() != 0
    out = [np.asarray(s, dtype=np.float64).ravel() for s in scores]
    for s in out:
        if s.shape != y.shape:
            raise ScoresError(f"{y.size} labels but {s.size} scores; pass one label and one "
                              "score per test image for both runs")
        if not np.isfinite(s).all():
            raise ScoresError("image scores contain NaN or inf; fix the scorer output before "
                              "comparing")
    if y.all() or not y.any():
        raise ScoresError(f"{int(y.sum())} defective and {int((~y).sum())} good images: "
                          "a comparison needs both")
    return y, out


def structural_components(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                          ) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10 per defective image, V01 per good image) by midranks (Sun & Xu 2014).

    ``V10[i]`` = fraction of good images scored below defective image ``i`` (ties 1/2),
    ``V01[j]`` = fraction of defective images scored above good image ``j``.
    """
    y, (s,) = _binary_inputs(labels, scores)
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    rank_all = stats.rankdata(np.r_[pos, neg])  # midranks: ties share their mean rank
    rank_pos, rank_neg = stats.rankdata(pos), stats.rankdata(neg)
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    return float(v10.mean()), v10, v01


def delong(labels: Sequence | np.ndarray, scores_a: Sequence | np.ndarray,
           scores_b: Sequence | np.ndarray) -> DeLongResult:
    """DeLong's paired test of two AUROCs on the same images (labels: nonzero = defective).

    Var(auc_a - auc_b) = c' S10 c / m + c' S01 c / n with c = (1, -1), S10 and S01 the 2x2
    sample covariances (ddof 1) of the runs' V10 and V01 components, m and n the numbers of
    defective and good images. ``se = 0`` (e.g. identical runs) gives ``z = 0, p = 1`` when
    the AUROCs are equal and ``z = inf, p = 0`` otherwise.
    """
    auc_a, v10_a, v01_a = structural_components(labels, scores_a)
    auc_b, v10_b, v01_b = structural_components(labels, scores_b)
    m, n = v10_a.size, v01_a.size
    var = (_var_of_difference(v10_a, v10_b) / m if m > 1 else 0.0) + \
        (_var_of_difference(v01_a, v01_b) / n if n > 1 else 0.0)
    diff = auc_a - auc_b
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-15:
        if abs(diff) <= 1e-12:
            return DeLongResult(auc_a, auc_b, diff, 0.0, 0.0, 1.0)
        log.warning("DeLong: zero variance with AUROCs %.4f vs %.4f; p = 0", auc_a, auc_b)
        return DeLongResult(auc_a, auc_b, diff, 0.0, math.copysign(math.inf, diff), 0.0)
    z = diff / se
    return DeLongResult(auc_a, auc_b, diff, se, z, float(2.0 * stats.norm.sf(abs(z))))


def _var_of_difference(u: np.ndarray, v: np.ndarray) -> float:
    """Sample variance (ddof 1) of ``u - v`` = var(u) + var(v) - 2 cov(u, v)."""
    s = np.cov(u, v, ddof=1)
    return float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1])


# --------------------------------------------------------------------------- bootstrap


class ImageStats:
    """Image AUROC, AP and best F1 of one run for any image weights.

    ``metrics(w)`` equals the scikit-learn metrics (and :mod:`patchbank.evaluation.metrics`)
    on the images repeated ``w`` times: the scores are sorted once, tied scores grouped, and a
    replicate only sums weights per group.
    """

    def __init__(self, labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> None:
        y, (s,) = _binary_inputs(labels, scores)
        order = np.argsort(-s, kind="stable")
        self._y = y[order]
        self._order = order
        s_sorted = s[order]
        # last position of each tie group (descending scores)
        self._ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])

    def metrics(self, weights: np.ndarray) -> dict[str, float]:
        """{image_auroc, image_ap, image_f1} with image ``i`` counted ``weights[i]`` times."""
        w = np.asarray(weights, dtype=np.float64).reshape(1, -1)
        return {k: float(v[0]) for k, v in self.replicates(w).items()}

    def replicates(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`metrics` of every row of ``weights`` ``(B, n)`` at once, as ``(B,)`` arrays."""
        w = np.asarray(weights, dtype=np.float64)[:, self._order]
        tp = np.cumsum(np.where(self._y, w, 0.0), axis=1)[:, self._ends]
        fp = np.cumsum(np.where(self._y, 0.0, w), axis=1)[:, self._ends]
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            d_tp = np.diff(tp, axis=1, prepend=0.0)
            d_fp = np.diff(fp, axis=1, prepend=0.0)
            auroc = (d_fp * (tp - d_tp / 2.0)).sum(axis=1) / (n_pos * n_neg)[:, 0]
            called = tp + fp
            precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
            ap = (d_tp * precision).sum(axis=1) / n_pos[:, 0]
            f1 = (2.0 * tp / (called + n_pos)).max(axis=1)
        bad = (n_pos[:, 0] <= 0) | (n_neg[:, 0] <= 0)
        out = {"image_auroc": auroc, "image_ap": ap, "image_f1": f1}
        return {k: np.where(bad, math.nan, v) for k, v in out.items()}


def replicates(fn: ReplicateFn, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``fn`` on every replicate row of ``weights`` -> {metric: (n_boot,) float array}."""
    rows = [fn(w) for w in np.asarray(weights)]
    keys = list(rows[0]) if rows else []
    return {k: np.array([float(r.get(k, math.nan)) for r in rows]) for k in keys}


@dataclass
class Paired:
    """A difference ``a - b`` with its interval and p-value; ``reps`` its bootstrap replicates
    (empty when the bootstrap is off); ``note`` why something is undefined."""

    a: float
    b: float
    diff: float
    lo: float
    hi: float
    p: float
    reps: np.ndarray
    note: str = ""


def percentile_interval(values: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """The ``ci`` percentile interval of the finite ``values`` (NaN, NaN when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(v, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(lo), float(hi)


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``difference = 0`` from replicates of the difference:
    ``min(1, 2 min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (B + 1))`` (NaN when none are finite)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (d.size + 1)))


def paired_difference(a: float, b: float, reps_a: np.ndarray | None,
                      reps_b: np.ndarray | None, ci: float = 0.95) -> Paired:
    """``a - b`` with the percentile interval and bootstrap p of the paired replicates
    (``reps_a[k]`` and ``reps_b[k]`` computed on the same resampled images)."""
    diff = float(a) - float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return Paired(a, b, math.nan, math.nan, math.nan, math.nan, np.empty(0),
                      "undefined for at least one run")
    if reps_a is None or reps_b is None or len(reps_a) == 0:
        return Paired(a, b, diff, math.nan, math.nan, math.nan, np.empty(0), "no bootstrap")
    reps = np.asarray(reps_a, dtype=np.float64) - np.asarray(reps_b, dtype=np.float64)
    lo, hi = percentile_interval(reps, ci)
    return Paired(a, b, diff, lo, hi, bootstrap_p(reps), reps)


def wilcoxon_p(diffs: Sequence[float] | np.ndarray) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p over categories' differences, and why it is NaN (or '').

    Zero differences are dropped (scipy's default); fewer than 2 non-zero ones give NaN.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    nonzero = int(np.count_nonzero(d))
    if nonzero < 2:
        return math.nan, f"Wilcoxon undefined: {nonzero} non-zero difference(s) over " \
            f"{d.size} categories (needs 2)"
    return float(stats.wilcoxon(d).pvalue), ""


def across_categories(per_category: Sequence[Paired], ci: float = 0.95) -> Paired:
    """Mean of the categories' ``a``, ``b`` and difference (categories where both are defined),
    the interval of the mean of their replicates (every category resampled at once) and the
    Wilcoxon signed-rank p over the categories' differences."""
    used = [c for c in per_category if math.isfinite(c.diff)]
    if not used:
        return Paired(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, np.empty(0),
                      "undefined in every category")
    a = float(np.mean([c.a for c in used]))
    b = float(np.mean([c.b for c in used]))
    diff = float(np.mean([c.diff for c in used]))
    lo = hi = math.nan
    reps = np.empty(0)
    sizes = {len(c.reps) for c in used}
    if len(sizes) == 1 and sizes != {0}:
        reps = np.mean(np.stack([c.reps for c in used]), axis=0)
        lo, hi = percentile_interval(reps, ci)
    p, note = wilcoxon_p([c.diff for c in used])
    return Paired(a, b, diff, lo, hi, p, reps, note)


# --------------------------------------------------------------------------- Holm


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order; NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out
