"""Tests for patchbank.evaluation.seeds and its use in the sweep summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from patchbank.core.errors import ScoresError
from patchbank.evaluation.seeds import seed_summary, t_interval
from patchbank.sweep.summary import seed_summary as sweep_seed_summary
from patchbank.sweep.summary import summary_markdown, write_summary

T975_2 = 4.302652729749  # Student t quantile 0.975 with 2 degrees of freedom


def test_t_interval_known_numbers():
    mean, std, lo, hi, n = t_interval([1.0, 2.0, 3.0])
    half = T975_2 / math.sqrt(3)
    assert (mean, std, n) == (2.0, 1.0, 3)
    assert lo == pytest.approx(2 - half, abs=1e-9) and hi == pytest.approx(2 + half, abs=1e-9)
    # 90 %: t_{0.95, 2} = 2.919986
    _, _, lo90, _, _ = t_interval([1.0, 2.0, 3.0], ci=0.9)
    assert lo90 == pytest.approx(2 - 2.919986 / math.sqrt(3), abs=1e-6)


def test_t_interval_one_value_and_nan():
    mean, std, lo, hi, n = t_interval([0.5, np.nan])
    assert mean == 0.5 and n == 1 and all(math.isnan(x) for x in (std, lo, hi))
    assert t_interval([])[4] == 0 and math.isnan(t_interval([])[0])
    with pytest.raises(ScoresError, match="ci=1.5"):
        t_interval([1.0, 2.0], ci=1.5)


def test_seed_summary_groups_and_columns():
    table = pd.DataFrame({
        "method": ["a", "a", "a", "b", "b"], "shots": ["all"] * 5, "seed": [0, 1, 2, 0, 1],
        "auroc": [1.0, 2.0, 3.0, 0.5, np.nan], "pro": [0.1, 0.1, 0.1, 0.2, 0.4]})
    out = seed_summary(table, ["auroc", "pro"], ["method", "shots"])
    a = out[out["method"] == "a"].iloc[0]
    assert a["auroc_mean"] == 2.0 and a["auroc_std"] == 1.0 and a["auroc_n"] == 3
    assert a["auroc_t_hi"] == pytest.approx(2 + T975_2 / math.sqrt(3))
    assert a["pro_std"] == pytest.approx(0.0, abs=1e-12)
    assert a["pro_t_lo"] == pytest.approx(0.1) and a["pro_t_hi"] == pytest.approx(0.1)
    b = out[out["method"] == "b"].iloc[0]
    assert b["n_seeds"] == 2 and b["auroc_n"] == 1 and math.isnan(b["auroc_t_lo"])
    assert b["pro_mean"] == pytest.approx(0.3)
    assert b["pro_t_lo"] == pytest.approx(0.3 - 12.706205 * np.std([0.2, 0.4], ddof=1) /
                                          math.sqrt(2), abs=1e-5)
    with pytest.raises(ScoresError, match="no column"):
        seed_summary(table, ["nope"], ["method"])


def _sweep_rows() -> pd.DataFrame:
    rows = []
    for seed, value in ((0, 0.7), (1, 0.8), (2, 0.9)):
        for category in ("x", "y"):
            rows.append({"backbone": "bb", "bank": "t", "method": "knn", "params": "{}",
                         "shots": "4", "seed": seed, "category": category, "error": None,
                         "image_auroc": value, "pixel_auroc": value, "pro": np.nan})
    return pd.DataFrame(rows)


def test_sweep_summary_has_t_columns_and_markdown(tmp_path):
    table = _sweep_rows()
    summary = sweep_seed_summary(table)
    r = summary.iloc[0]
    half = T975_2 * 0.1 / math.sqrt(3)
    assert r["image_auroc_mean"] == pytest.approx(0.8) and r["n_seeds"] == 3
    assert r["image_auroc_t_lo"] == pytest.approx(0.8 - half)
    assert r["image_auroc_t_hi"] == pytest.approx(0.8 + half)
    text = summary_markdown(summary)
    lo, hi = 100 * (0.8 - half), 100 * (0.8 + half)
    assert f"| bb | knn | 4 | 80.0 ± 10.0 | 80.0 ± 10.0 | – | 3 | [{lo:.1f}, {hi:.1f}] |" in text
    written = write_summary(table.assign(job_s=1.0), tmp_path, "s", figures=False)
    back = pd.read_csv(written["seeds"])
    assert back.loc[0, "image_auroc_t_hi"] == pytest.approx(0.8 + half, rel=1e-5)
