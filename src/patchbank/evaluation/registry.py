"""Image-level metrics by name, and the columns they make in the evaluate stage's tables.

An image-level metric is ``fn(labels, scores) -> float``: ``labels`` a 1-D int array (1 =
defective, 0 = good), ``scores`` a 1-D float64 array of the same length (higher = more
anomalous); NaN when undefined. :func:`register_metric` adds one to :data:`METRICS`; the
evaluate stage (:mod:`patchbank.stages.evaluate`) then writes, with no other edit, columns
``<name>``, ``<name>_lo`` and ``<name>_hi`` (percentile interval over the same stratified
bootstrap resamples as the built-in metrics; the mean row's interval from the per-replicate
mean over categories) into ``metrics.json``, ``metrics.csv``, ``bootstrap.npz``, the
leaderboard (csv and md) and, per defect type, ``by_defect.csv`` and its views, after every
built-in column (:func:`added_columns`). Its replicates call ``fn`` once per resample unless
a vectorised ``replicates(labels, scores, indices) -> (B,)`` is given (``indices``: (B, n)
rows of :func:`patchbank.evaluation.bootstrap.stratified_indices`).

The built-in image metrics (image AUROC, AP, best F1) are entries too; their columns keep
their fixed places in :data:`METRIC_COLUMNS`. Pixel-level metrics are not pluggable: they
share one sort of every pixel (:func:`patchbank.evaluation.metrics.pixel_metrics`) and binned
replicates (:class:`patchbank.evaluation.bootstrap.PixelStats`); a new one is added there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from patchbank.core.errors import MetricError
from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation import metrics

#: Built-in columns of one metrics row (metrics.json ``metrics``, metrics.csv), in order.
METRIC_COLUMNS = [
    "category", "image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pro",
    "best_dice", "aupimo", "image_score", "pixel_score", "overall_score", "fit_s", "score_s",
]
EXTRA_COLUMNS = [
    "f1_threshold", "f1_precision", "f1_recall", "unsup_threshold", "unsup_precision",
    "unsup_recall", "unsup_f1", "eval_resolution", "n_test", "shots", "seed", "n_train",
]
#: Columns of the leaderboard and per-defect tables that are not metrics.
KEY_COLUMNS = ("backbone", "method", "n_categories", "categories", "defect_type", "n_images")
LEVELS = ("image",)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

ImageMetric = Callable[[np.ndarray, np.ndarray], float]
Replicates = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Metric:
    """One image-level metric: its function, direction and where it is reported."""

    name: str
    fn: ImageMetric
    higher_is_better: bool = True
    #: vectorised replicates (labels, scores, indices (B, n)) -> (B,); None: fn per resample
    replicates: Replicates | None = None
    #: reported per defect type (by_defect.csv) as well
    by_defect: bool = True
    builtin: bool = False

    def value(self, labels: np.ndarray, scores: np.ndarray) -> float:
        """``fn`` on one set of images, checked to be one number."""
        v = self.fn(labels, scores)
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise MetricError(f"metric {self.name!r}: its function returned "
                              f"{type(v).__name__}, expected one float; fix the function "
                              "given to register_metric")
        return float(v)

    def replicate_values(self, labels: np.ndarray, scores: np.ndarray,
                         indices: np.ndarray) -> np.ndarray:
        """(B,) values on the resamples ``indices`` (B, n) of ``labels``/``scores``."""
        if self.replicates is None:
            return np.array([self.value(labels[i], scores[i]) for i in indices], np.float64)
        out = np.asarray(self.replicates(labels, scores, indices), dtype=np.float64)
        if out.shape != (len(indices),):
            raise MetricError(f"metric {self.name!r}: replicates returned shape {out.shape}, "
                              f"expected ({len(indices)},); fix the replicates function")
        return out


#: Every image-level metric by name, built-in ones first (the order of the added columns).
METRICS: dict[str, Metric] = {}


def metric_columns(name: str) -> tuple[str, str, str]:
    """The columns one metric makes: ``name``, ``name_lo``, ``name_hi``."""
    return name, f"{name}_lo", f"{name}_hi"


def _taken() -> dict[str, str]:
    """Column name -> who writes it (a built-in table or a registered metric)."""
    out = dict.fromkeys((*METRIC_COLUMNS, *EXTRA_COLUMNS, *KEY_COLUMNS), "the evaluate stage")
    out.update({c: "the evaluate stage" for m in METRIC_COLUMNS for c in metric_columns(m)})
    for m in added_metrics():
        out.update(dict.fromkeys(metric_columns(m.name), f"metric {m.name!r}"))
    return out


def register_metric(name: str, fn: ImageMetric, level: str = "image",
                    higher_is_better: bool = True, *,
                    replicates: Replicates | None = None) -> Metric:
    """Add image-level metric ``fn(labels, scores) -> float`` as ``name``; returns its entry.

    A name that is not lower_snake_case, already registered, or makes a column another one
    writes (``name``, ``name_lo``, ``name_hi``), a ``level`` other than ``"image"`` or an ``fn``
    that is not callable -> one-line :class:`MetricError` naming the fix.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise MetricError(f"metric name {name!r}: use lower_snake_case (a-z, 0-9, _), e.g. "
                          "'tnr_at_95_tpr'")
    if level not in LEVELS:
        raise MetricError(f"metric {name!r}: level {level!r} is not pluggable; register "
                          "image-level metrics (level='image'); pixel metrics are added in "
                          "evaluation/metrics.pixel_metrics and bootstrap.PixelStats")
    if not callable(fn) or (replicates is not None and not callable(replicates)):
        raise MetricError(f"metric {name!r}: fn (and replicates) must be callable")
    if name in METRICS and not METRICS[name].builtin:
        raise MetricError(f"metric {name!r} is already registered; choose another name or "
                          f"unregister_metric({name!r}) first")
    taken = _taken()
    clash = [c for c in metric_columns(name) if c in taken]
    if clash:
        raise MetricError(f"metric {name!r} would write column {clash[0]!r}, which "
                          f"{taken[clash[0]]} already writes; choose another name")
    METRICS[name] = Metric(name, fn, bool(higher_is_better), replicates)
    return METRICS[name]


def unregister_metric(name: str) -> None:
    """Remove a registered metric (nothing when absent); built-in ones -> MetricError."""
    if name in METRICS and METRICS[name].builtin:
        raise MetricError(f"metric {name!r} is built in and cannot be unregistered")
    METRICS.pop(name, None)


def added_metrics() -> tuple[Metric, ...]:
    """The registered (not built-in) metrics, in registration order."""
    return tuple(m for m in METRICS.values() if not m.builtin)


def added_columns() -> list[str]:
    """The columns of the registered metrics, after every built-in column of a table."""
    return [c for m in added_metrics() for c in metric_columns(m.name)]


def _arrays(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(labels).ravel() != 0).astype(np.int64), \
        np.asarray(scores, dtype=np.float64).ravel()


def image_values(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                 which: Iterable[Metric]) -> dict[str, float]:
    """``{name: value}`` of the metrics ``which`` on these labels and scores."""
    y, s = _arrays(labels, scores)
    return {m.name: m.value(y, s) for m in which}


def image_replicates(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
                     indices: np.ndarray, which: Iterable[Metric]) -> dict[str, np.ndarray]:
    """``{name: (B,) replicates}`` of the metrics ``which`` over the resamples ``indices``."""
    y, s = _arrays(labels, scores)
    return {m.name: m.replicate_values(y, s, indices) for m in which}


def _builtin_replicates(key: str) -> Replicates:
    def replicates(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return bs.image_replicates(labels, scores, indices)[key]
    return replicates


def _image_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    return metrics.best_f1(labels, scores)[0]


for _m in (Metric("image_auroc", metrics.image_auroc, builtin=True,
                  replicates=_builtin_replicates("image_auroc")),
           Metric("image_ap", metrics.image_ap, builtin=True,
                  replicates=_builtin_replicates("image_ap")),
           Metric("image_f1", _image_f1, builtin=True, by_defect=False,
                  replicates=_builtin_replicates("image_f1"))):
    METRICS[_m.name] = _m
del _m

# metrics added in the package: one register_metric("name", metrics.fn) line each, below
