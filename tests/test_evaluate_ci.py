"""Evaluate stage with bootstrap intervals: metrics.json/csv columns, the mean's interval,
per-defect tables, leaderboard views, and what changes re-evaluate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchbank.core.errors import ScoresError
from patchbank.evaluation import bootstrap as bs
from patchbank.stages import evaluate as stage
from patchbank.stages.evaluate import CI_COLUMNS, evaluate, leaderboard
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, write_run

TYPES = ("hole", "scratch", "stain")


def noisy_run(root: Path, category: str, seed: int, n_good: int = 8, n_bad: int = 9) -> None:
    """A pixel-level run on 24x24 images (maps on a 6x6 grid, sigma 0) that is not separable."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / category / "ground_truth"
    rows, maps = [], []
    for i in range(n_good + n_bad):
        amap = rng.normal(0, 1, (6, 6)).astype(np.float32)
        if i < n_good:
            rows.append([f"/x/{category}/{i:03d}.png", "good", 0, float(amap.max()), "", 24, 24])
        else:
            kind = TYPES[i % 3]
            r, c = rng.integers(0, 4, 2)
            m = np.zeros((24, 24), np.uint8)
            m[4 * r:4 * r + 8, 4 * c:4 * c + 8] = 255
            amap[r:r + 2, c:c + 2] += rng.uniform(0.0, 2.0)
            (folder / kind).mkdir(parents=True, exist_ok=True)
            mask_path = folder / kind / f"{i:03d}_mask.png"
            Image.fromarray(m).save(mask_path)
            rows.append([f"/x/{category}/{i:03d}.png", kind, 1, float(amap.max()),
                         str(mask_path), 24, 24])
        maps.append(amap)
    write_run(RunPaths.of(root / "scores", "toy", "noisy", category),
              pd.DataFrame(rows, columns=SCORE_COLUMNS), np.stack(maps), None,
              {"method": "noisy", "pixel_level": True, "map_sigma": 0.0, "input_size": 24,
               "image_size": 24, "fit_s": 1.0, "score_s": 1.0})


def test_intervals_in_every_table(tmp_path: Path) -> None:
    for seed, category in enumerate(("gadget", "widget")):
        noisy_run(tmp_path, category, seed, n_good=20, n_bad=24)
    scores = tmp_path / "scores"
    table = evaluate(scores, "toy", "noisy", ["gadget", "widget"], figures=False, bootstrap=1000)
    csv = pd.read_csv(scores / "toy" / "noisy" / "metrics.csv")
    assert set(CI_COLUMNS) <= set(csv.columns) and csv["category"].tolist()[-1] == "mean"
    for m in bs.CI_METRICS:
        assert (csv[f"{m}_lo"] <= csv[m] + 1e-9).all() and (csv[m] <= csv[f"{m}_hi"] + 1e-9).all()
    pooled = []
    for category in ("gadget", "widget"):
        df = pd.read_csv(scores / "toy" / "noisy" / category / "image_scores.csv")
        y, s = df["label"].to_numpy(), df["score"].to_numpy()
        # same seed: the stored interval is exactly the library's; naive sklearn agrees
        expect = bs.bootstrap_cis(y, s, None, 1000, seed=stage.category_seed(0, category))
        row = csv[csv["category"] == category].iloc[0]
        assert (row["image_auroc_lo"], row["image_auroc_hi"]) == \
            pytest.approx(expect["image_auroc"], abs=1e-6)
        rng = np.random.default_rng(9)
        good, bad = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
        naive = []
        for _ in range(2000):  # pairwise AUROC, independent of the library's ranks
            neg, pos = s[rng.choice(good, good.size)], s[rng.choice(bad, bad.size)]
            naive.append(np.mean((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)))
        assert roc_auc_score(y, s) == pytest.approx(row["image_auroc"], abs=1e-6)
        assert (row["image_auroc_lo"], row["image_auroc_hi"]) == \
            pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=0.03)
        idx = bs.stratified_indices(y, 1000, stage.category_seed(0, category))
        pooled.append(bs.image_replicates(y, s, idx)["image_auroc"])
        npz = np.load(scores / "toy" / "noisy" / category / "bootstrap.npz")
        assert np.allclose(npz["image_auroc"], pooled[-1])
        record = json.loads((scores / "toy" / "noisy" / category / "metrics.json").read_text())
        assert record["bootstrap"]["token"] == str(npz["token"])
        assert record["key"]["bootstrap"] == {"n_boot": 1000, "ci": 0.95, "seed": 0}
    # the mean's interval: per-replicate mean over categories, each resampled within itself
    mean = csv.iloc[-1]
    lo, hi = np.percentile(np.mean(pooled, axis=0), [2.5, 97.5])
    assert (mean["image_auroc_lo"], mean["image_auroc_hi"]) == pytest.approx((lo, hi), abs=1e-6)
    assert mean["image_auroc_hi"] - mean["image_auroc_lo"] < \
        min(table["image_auroc_hi"][:2] - table["image_auroc_lo"][:2])  # averaging narrows
    by_defect = pd.read_csv(scores / "toy" / "noisy" / "metrics_by_defect.csv")
    assert by_defect[["category", "defect_type"]].values.tolist() == \
        [[c, t] for c in ("gadget", "widget") for t in TYPES]
    assert by_defect["n_images"].tolist() == [8] * 6
    assert by_defect[["pixel_auroc", "pro_lo", "best_dice_hi"]].notna().all().all()
    leaderboard(scores)
    md = (scores / "leaderboard.md").read_text()
    cell = f"{100 * mean['image_auroc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert cell in md
    board = pd.read_csv(scores / "leaderboard.csv")
    assert board["pro_lo"].iloc[0] == pytest.approx(mean["pro_lo"], abs=1e-5)
    assert len(pd.read_csv(scores / "leaderboard_by_defect.csv")) == 6
    assert (scores / "leaderboard_by_defect.md").read_text().count("| toy | noisy |") == 6
    assert (scores / "defect_heatmap.png").stat().st_size > 1000


def test_bootstrap_settings_are_part_of_the_key(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    noisy_run(tmp_path, "widget", 0)
    scores = tmp_path / "scores"
    run = stage.evaluate_category
    assert run(scores, "toy", "noisy", "widget", figures=False, bootstrap=0) == "computed"
    paths = RunPaths.of(scores, "toy", "noisy", "widget")
    record = json.loads(paths.metrics_json.read_text())
    assert all(record["metrics"][c] is None for c in CI_COLUMNS) and record["bootstrap"] is None
    assert not (paths.folder / "bootstrap.npz").exists()
    point = record["metrics"]["image_auroc"]
    assert run(scores, "toy", "noisy", "widget", figures=False, bootstrap=200) == "recomputed"
    assert run(scores, "toy", "noisy", "widget", figures=False, bootstrap=200) == "skipped"
    assert run(scores, "toy", "noisy", "widget", figures=False, bootstrap=200,
               ci=0.9) == "recomputed"
    record = json.loads(paths.metrics_json.read_text())
    assert record["metrics"]["image_auroc"] == point  # point estimates do not move
    assert record["metrics"]["image_auroc_lo"] < point < record["metrics"]["image_auroc_hi"]
    with pytest.raises(ScoresError, match="at least 100"):
        evaluate(scores, "toy", "noisy", ["widget"], figures=False, bootstrap=50)
    record["format"] = 1  # written by the previous patchbank: stale, recomputed
    paths.metrics_json.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, "patchbank.stages.evaluate"):
        assert run(scores, "toy", "noisy", "widget", figures=False, bootstrap=200,
                   ci=0.9) == "computed"
    assert "older patchbank (format 1, now 2)" in caplog.text
    # a replicate file that does not belong to metrics.json: no interval for the mean
    np.savez(paths.folder / "bootstrap.npz", token=np.array("other"),
             **{k: np.zeros(200) for k in bs.CI_METRICS})
    mean = stage.metrics_table(scores, "toy", "noisy").iloc[-1]
    assert np.isnan(mean["image_auroc_lo"]) and mean["image_auroc"] == point


def test_image_level_run_without_masks(tmp_path: Path) -> None:
    rows = [[f"/x/w/{i}.png", "good" if i < 5 else ("a", "b")[i % 2], int(i >= 5),
             0.1 * i + (0.3 if i % 3 == 0 else 0.0), "", 10, 10] for i in range(12)]
    write_run(RunPaths.of(tmp_path, "toy", "img", "w"), pd.DataFrame(rows, columns=SCORE_COLUMNS),
              None, None, {"method": "img", "pixel_level": False, "fit_s": 1.0, "score_s": 1.0})
    table = evaluate(tmp_path, "toy", "img", ["w"], figures=False, bootstrap=100)
    assert table["image_auroc_lo"].notna().all() and table["pro_lo"].isna().all()
    by_defect = pd.read_csv(tmp_path / "toy" / "img" / "metrics_by_defect.csv")
    assert by_defect["defect_type"].tolist() == ["a", "b"]
    assert by_defect["pixel_auroc"].isna().all() and by_defect["image_auroc_lo"].notna().all()
