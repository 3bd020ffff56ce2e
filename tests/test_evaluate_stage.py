"""Evaluate stage: per-category metrics.json (skipped when up to date), derived metrics.csv and
leaderboard, crop handling, re-rooted masks, parallel evaluations."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_toy_banks
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from test_metrics import ref_pro

import patchbank.stages.evaluate as stage
from patchbank.core.atomic import hostname
from patchbank.core.errors import DatasetError, ScoresError
from patchbank.evaluation.geometry import crop_box, eval_shape, reroot
from patchbank.stages.evaluate import (
    COLUMNS,
    METRIC_COLUMNS,
    evaluate,
    leaderboard,
    masks_and_maps,
    metrics_table,
)
from patchbank.stages.score import score_category
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, load_run, write_run

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_masks(root: Path, blocks: dict, size: int = 48) -> None:
    """Masks for the toy banks' anomalous blocks, at /<root>/widget/ground_truth/blob/."""
    folder = root / "widget" / "ground_truth" / "blob"
    folder.mkdir(parents=True)
    cell = size // 6
    for i, (r, c) in blocks.items():
        m = np.zeros((size, size), np.uint8)
        m[r * cell:(r + 2) * cell, c * cell:(c + 2) * cell] = 255
        Image.fromarray(m).save(folder / f"{i:03d}_mask.png")


def test_end_to_end_on_toy_banks(tmp_path: Path) -> None:
    blocks = write_toy_banks(tmp_path / "banks")
    write_masks(tmp_path / "data", blocks)
    scores = tmp_path / "scores"
    for method in ("patchcore", "knn", "mahalanobis"):
        score_category(tmp_path / "banks", scores, "toy", method, "widget", name=method)
        # masks moved: the stored /nowhere/... paths are re-rooted under --data-root
        table = evaluate(scores, "toy", method, ["widget"], data_root=tmp_path / "data",
                         figures=False)
        assert list(table.columns) == COLUMNS and COLUMNS[:len(METRIC_COLUMNS)] == METRIC_COLUMNS
        assert table["category"].tolist() == ["widget", "mean"]
        row = table.iloc[0]
        # the injected blocks make the toy test set perfectly separable at image level
        assert (row["image_auroc"], row["image_ap"], row["image_f1"]) == (1.0, 1.0, 1.0)
        assert (row["f1_precision"], row["f1_recall"], row["n_test"]) == (1.0, 1.0, 12)
        run = load_run(RunPaths.of(scores, "toy", method, "widget"))
        assert row["f1_threshold"] == run.scores["score"][run.scores["label"] == 1].min()
        assert row["fit_s"] == run.info["fit_s"] and row["score_s"] == run.info["score_s"]
        if method == "mahalanobis":  # image level: NaN survives the JSON round trip (null)
            assert np.isnan(row["pixel_auroc"]) and np.isnan(row["overall_score"])
            assert pd.isna(row["eval_resolution"])
            stored = json.loads((run_folder(scores, method) / "metrics.json").read_text())
            assert stored["metrics"]["pixel_auroc"] is None
        else:
            masks, maps = masks_and_maps(run, "widget", tmp_path / "data")
            assert [m.shape for m in masks] == [(48, 48)] * 12
            y = np.concatenate([m.ravel() for m in masks])
            s = np.concatenate([a.ravel() for a in maps])
            assert row["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
            assert row["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
            assert row["pro"] == pytest.approx(ref_pro(masks, maps), abs=1e-6)
            assert row["pixel_auroc"] > 0.95 and row["eval_resolution"] == "original"
            assert row["overall_score"] == pytest.approx(
                ((row["image_auroc"] + row["image_ap"]) / 2
                 + (row["pixel_auroc"] + row["best_dice"]) / 2) / 2)
        written = pd.read_csv(scores / "toy" / method / "metrics.csv")
        assert written["category"].tolist() == ["widget", "mean"]
        assert written["image_auroc"].iloc[-1] == pytest.approx(row["image_auroc"])
    board = leaderboard(scores)
    assert set(board["method"]) == {"patchcore", "knn", "mahalanobis"}
    assert board["method"].iloc[-1] == "mahalanobis"  # no pixel metrics ranks last
    assert board["n_categories"].tolist() == [1, 1, 1]
    md = (scores / "leaderboard.md").read_text()
    assert md.count("\n") == 2 + 3 and "| toy | patchcore | widget | 100.0 | 100.0 |" in md
    assert pd.read_csv(scores / "leaderboard.csv")["method"].tolist() == board["method"].tolist()


# --------------------------------------------------------------------------- hand-made runs


MASK = np.zeros((40, 40), np.uint8)
MASK[8:24, 16:32] = 255  # exactly the map cells [1:3, 2:4] of a 5x5 grid, 8 px each


def run_folder(scores: Path, method: str = "hand", category: str = "widget") -> Path:
    return scores / "toy" / method / category


def perfect_run(tmp_path: Path, crop: int | None = None, category: str = "widget",
                score_bad: float = 0.9, **info) -> RunPaths:
    """A hand-made run whose maps are the masks on a 5x5 grid (one good, one defective image)."""
    data = tmp_path / "data" / category / "ground_truth" / "blob"
    data.mkdir(parents=True, exist_ok=True)
    Image.fromarray(MASK).save(data / "001_mask.png")
    rows = [[f"/x/{category}/000.png", "good", 0, 0.1, "", 40, 40],
            [f"/x/{category}/001.png", "blob", 1, score_bad, str(data / "001_mask.png"), 40, 40]]
    maps = np.zeros((2, 5, 5), np.float32)
    maps[1, 1:3, 2:4] = 1.0
    paths = RunPaths.of(tmp_path / "scores", "toy", "hand", category)
    write_run(paths, pd.DataFrame(rows, columns=SCORE_COLUMNS), maps, None,
              {"method": "hand", "pixel_level": True, "map_sigma": 0.0, "input_size": crop or 40,
               "image_size": 40, "crop": crop, "fit_s": 1.0, "score_s": 2.0, **info})
    return paths


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resizing, align_corners=False (no torch)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(w, (np.arange(n_out), hi), x - lo)
    return w


def test_hand_run_metrics_equal_an_independent_reference(tmp_path: Path) -> None:
    perfect_run(tmp_path)
    row = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False).iloc[0]
    # the defective map, bilinearly upsampled 8x (sigma 0): blurred block edges, exact ranks
    w = bilinear_matrix(5, 40)
    block = np.zeros((5, 5))
    block[1:3, 2:4] = 1.0
    up = w @ block @ w.T
    y = np.r_[np.zeros(1600, bool), (MASK > 0).ravel()]
    s = np.r_[np.zeros(1600), up.ravel()]
    dice = max(2 * np.sum(y & (s >= t)) / (np.sum(s >= t) + y.sum()) for t in np.unique(s))
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert row["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert row["best_dice"] == pytest.approx(dice, abs=1e-9)
    assert row["pro"] == pytest.approx(ref_pro([np.zeros((40, 40)), MASK], [np.zeros((40, 40)),
                                                                             up]), abs=1e-9)
    # pinned: the same numbers as plain values
    assert (row["pixel_auroc"], row["pixel_ap"], row["pro"], row["best_dice"]) == pytest.approx(
        (0.999320652, 0.993252073, 0.997735507, 0.976), abs=1e-8)
    assert (row["image_auroc"], row["image_ap"], row["image_f1"], row["f1_threshold"]) == \
        (1.0, 1.0, 1.0, 0.9)
    assert row["pixel_score"] == pytest.approx((row["pixel_auroc"] + 0.976) / 2)
    assert (row["fit_s"], row["score_s"], row["eval_resolution"]) == (1.0, 2.0, "original")
    assert np.isnan(row["unsup_threshold"])  # no held-out train scores
    # at 20 px the 4x blur no longer crosses a threshold between block and background
    small = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], eval_size=20,
                     figures=False).iloc[0]
    assert small["eval_resolution"] == "20px"
    assert (small["pixel_auroc"], small["pixel_ap"], small["pro"], small["best_dice"]) == \
        (1.0, 1.0, 1.0, 1.0)


def test_crop_keeps_the_covered_region_of_masks(tmp_path: Path) -> None:
    # crop 20 of a 40 px input covers the middle 20 x 20 px of the 40 px image: rows 10..29
    paths = perfect_run(tmp_path, crop=20)
    masks, maps = masks_and_maps(load_run(paths), "widget")
    assert [m.shape for m in masks] == [(20, 20), (20, 20)] and maps[1].shape == (20, 20)
    np.testing.assert_array_equal(masks[1], MASK[10:30, 10:30] > 0)
    assert not masks[0].any()
    w = bilinear_matrix(5, 20)
    block = np.zeros((5, 5))
    block[1:3, 2:4] = 1.0
    np.testing.assert_allclose(maps[1], w @ block @ w.T, atol=1e-6)


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    paths = perfect_run(tmp_path)
    df = pd.read_csv(paths.image_scores, keep_default_na=False)
    df["height"] = 50
    df.to_csv(paths.image_scores, index=False)
    with pytest.raises(DatasetError, match="001_mask.png"):
        evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)


def test_run_without_map_sigma_is_malformed(tmp_path: Path) -> None:
    paths = perfect_run(tmp_path)
    info = json.loads(paths.run_json.read_text())
    del info["map_sigma"]
    paths.run_json.write_text(json.dumps(info))
    with pytest.raises(ScoresError, match=r"run.json: malformed pixel-level run \(map_sigma "
                                          r"missing\); re-score with --overwrite"):
        evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)
    assert not (paths.folder / "metrics.json").exists()


def test_crop_box_and_eval_shape() -> None:
    assert crop_box(900, 900, 256, None) == (slice(0, 900), slice(0, 900))
    ys, xs = crop_box(900, 900, 256, 224)  # 224/256 of 900 = 787.5 px, centred
    assert ys == xs == slice(56, 844)
    assert crop_box(600, 900, 256, 224) == (slice(38, 563), slice(56, 844))
    assert eval_shape(900, 600, 300) == (300, 200)
    assert eval_shape(100, 100, 300) == (100, 100)
    assert eval_shape(1024, 700, 256) == (256, 175)


def test_reroot(tmp_path: Path) -> None:
    assert reroot("/old/place/bottle/ground_truth/x/000_mask.png", tmp_path, "bottle") == \
        tmp_path / "bottle" / "ground_truth" / "x" / "000_mask.png"
    assert reroot("/old/a.png", None, "bottle") == Path("/old/a.png")


def test_load_run_of_missing_run_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ScoresError, match="scripts/score.py --backbone toy --method knn"):
        load_run(RunPaths.of(tmp_path, "toy", "knn", "widget"))


# --------------------------------------------------------------------------- metrics.json cache


def no_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("re-evaluated although up to date")

    monkeypatch.setattr(stage, "evaluate_run", refuse)
    monkeypatch.setattr(stage, "write_category_figures", refuse)


def test_metrics_json_is_reused_until_something_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paths = perfect_run(tmp_path)
    scores = tmp_path / "scores"
    first = evaluate(scores, "toy", "hand", ["widget"], figures=False)
    record = json.loads(paths.metrics_json.read_text())
    assert record["category"] == "widget" and record["figures"] is None
    assert set(record["metrics"]) == set(COLUMNS)
    assert record["metrics"]["pixel_auroc"] == first["pixel_auroc"].iloc[0]  # full precision
    assert record["key"]["eval_size"] is None and len(record["key"]["run"]) == 64

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, "patchbank.stages.evaluate"):
        no_recompute(m)
        again = evaluate(scores, "toy", "hand", ["widget"], figures=False)
    assert "toy/hand/widget: up to date, skipped" in caplog.text
    pd.testing.assert_frame_equal(again, first)

    def changed(what: str) -> None:
        caplog.clear()
        with caplog.at_level(logging.INFO, "patchbank.stages.evaluate"):
            assert stage.evaluate_category(scores, "toy", "hand", "widget", figures=False) == \
                "recomputed", what
        assert "recomputing" in caplog.text

    mask = tmp_path / "data" / "widget" / "ground_truth" / "blob" / "001_mask.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed("mask touched")
    perfect_run(tmp_path, score_bad=0.8)  # re-scored: new run.json and score files
    changed("run re-scored")
    assert stage.evaluate_category(scores, "toy", "hand", "widget", eval_size=20,
                                   figures=False) == "recomputed"
    assert stage.evaluate_category(scores, "toy", "hand", "widget", eval_size=20,
                                   figures=False) == "skipped"
    assert stage.evaluate_category(scores, "toy", "hand", "widget", eval_size=20,
                                   figures=False, overwrite=True) == "overwritten"
    assert json.loads(paths.metrics_json.read_text())["metrics"]["f1_threshold"] == 0.8

    paths.metrics_json.write_text("{ not json")
    with caplog.at_level(logging.WARNING, "patchbank.stages.evaluate"):
        assert stage.evaluate_category(scores, "toy", "hand", "widget", eval_size=20,
                                       figures=False) == "computed"
    assert "unreadable" in caplog.text
    assert [p.name for p in paths.folder.iterdir() if p.name.startswith(".")] == []


def test_cli_overwrite_forces_reevaluation(tmp_path: Path, capsys) -> None:
    from patchbank.cli.stages import evaluate_main

    paths = perfect_run(tmp_path)
    args = ["--backbone", "toy", "--method", "hand", "--scores-dir", str(tmp_path / "scores"),
            "--no-figures"]
    evaluate_main(args)
    first = paths.metrics_json.stat().st_mtime_ns
    evaluate_main(args)
    assert paths.metrics_json.stat().st_mtime_ns == first  # up to date: not rewritten
    time.sleep(0.01)
    evaluate_main([*args, "--overwrite"])
    assert paths.metrics_json.stat().st_mtime_ns != first
    assert "widget" in capsys.readouterr().out


def test_figures_drawn_when_recomputed_or_missing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    paths = perfect_run(tmp_path)
    scores = tmp_path / "scores"
    figs = scores / "toy" / "hand" / "figures"
    evaluate(scores, "toy", "hand", ["widget"], figures=False)
    assert not figs.exists()
    # metrics up to date, figures never drawn: drawn now (images are absent: no triplets)
    evaluate(scores, "toy", "hand", ["widget"])
    names = ["widget_roc_pr.png", "widget_hist.png"]
    assert json.loads(paths.metrics_json.read_text())["figures"] == names
    assert sorted(p.name for p in figs.iterdir()) == sorted(names)
    with monkeypatch.context() as m:
        no_recompute(m)
        evaluate(scores, "toy", "hand", ["widget"])  # everything present: nothing drawn
    (figs / "widget_hist.png").unlink()
    with monkeypatch.context() as m:
        m.setattr(stage, "evaluate_run", lambda *a, **k: pytest.fail("metrics recomputed"))
        evaluate(scores, "toy", "hand", ["widget"])
    assert (figs / "widget_hist.png").is_file()
    # a recomputed category redraws its figures and drops the ones it no longer has
    (figs / "widget_best_1_001.png").write_bytes(b"old")
    record = json.loads(paths.metrics_json.read_text())
    record["figures"].append("widget_best_1_001.png")
    paths.metrics_json.write_text(json.dumps(record))
    before = (figs / "widget_hist.png").stat().st_mtime_ns
    time.sleep(0.01)
    evaluate(scores, "toy", "hand", ["widget"], overwrite=True)
    assert (figs / "widget_hist.png").stat().st_mtime_ns != before
    assert sorted(p.name for p in figs.iterdir()) == sorted(names)


# --------------------------------------------------------------------------- derived tables


def test_tables_are_computed_from_the_per_category_files(tmp_path: Path) -> None:
    perfect_run(tmp_path, category="widget")
    perfect_run(tmp_path, category="gadget", score_bad=0.05)  # ranked below the good image
    scores = tmp_path / "scores"
    one = evaluate(scores, "toy", "hand", ["widget"], figures=False)
    assert one["category"].tolist() == ["widget", "mean"]
    both = evaluate(scores, "toy", "hand", ["gadget"], figures=False)
    assert both["category"].tolist() == ["gadget", "widget", "mean"]
    assert both["image_auroc"].tolist() == [0.0, 1.0, 0.5]  # mean of 0.0 and 1.0
    assert both["image_ap"].tolist() == [0.5, 1.0, 0.75]
    assert both["n_test"].tolist() == [2.0, 2.0, 2.0]
    pd.testing.assert_frame_equal(metrics_table(scores, "toy", "hand"), both)
    csv = pd.read_csv(scores / "toy" / "hand" / "metrics.csv")
    assert csv["image_auroc"].tolist() == [0.0, 1.0, 0.5]
    # a category whose result is gone is gone from the table (no stale rows kept elsewhere)
    (run_folder(scores, category="gadget") / "metrics.json").unlink()
    assert metrics_table(scores, "toy", "hand")["category"].tolist() == ["widget", "mean"]
    board = leaderboard(scores)
    assert board[["method", "n_categories", "categories"]].values.tolist() == \
        [["hand", 1, "widget"]]
    assert metrics_table(scores, "toy", "nothing").empty


def test_old_style_metrics_csv_is_recomputed(tmp_path: Path) -> None:
    perfect_run(tmp_path)
    out = tmp_path / "scores" / "toy" / "hand" / "metrics.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"category": ["gadget", "widget", "mean"], "image_auroc": [0.5, 0.1, 0.3]}
                 ).to_csv(out, index=False)
    table = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)
    assert table["category"].tolist() == ["widget", "mean"]
    assert pd.read_csv(out)["image_auroc"].tolist() == [1.0, 1.0]


PARALLEL = """
import sys, time
from pathlib import Path
from patchbank.stages.evaluate import evaluate
scores, category, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for _ in range(6):
    evaluate(scores, "toy", "hand", [category], figures=False, overwrite=True)
"""


def test_parallel_evaluations_of_two_categories_keep_both(tmp_path: Path) -> None:
    perfect_run(tmp_path, category="widget")
    perfect_run(tmp_path, category="gadget", score_bad=0.05)
    scores, go = tmp_path / "scores", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL, str(scores), c, str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in ("widget", "gadget")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for table in (metrics_table(scores, "toy", "hand"),
                  pd.read_csv(scores / "toy" / "hand" / "metrics.csv")):
        assert table["category"].tolist() == ["gadget", "widget", "mean"]
        assert table["image_auroc"].tolist() == [0.0, 1.0, 0.5]
    assert leaderboard(scores)["categories"].tolist() == ["gadget,widget"]
    leftovers = [p for p in scores.rglob("*.tmp")]
    assert leftovers == []


def test_temporaries_of_killed_evaluations_are_swept(tmp_path: Path) -> None:
    paths = perfect_run(tmp_path)
    scores = tmp_path / "scores"
    figs = scores / "toy" / "hand" / "figures"
    figs.mkdir(parents=True)
    dead = [paths.folder / f".metrics.json.{hostname()}.999999999.00.tmp",
            figs / f".widget_hist.png.{hostname()}.999999999.00.tmp",
            scores / f".leaderboard.md.{hostname()}.999999999.00.tmp"]
    for p in dead:
        p.write_text("partial")
    evaluate(scores, "toy", "hand", ["widget"], figures=False)
    assert [p for p in dead if p.exists()] == []
