"""The leaderboard's seed view: runs that differ only in their seed, summarised over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from patchbank.stages import evaluate as stage
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, write_run

ROWS = [["/x/a.png", "good", 0, 0.1, "", 8, 8], ["/x/b.png", "hole", 1, 0.9, "", 8, 8]]


def hand_run(root: Path, name: str, params: dict, seed: int, auroc: float,
             half_width: float | None = None, shots: int | None = None) -> None:
    """A run folder with a hand-written metrics.json (and bootstrap.npz when half_width)."""
    paths = RunPaths.of(root, "bb", name, "cat")
    write_run(paths, pd.DataFrame(ROWS, columns=SCORE_COLUMNS), None, None,
              {"method": "patchcore", "params": params, "seed": seed, "shots": shots,
               "bank": "tag-1", "holdout": 0.0, "pixel_level": False})
    row = {"category": "cat", "image_auroc": auroc, "pixel_auroc": auroc - 0.1}
    boot = None
    if half_width is not None:
        reps = np.linspace(auroc - half_width, auroc + half_width, 101)
        np.savez(paths.folder / "bootstrap.npz", token=np.array("t"),
                 **{k: reps for k in stage.CI_METRICS})
        boot = {"n_boot": 101, "ci": 0.95, "seed": 0, "token": "t"}
    stage.write_metrics(paths, "bb", name, "cat", None, row, None, boot)


def test_seed_groups_mean_std_t_interval_and_bootstrap_width(tmp_path: Path) -> None:
    values = [0.80, 0.84, 0.90]
    for s, v in enumerate(values):
        hand_run(tmp_path, f"pc-s{s}", {"k": 3, "seed": s}, 0, v, half_width=0.05)
    hand_run(tmp_path, "pc-other", {"k": 5, "seed": 0}, 0, 0.5)  # other params: alone
    hand_run(tmp_path, "pc-few-a", {"k": 3}, 1, 0.7, shots=4)  # run.json seeds, 4 shots
    hand_run(tmp_path, "pc-few-b", {"k": 3}, 2, 0.6, shots=4)
    stage.leaderboard(tmp_path)
    table = pd.read_csv(tmp_path / "leaderboard_seeds.csv")
    assert len(table) == 2 and table["n_seeds"].tolist() == [3, 2]
    full, few = table.iloc[0], table.iloc[1]  # every image (-1) sorts first
    assert full["runs"] == "pc-s0,pc-s1,pc-s2" and full["params"] == '{"k": 3}'
    m, sd = np.mean(values), np.std(values, ddof=1)
    half = stats.t.ppf(0.975, 2) * sd / np.sqrt(3)
    assert full["image_auroc_mean"] == pytest.approx(m, abs=1e-6)
    assert full["image_auroc_std"] == pytest.approx(sd, abs=1e-6)
    assert (full["image_auroc_t_lo"], full["image_auroc_t_hi"]) == \
        pytest.approx((m - half, m + half), abs=1e-6)
    assert full["pixel_auroc_mean"] == pytest.approx(m - 0.1, abs=1e-6)
    # each run's own 95 % percentile interval of linspace(v - .05, v + .05, 101): width .095
    assert full["image_auroc_boot_width"] == pytest.approx(0.095, abs=1e-6)
    assert few["shots"] == 4 and few["image_auroc_mean"] == pytest.approx(0.65, abs=1e-6)
    assert np.isnan(few["image_auroc_boot_width"]) and np.isnan(few["aupimo_mean"])
    md = (tmp_path / "leaderboard_seeds.md").read_text()
    assert f"{100 * m:.1f} ± {100 * sd:.1f}" in md


def test_no_seed_groups_writes_no_seed_view(tmp_path: Path) -> None:
    hand_run(tmp_path, "pc-a", {"k": 3}, 0, 0.8)
    hand_run(tmp_path, "pc-b", {"k": 4}, 0, 0.7)
    (tmp_path / "leaderboard_seeds.csv").write_text("old\n")
    stage.leaderboard(tmp_path)
    assert stage.leaderboard_seeds_table(tmp_path).empty
    assert not (tmp_path / "leaderboard_seeds.csv").exists()
