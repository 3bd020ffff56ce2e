"""Per-defect-type metrics: each defect type's test images against all good test images.

For defect type ``d``: image AUROC and AP over the good images plus ``d``'s images, and, when
masks and maps are given, pixel AUROC, PRO and best Dice over the pixels of those same images
(exact, :func:`patchbank.evaluation.metrics.pixel_metrics`). Intervals come from the stratified
bootstrap of :mod:`patchbank.evaluation.bootstrap` restricted to those images (good and ``d``
resampled separately); pixel replicates reuse one :class:`~patchbank.evaluation.bootstrap.
PixelStats` of the whole test set, weighting the other images 0. ``n_images`` is the number of
``d``'s images (the good ones, shared by every row, are not counted). ``aupimo``: the mean of
the given per-image AUPIMO values over ``d``'s images (its replicates: their weighted means
under the same resamples, :func:`~patchbank.evaluation.bootstrap.mean_replicates`). Metrics
registered with :func:`~patchbank.evaluation.registry.register_metric` get their three columns
after the built-in ones (:func:`by_defect_columns`), computed like image AUROC.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation import metrics, registry

log = logging.getLogger(__name__)

BY_DEFECT_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pro", "best_dice", "aupimo")
BY_DEFECT_COLUMNS = ["category", "defect_type", "n_images", *BY_DEFECT_METRICS,
                     *(f"{m}_{e}" for m in BY_DEFECT_METRICS for e in ("lo", "hi"))]
_NAN = float("nan")


def by_defect_columns() -> list[str]:
    """:data:`BY_DEFECT_COLUMNS`, then ``<name>, <name>_lo, <name>_hi`` per registered metric."""
    return BY_DEFECT_COLUMNS + registry.added_columns()


def _image_metrics() -> tuple[registry.Metric, ...]:
    """The image metrics reported per defect: image AUROC, AP and the registered ones."""
    return tuple(m for m in registry.METRICS.values() if m.by_defect)


def defect_seed(seed: int, defect_type: str) -> int:
    """The bootstrap seed of one defect type's rows (independent draws per type)."""
    return int(seed) ^ zlib.crc32(defect_type.encode())


def metrics_by_defect(category: str, labels: Sequence | np.ndarray,
                      scores: Sequence | np.ndarray, defect_types: Sequence[str],
                      masks: Sequence[np.ndarray | None] | None = None,
                      maps: Sequence[np.ndarray] | None = None,
                      pixel_stats: bs.PixelStats | None = None, n_boot: int = 1000,
                      ci: float = 0.95, seed: int = 0,
                      aupimo: Sequence[float] | np.ndarray | None = None) -> pd.DataFrame:
    """One row per defect type (sorted), columns :func:`by_defect_columns` (NaN: undefined);
    ``aupimo``: per-image AUPIMO values (NaN for good images), None: NaN column."""
    n_boot, ci = bs.check_n_boot(n_boot), bs.check_ci(ci)
    y = np.asarray(labels).ravel() != 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    types = np.asarray([str(t) for t in defect_types])
    good = np.flatnonzero(~y)
    pixel = masks is not None and maps is not None
    per_image = np.full(y.size, _NAN) if aupimo is None else \
        np.asarray(aupimo, dtype=np.float64).ravel()
    if pixel and pixel_stats is None and n_boot:
        pixel_stats = bs.PixelStats(masks, maps)
    rows, cols = [], by_defect_columns()
    for d in sorted(set(types[y])):
        sub = np.r_[good, np.flatnonzero(y & (types == d))]
        ys, ss = y[sub], s[sub]
        row: dict = {"category": category, "defect_type": d, "n_images": int(ys.sum())}
        row.update(dict.fromkeys(cols[3:], _NAN))
        if good.size:
            row.update(registry.image_values(ys, ss, _image_metrics()))
        if pixel:
            exact = metrics.pixel_metrics([masks[i] for i in sub], [maps[i] for i in sub],
                                          progress=False)
            row.update({k: exact[k] for k in ("pixel_auroc", "pro", "best_dice")})
        mine = per_image[sub][ys]
        if np.isfinite(mine).any():
            row["aupimo"] = float(np.nanmean(mine))
        if n_boot and good.size:
            row.update(_intervals(ys, ss, sub, pixel_stats if pixel else None, row, n_boot, ci,
                                  defect_seed(seed, d), per_image[sub]))
        rows.append(row)
    if not good.size:
        log.warning("%s: no good test images; per-defect metrics undefined (NaN)", category)
    return pd.DataFrame(rows, columns=cols)


def _intervals(ys: np.ndarray, ss: np.ndarray, sub: np.ndarray,
               stats: bs.PixelStats | None, row: dict, n_boot: int, ci: float,
               seed: int, aupimo: np.ndarray) -> dict[str, float]:
    """The ``_lo``/``_hi`` values of one defect type's row."""
    problem = bs.image_problem(ys, ss)
    if problem is not None:
        log.warning("%s: confidence intervals undefined: %s", row["defect_type"], problem)
        return {}
    idx = bs.stratified_indices(ys, n_boot, seed)
    reps = registry.image_replicates(ys, ss, idx, _image_metrics())
    if np.isfinite(row["aupimo"]):
        reps["aupimo"] = bs.mean_replicates(aupimo, bs.index_weights(idx, len(sub)))
    if stats is not None and stats.problem is None:
        w = np.zeros((n_boot, stats.n_images))
        w[:, sub] = bs.index_weights(idx, len(sub))
        ones = np.zeros(stats.n_images)
        ones[sub] = 1.0
        base = stats.metrics(ones)
        for k, v in stats.replicates(w).items():
            if k in BY_DEFECT_METRICS:
                shift = row[k] - base[k] if np.isfinite(row[k] - base[k]) else 0.0
                reps[k] = np.clip(v + shift, 0.0, 1.0)
    out = {}
    for k in (*BY_DEFECT_METRICS, *(m.name for m in registry.added_metrics())):
        if k in reps:
            out[f"{k}_lo"], out[f"{k}_hi"] = bs.percentile_interval(reps[k], ci)
    return out
