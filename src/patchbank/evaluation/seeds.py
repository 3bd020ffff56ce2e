"""Spread over seeds: mean, sample std and a Student-t interval for runs that differ only in
the seed.

For one group of ``n`` runs (one value per seed) with mean ``m`` and sample standard deviation
``s`` (ddof=1), the ``ci`` interval of the mean over seeds is
``m ± t_{(1 + ci) / 2, n - 1} · s / sqrt(n)`` (``scipy.stats.t``). It describes how much the
*expected* result over seeds is pinned down by the seeds run; it says nothing about the test-set
sampling, which a per-run bootstrap interval covers. With one seed, std and interval are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from patchbank.core.errors import ScoresError


def t_interval(values: Sequence[float] | np.ndarray, ci: float = 0.95,
               ) -> tuple[float, float, float, float, int]:
    """(mean, std, lo, hi, n) of the finite ``values``; std, lo, hi are NaN when n < 2."""
    if not 0 < ci < 1:
        raise ScoresError(f"seed interval level ci={ci}; use a level in (0, 1) such as 0.95")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return (float("nan"),) * 4 + (0,)  # type: ignore[return-value]
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan"), n
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + ci) / 2, n - 1)) * std / np.sqrt(n)
    return mean, std, mean - half, mean + half, n


def seed_summary(table: pd.DataFrame, metric_columns: Sequence[str], group_by: Sequence[str],
                 ci: float = 0.95) -> pd.DataFrame:
    """One row per ``group_by`` combination (its rows = the seeds of one setting).

    Columns: the group keys, then per metric ``<m>_mean``, ``<m>_std`` (ddof=1), ``<m>_t_lo``,
    ``<m>_t_hi`` (the ``ci`` Student-t interval of the mean over seeds) and ``<m>_n`` (finite
    values used), and ``n_seeds`` (rows in the group). NaN metric values are left out.
    """
    keys, metrics = list(group_by), list(metric_columns)
    missing = [c for c in keys + metrics if c not in table.columns]
    if missing:
        raise ScoresError(f"seed summary: table has no column(s) {', '.join(missing)}; "
                          f"available: {', '.join(map(str, table.columns))}")
    rows = []
    for key, group in table.groupby(keys, dropna=False, sort=True):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for m in metrics:
            mean, std, lo, hi, n = t_interval(group[m].to_numpy(dtype=float), ci)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_t_lo": lo,
                        f"{m}_t_hi": hi, f"{m}_n": n})
        row["n_seeds"] = len(group)
        rows.append(row)
    columns = keys + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "t_lo", "t_hi", "n")]
    return pd.DataFrame(rows, columns=columns + ["n_seeds"])
