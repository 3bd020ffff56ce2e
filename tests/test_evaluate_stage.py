"""Evaluate stage: metrics.csv, leaderboard, crop handling, re-rooted masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_toy_banks
from PIL import Image

from patchbank.core.errors import DatasetError
from patchbank.stages.evaluate import (
    METRIC_COLUMNS,
    crop_box,
    eval_shape,
    evaluate,
    leaderboard,
    reroot,
)
from patchbank.stages.score import score_category
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, load_run, write_run


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
    for method in ("patchcore", "knn", "mahalanobis"):
        score_category(tmp_path / "banks", tmp_path / "scores", "toy", method, "widget")
        # masks moved: the stored /nowhere/... paths are re-rooted under --data-root
        table = evaluate(tmp_path / "scores", "toy", method, ["widget"],
                         data_root=tmp_path / "data", figures=False)
        assert list(table.columns[:len(METRIC_COLUMNS)]) == METRIC_COLUMNS
        assert table["category"].tolist() == ["widget", "mean"]
        row = table.iloc[0]
        assert row["image_auroc"] == 1.0 and row["image_ap"] == 1.0 and row["image_f1"] == 1.0
        if method == "mahalanobis":
            assert np.isnan(row["pixel_auroc"]) and np.isnan(row["overall_score"])
        else:
            assert row["pixel_auroc"] > 0.95 and row["pro"] > 0.8
            assert row["overall_score"] == pytest.approx(
                ((row["image_auroc"] + row["image_ap"]) / 2
                 + (row["pixel_auroc"] + row["best_dice"]) / 2) / 2)
        written = pd.read_csv(tmp_path / "scores" / "toy" / method / "metrics.csv")
        assert written["image_auroc"].iloc[-1] == pytest.approx(row["image_auroc"])
    board = leaderboard(tmp_path / "scores")
    assert set(board["method"]) == {"patchcore", "knn", "mahalanobis"}
    assert board["method"].iloc[-1] == "mahalanobis"  # no pixel metrics ranks last
    md = (tmp_path / "scores" / "leaderboard.md").read_text()
    assert md.count("\n") == 2 + 3 and "| toy | patchcore |" in md


def perfect_run(tmp_path: Path, crop: int | None = None) -> RunPaths:
    """A hand-made run whose maps are exactly the (downsampled) masks."""
    data = tmp_path / "data" / "widget" / "ground_truth" / "blob"
    data.mkdir(parents=True)
    mask = np.zeros((40, 40), np.uint8)
    mask[8:24, 16:32] = 255
    Image.fromarray(mask).save(data / "001_mask.png")
    rows = [["/x/000.png", "good", 0, 0.1, "", 40, 40],
            ["/x/001.png", "blob", 1, 0.9, str(data / "001_mask.png"), 40, 40]]
    maps = np.zeros((2, 5, 5), np.float32)
    maps[1, 1:3, 2:4] = 1.0
    paths = RunPaths.of(tmp_path / "scores", "toy", "hand", "widget")
    write_run(paths, pd.DataFrame(rows, columns=SCORE_COLUMNS), maps, None,
              {"method": "hand", "pixel_level": True, "map_sigma": 0.0, "input_size": 40,
               "image_size": 40, "crop": crop, "fit_s": 1.0, "score_s": 2.0})
    return paths


def test_perfect_maps_score_one(tmp_path: Path) -> None:
    perfect_run(tmp_path)
    row = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False).iloc[0]
    # bilinear upsampling blurs the block edge by a few pixels, but ranking is perfect inside
    assert row["pixel_auroc"] > 0.99 and row["pro"] > 0.95 and row["best_dice"] > 0.9
    assert row["fit_s"] == 1.0 and row["eval_resolution"] == "original"
    small = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], eval_size=20,
                     figures=False).iloc[0]
    assert small["eval_resolution"] == "20px" and small["pixel_auroc"] > 0.99


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    paths = perfect_run(tmp_path)
    df = pd.read_csv(paths.image_scores, keep_default_na=False)
    df["height"] = 50
    df.to_csv(paths.image_scores, index=False)
    with pytest.raises(DatasetError, match="001_mask.png"):
        evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)


def test_crop_box_and_eval_shape() -> None:
    assert crop_box(900, 900, 256, None) == (slice(0, 900), slice(0, 900))
    ys, xs = crop_box(900, 900, 256, 224)  # 224/256 of 900 = 787.5 px, centred
    assert ys == xs and ys.stop - ys.start == 788 and ys.start == 56
    assert eval_shape(900, 600, 300) == (300, 200)
    assert eval_shape(100, 100, 300) == (100, 100)


def test_reroot(tmp_path: Path) -> None:
    assert reroot("/old/place/bottle/ground_truth/x/000_mask.png", tmp_path, "bottle") == \
        tmp_path / "bottle" / "ground_truth" / "x" / "000_mask.png"
    assert reroot("/old/a.png", None, "bottle") == Path("/old/a.png")


def test_load_run_of_missing_run_says_what_to_run(tmp_path: Path) -> None:
    from patchbank.core.errors import ScoresError

    with pytest.raises(ScoresError, match="scripts/score.py --backbone toy --method knn"):
        load_run(RunPaths.of(tmp_path, "toy", "knn", "widget"))


def test_evaluating_one_category_keeps_the_others(tmp_path: Path) -> None:
    perfect_run(tmp_path)
    out = tmp_path / "scores" / "toy" / "hand" / "metrics.csv"
    evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)
    table = pd.read_csv(out)
    other = table.iloc[[0]].assign(category="gadget", image_auroc=0.5)
    pd.concat([other, table]).to_csv(out, index=False)
    merged = evaluate(tmp_path / "scores", "toy", "hand", ["widget"], figures=False)
    assert merged["category"].tolist() == ["gadget", "widget", "mean"]
    assert merged["image_auroc"].iloc[-1] == pytest.approx(0.75)  # mean of 0.5 and 1.0
