"""AUPIMO in the evaluate stage: metrics.json/csv, its interval, per_image.csv, per-defect rows,
the leaderboard, and NaN with a reason for image-level runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation.aupimo import aupimo_scores
from patchbank.stages import evaluate as stage
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, load_run, write_run

TYPES = ("hole", "scratch")
SIZE = 128  # 8 good images x 128^2 pixels: FPR 1e-5 is reachable


def pixel_run(root: Path, category: str, seed: int = 0, n_good: int = 8, n_bad: int = 6) -> None:
    """A pixel-level run on 128x128 images (maps at full size, sigma 0)."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / category / "ground_truth"
    rows, maps = [], []
    for i in range(n_good + n_bad):
        amap = rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32)
        if i < n_good:
            rows.append([f"/x/{category}/{i:03d}.png", "good", 0, float(amap.max()), "", SIZE,
                         SIZE])
        else:
            kind = TYPES[i % 2]
            r, c = rng.integers(0, SIZE - 32, 2)
            m = np.zeros((SIZE, SIZE), np.uint8)
            m[r:r + 32, c:c + 32] = 255
            amap[r:r + 32, c:c + 32] += rng.uniform(1.0, 5.0)
            (folder / kind).mkdir(parents=True, exist_ok=True)
            mask_path = folder / kind / f"{i:03d}_mask.png"
            Image.fromarray(m).save(mask_path)
            rows.append([f"/x/{category}/{i:03d}.png", kind, 1, float(amap.max()),
                         str(mask_path), SIZE, SIZE])
        maps.append(amap)
    write_run(RunPaths.of(root / "scores", "toy", "px", category),
              pd.DataFrame(rows, columns=SCORE_COLUMNS), np.stack(maps), None,
              {"method": "px", "pixel_level": True, "map_sigma": 0.0, "input_size": SIZE,
               "image_size": SIZE, "fit_s": 1.0, "score_s": 1.0})


def test_mean_replicates_known_numbers() -> None:
    values = np.array([np.nan, 0.2, 0.6, np.nan])
    weights = np.array([[1, 1, 1, 1], [0, 3, 1, 0], [2, 0, 0, 2]], dtype=float)
    out = bs.mean_replicates(values, weights)
    assert out[:2] == pytest.approx([0.4, 0.3]) and np.isnan(out[2])


def test_aupimo_in_every_table(tmp_path: Path) -> None:
    pixel_run(tmp_path, "widget")
    scores = tmp_path / "scores"
    stage.evaluate(scores, "toy", "px", ["widget"], figures=False, bootstrap=200)
    paths = RunPaths.of(scores, "toy", "px", "widget")
    masks, maps = stage.masks_and_maps(load_run(paths), "widget")
    per_image = aupimo_scores(masks, maps)
    assert np.isfinite(per_image[8:]).all() and np.isnan(per_image[:8]).all()
    record = json.loads(paths.metrics_json.read_text())["metrics"]
    assert record["aupimo"] == pytest.approx(per_image[8:].mean(), abs=1e-12)
    # the interval: the same replicate indices as the other metrics, weighted means of AUPIMO
    labels = load_run(paths).scores["label"].to_numpy(int)
    idx = bs.stratified_indices(labels, 200, bs.category_seed(0, "widget"))
    reps = bs.mean_replicates(per_image, bs.index_weights(idx, len(labels)))
    assert (record["aupimo_lo"], record["aupimo_hi"]) == \
        pytest.approx(bs.percentile_interval(reps, 0.95), abs=1e-12)
    assert record["aupimo_lo"] <= record["aupimo"] <= record["aupimo_hi"]
    with np.load(paths.folder / "bootstrap.npz") as npz:
        assert npz["aupimo"] == pytest.approx(reps, abs=1e-12)
    # per_image.csv: one row per test image, in image_scores.csv order
    pim = pd.read_csv(paths.folder / "per_image.csv", keep_default_na=False, na_values=[""])
    assert list(pim.columns) == ["path", "defect_type", "label", "aupimo"]
    assert pim["label"].tolist() == labels.tolist()
    assert pim["aupimo"].to_numpy() == pytest.approx(per_image, abs=1e-6, nan_ok=True)
    # metrics.csv (the mean row's interval from bootstrap.npz), per-defect rows, leaderboard
    csv = pd.read_csv(scores / "toy" / "px" / "metrics.csv")
    mean = csv[csv["category"] == "mean"].iloc[0]
    assert mean["aupimo"] == pytest.approx(record["aupimo"], abs=1e-6)
    assert mean["aupimo_lo"] == pytest.approx(record["aupimo_lo"], abs=1e-6)
    by_defect = pd.read_csv(scores / "toy" / "px" / "metrics_by_defect.csv")
    types = pim["defect_type"].to_numpy()
    for _, row in by_defect.iterrows():
        mine = per_image[types == row["defect_type"]]
        assert row["aupimo"] == pytest.approx(mine.mean(), abs=1e-6)
        assert row["aupimo_lo"] <= row["aupimo"] + 1e-9 <= row["aupimo_hi"] + 2e-9
    board = stage.leaderboard(scores)
    assert board.loc[0, "aupimo"] == pytest.approx(record["aupimo"], abs=1e-6)
    assert "aupimo" in (scores / "leaderboard.md").read_text().splitlines()[0]
    assert "aupimo" in pd.read_csv(scores / "leaderboard.csv").columns


def test_image_level_run_has_nan_aupimo_with_a_reason(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rows = [[f"/x/w/{i}.png", "good" if i < 5 else "a", int(i >= 5), 0.1 * i, "", 10, 10]
            for i in range(10)]
    write_run(RunPaths.of(tmp_path, "toy", "img", "w"), pd.DataFrame(rows, columns=SCORE_COLUMNS),
              None, None, {"method": "img", "pixel_level": False, "fit_s": 1.0, "score_s": 1.0})
    with caplog.at_level(logging.INFO, "patchbank.stages.evaluate"):
        table = stage.evaluate(tmp_path, "toy", "img", ["w"], figures=False, bootstrap=100)
    assert "AUPIMO undefined (NaN): image-level run" in caplog.text
    assert table[["aupimo", "aupimo_lo", "aupimo_hi"]].isna().all().all()
    pim = pd.read_csv(tmp_path / "toy" / "img" / "w" / "per_image.csv")
    assert len(pim) == 10 and pim["aupimo"].isna().all()
