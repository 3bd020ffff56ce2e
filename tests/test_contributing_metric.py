"""The README's CONTRIBUTING recipe "Add a metric", followed literally: two image-level metrics
registered from outside the package, the real evaluate stage on a toy run, the values (by
hand) and intervals read back from every table, then unregistered; bad registrations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.core.errors import MetricError
from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation.by_defect import BY_DEFECT_COLUMNS, defect_seed
from patchbank.evaluation.registry import METRICS, register_metric, unregister_metric
from patchbank.stages import evaluate as stage
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, write_run

N_BOOT = 200
NEW = ["tnr_at_95_tpr", "tnr_at_95_tpr_lo", "tnr_at_95_tpr_hi",
       "fpr_at_95_tpr", "fpr_at_95_tpr_lo", "fpr_at_95_tpr_hi"]


# Step 1: the function: (labels 0/1, scores) -> float.
def tnr_at_95_tpr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of good images below the highest threshold that flags >= 95 % of the defective."""
    pos = np.sort(scores[labels == 1])[::-1]
    threshold = pos[int(np.ceil(0.95 * pos.size)) - 1]
    return float(np.mean(scores[labels == 0] < threshold))


def fpr_at_95_tpr(labels: np.ndarray, scores: np.ndarray) -> float:
    """1 - tnr_at_95_tpr (lower is better)."""
    return 1.0 - tnr_at_95_tpr(labels, scores)


def toy_run(scores_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image-level run: 10 good images scored 0, 0.5, ..., 4.5; 10 "crack" scored 11..20 and
    10 "dent" scored 1..10. Returns (labels, scores) in image_scores.csv order."""
    good = np.arange(10) * 0.5
    crack, dent = np.arange(11, 21.0), np.arange(1, 11.0)
    rows = [[f"/x/widget/g{i}.png", "good", 0, float(s), "", 24, 24] for i, s in enumerate(good)]
    rows += [[f"/x/widget/c{i}.png", "crack", 1, float(s), "", 24, 24] for i, s in enumerate(crack)]
    rows += [[f"/x/widget/d{i}.png", "dent", 1, float(s), "", 24, 24] for i, s in enumerate(dent)]
    write_run(RunPaths.of(scores_dir, "toy", "flat", "widget"),
              pd.DataFrame(rows, columns=SCORE_COLUMNS), None, None,
              {"method": "flat", "pixel_level": False, "map_sigma": 0.0, "input_size": 24,
               "image_size": 24, "fit_s": 1.0, "score_s": 1.0})
    return np.r_[np.zeros(10), np.ones(20)].astype(int), np.r_[good, crack, dent]


def interval(fn: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray,
             scores: np.ndarray, seed: int) -> tuple[float, float]:
    """The percentile interval of ``fn`` over the stage's stratified resamples, by hand."""
    idx = bs.stratified_indices(labels, N_BOOT, seed)
    reps = [fn(labels[i], scores[i]) for i in idx]
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


def test_add_a_metric(tmp_path: Path) -> None:
    scores = tmp_path / "scores"
    labels, values = toy_run(scores)
    evaluate = stage.evaluate
    evaluate(scores, "toy", "flat", ["widget"], figures=False, bootstrap=N_BOOT)
    stage.leaderboard(scores)
    board_before = list(pd.read_csv(scores / "leaderboard.csv").columns)
    # Step 2: register (in the package: one line at the end of evaluation/registry.py).
    register_metric("tnr_at_95_tpr", tnr_at_95_tpr)
    register_metric("fpr_at_95_tpr", fpr_at_95_tpr, higher_is_better=False)
    try:
        # Step 3: the evaluate stage, unchanged; up-to-date categories are re-evaluated once.
        evaluate(scores, "toy", "flat", ["widget"], figures=False, bootstrap=N_BOOT)
        assert stage.evaluate_category(scores, "toy", "flat", "widget", figures=False,
                                       bootstrap=N_BOOT) == "skipped"
        stage.leaderboard(scores)
        folder = scores / "toy" / "flat"
        lo, hi = interval(tnr_at_95_tpr, labels, values, stage.category_seed(0, "widget"))
        assert 0.0 <= lo < 0.4 < hi <= 1.0
        record = json.loads((folder / "widget" / "metrics.json").read_text())
        m = record["metrics"]
        assert m["tnr_at_95_tpr"] == pytest.approx(0.4)  # good 0, 0.5, 1, 1.5 < threshold 2
        assert (m["tnr_at_95_tpr_lo"], m["tnr_at_95_tpr_hi"]) == pytest.approx((lo, hi))
        assert m["fpr_at_95_tpr"] == pytest.approx(0.6)
        assert (m["fpr_at_95_tpr_lo"], m["fpr_at_95_tpr_hi"]) == pytest.approx((1 - hi, 1 - lo))
        # built-ins unchanged: dent d beats 2(d - 1) good images + a tie up to d = 4, crack all
        assert m["image_auroc"] == pytest.approx((100 + 2.5 + 4.5 + 6.5 + 8.5 + 60) / 200)
        assert record["key"]["metrics"] == ["tnr_at_95_tpr", "fpr_at_95_tpr"]
        npz = np.load(folder / "widget" / "bootstrap.npz")
        assert npz["tnr_at_95_tpr"].shape == (N_BOOT,)
        csv = pd.read_csv(folder / "metrics.csv")
        assert list(csv.columns) == stage.COLUMNS + NEW  # new columns after every built-in one
        assert csv["tnr_at_95_tpr"].tolist() == pytest.approx([0.4, 0.4])  # widget, mean
        assert csv["tnr_at_95_tpr_lo"].tolist() == pytest.approx([lo, lo], abs=1e-5)
        board = pd.read_csv(scores / "leaderboard.csv")
        assert list(board.columns) == board_before + NEW
        assert board.loc[0, "tnr_at_95_tpr_hi"] == pytest.approx(hi, abs=1e-5)
        md = (scores / "leaderboard.md").read_text().splitlines()
        assert md[0].endswith("| score_s | tnr_at_95_tpr | fpr_at_95_tpr ↓ |")
        assert md[2].endswith(f"| 40.0 [{100 * lo:.1f}, {100 * hi:.1f}] "
                              f"| 60.0 [{100 * (1 - hi):.1f}, {100 * (1 - lo):.1f}] |")
        # per defect: crack 11..20 (threshold 11: every good image below), dent 1..10 (1)
        by_defect = pd.read_csv(folder / "widget" / "by_defect.csv")
        assert list(by_defect.columns) == BY_DEFECT_COLUMNS + NEW
        crack, dent = by_defect.iloc[0], by_defect.iloc[1]
        assert (crack["defect_type"], dent["defect_type"]) == ("crack", "dent")
        assert (crack["tnr_at_95_tpr"], crack["tnr_at_95_tpr_lo"]) == (1.0, 1.0)
        sub = np.r_[np.arange(10), np.arange(20, 30)]
        seed = defect_seed(stage.category_seed(0, "widget"), "dent")
        assert dent["tnr_at_95_tpr"] == pytest.approx(0.2)
        assert (dent["tnr_at_95_tpr_lo"], dent["tnr_at_95_tpr_hi"]) == pytest.approx(
            interval(tnr_at_95_tpr, labels[sub], values[sub], seed), abs=1e-5)
        views = pd.read_csv(scores / "leaderboard_by_defect.csv")
        assert views["tnr_at_95_tpr"].tolist() == pytest.approx([1.0, 0.2])
        assert "| tnr_at_95_tpr | fpr_at_95_tpr ↓ |" in \
            (scores / "leaderboard_by_defect.md").read_text()
    finally:
        unregister_metric("tnr_at_95_tpr")  # other tests see the built-in metrics only
        unregister_metric("fpr_at_95_tpr")
    # unregistered: re-evaluated once more, every table back to the built-in columns
    assert stage.evaluate_category(scores, "toy", "flat", "widget", figures=False,
                                   bootstrap=N_BOOT) == "recomputed"
    evaluate(scores, "toy", "flat", ["widget"], figures=False, bootstrap=N_BOOT)
    stage.leaderboard(scores)
    assert list(pd.read_csv(scores / "toy" / "flat" / "metrics.csv").columns) == stage.COLUMNS
    assert list(pd.read_csv(scores / "leaderboard.csv").columns) == board_before


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("image_auroc", {}, "would write column 'image_auroc', which the evaluate stage"),
    ("pro", {}, "would write column 'pro', which the evaluate stage"),
    ("unsup", {}, None),  # 'unsup', 'unsup_lo', 'unsup_hi' are free
    ("image_f1_lo", {}, "would write column 'image_f1_lo', which the evaluate stage"),
    ("categories", {}, "would write column 'categories'"),
    ("TNR@95", {}, "use lower_snake_case"),
    ("pixel_thing", {"level": "pixel"}, "level 'pixel' is not pluggable"),
])
def test_bad_registrations(name: str, kwargs: dict, message: str | None) -> None:
    if message is None:
        register_metric(name, tnr_at_95_tpr, **kwargs)
        unregister_metric(name)
        return
    with pytest.raises(MetricError, match=message):
        register_metric(name, tnr_at_95_tpr, **kwargs)
    assert name not in METRICS or METRICS[name].builtin


def test_duplicates_and_clashes_between_registered_metrics() -> None:
    register_metric("tnr_at_95_tpr", tnr_at_95_tpr)
    try:
        with pytest.raises(MetricError, match="'tnr_at_95_tpr' is already registered"):
            register_metric("tnr_at_95_tpr", fpr_at_95_tpr)
        with pytest.raises(MetricError, match="which metric 'tnr_at_95_tpr' already writes"):
            register_metric("tnr_at_95_tpr_lo", tnr_at_95_tpr)
        with pytest.raises(MetricError, match="must be callable"):
            register_metric("other", "not a function")  # type: ignore[arg-type]
        with pytest.raises(MetricError, match="built in and cannot be unregistered"):
            unregister_metric("image_auroc")
    finally:
        unregister_metric("tnr_at_95_tpr")
    assert list(METRICS) == ["image_auroc", "image_ap", "image_f1"]


def test_a_metric_returning_no_number_fails_the_category(tmp_path: Path) -> None:
    scores = tmp_path / "scores"
    toy_run(scores)
    register_metric("broken", lambda labels, scores: None)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(MetricError, match="metric 'broken': its function returned NoneType"):
            stage.evaluate(scores, "toy", "flat", ["widget"], figures=False, bootstrap=0)
    finally:
        unregister_metric("broken")
