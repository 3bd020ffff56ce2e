"""Figures: PNGs written with the right layout, example picking, per-category figure sets."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from patchbank.core.errors import ScoresError
from patchbank.data.demo import make_demo_dataset
from patchbank.data.mvtec import discover, load_image, load_mask
from patchbank.evaluation.figures import (
    heatmap_triplet,
    load_example,
    map_range,
    pick_examples,
    roc_pr_curves,
    score_histogram,
    write_category_figures,
)
from patchbank.stages.evaluate import masks_and_maps
from patchbank.store.runs import SCORE_COLUMNS, ScoreRun

GRID = 8


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# --------------------------------------------------------------------------- single figures


def test_heatmap_triplet_three_panels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
    heat = np.zeros((60, 80), np.float32)
    heat[20:30, 30:40] = 1.0
    mask = heat > 0
    with_mask = heatmap_triplet(image, heat, mask, tmp_path / "a" / "t.png", title="x",
                                vmin=0.0, vmax=2.0)
    no_mask = heatmap_triplet(image, heat, None, tmp_path / "t0.png", title="x",
                              vmin=0.0, vmax=2.0)
    assert with_mask == tmp_path / "a" / "t.png"
    w, h = png_size(with_mask)
    assert w > 2 * h  # three panels side by side
    assert png_size(no_mask) == (w, h)
    # the only difference is the ground-truth panel: white defect vs all black
    a = np.asarray(Image.open(with_mask).convert("L"), dtype=int)
    b = np.asarray(Image.open(no_mask).convert("L"), dtype=int)
    cols = np.flatnonzero((a != b).any(axis=0))
    assert cols.size and cols.min() > 2 * w // 3 - 20
    assert a.sum() > b.sum()
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_heatmap_triplet_rejects_mismatched_shapes(tmp_path: Path) -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="heatmap"):
        heatmap_triplet(image, np.zeros((10, 11)), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="mask"):
        heatmap_triplet(image, np.zeros((10, 10)), np.zeros((9, 10), bool), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_roc_pr_curves_two_panels(tmp_path: Path) -> None:
    labels = [0, 0, 0, 1, 1, 1]
    path = roc_pr_curves(labels, [0.1, 0.4, 0.35, 0.8, 0.3, 0.9], tmp_path / "roc.png", "t")
    w, h = png_size(path)
    assert 1.5 * h < w < 3 * h
    # one class only: curves undefined, the figure is still written
    png_size(roc_pr_curves([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="length"):
        roc_pr_curves([0, 1], [0.1], tmp_path / "bad.png")


def test_score_histogram_with_thresholds(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(40, int), np.ones(20, int)]
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(3, 1, 20)]
    plain = score_histogram(labels, scores, tmp_path / "h0.png")
    lines = score_histogram(labels, scores, tmp_path / "h1.png", title="t",
                            thresholds={"unsup": 2.0, "f1": 1.5, "nan": float("nan")})
    assert png_size(plain)[0] > png_size(plain)[1]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(lines)))
    png_size(score_histogram(np.zeros(5), np.arange(5.0), tmp_path / "good_only.png"))
    assert plt.get_fignums() == []


# --------------------------------------------------------------------------- pick_examples


def frame(labels: list[int], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"label": labels, "score": scores}, index=np.arange(len(labels)) + 100)


def test_pick_examples_best_worst_random() -> None:
    #            0    1    2    3    4    5    6    7    8    9
    labels = [0, 1, 1, 0, 1, 0, 0, 1, 0, 0]
    scores = [0.1, 0.9, 0.2, 0.7, 0.95, 0.3, 0.2, 0.5, 0.0, 0.4]
    picks = pick_examples(frame(labels, scores), n_random=3, seed=0)
    assert picks["best"] == [4]  # defective, highest score
    assert picks["worst"] == [2, 3]  # defective lowest, then the worst false alarm
    rand = picks["random"]
    assert len(rand) == 3 and len(set(rand)) == 3
    assert not set(rand) & {2, 3, 4} and set(rand) <= set(range(10))
    assert pick_examples(frame(labels, scores), n_random=3, seed=0) == picks
    seeds = {tuple(pick_examples(frame(labels, scores), 3, seed=s)["random"]) for s in range(6)}
    assert len(seeds) > 1  # the seed matters
    # more random images asked for than left: all the rest, once each
    assert pick_examples(frame(labels, scores), n_random=50)["random"] == [0, 1, 5, 6, 7, 8, 9]


def test_pick_examples_fallbacks() -> None:
    good_only = pick_examples(frame([0, 0, 0, 0], [0.5, 0.1, 0.9, 0.3]), n_random=1)
    assert good_only["best"] == [1] and good_only["worst"] == [2]
    assert len(good_only["random"]) == 1 and good_only["random"][0] in (0, 3)
    bad_only = pick_examples(frame([1, 1, 1], [0.5, 0.1, 0.9]), n_random=0)
    assert bad_only == {"best": [2], "worst": [1], "random": []}
    one = pick_examples(frame([1], [0.3]))
    assert one == {"best": [0], "worst": [], "random": []}
    with_nan = pick_examples(frame([1, 1, 0], [float("nan"), 0.2, 0.1]), n_random=0)
    assert with_nan["best"] == [1] and with_nan["worst"] == [2]
    assert pick_examples(frame([], []), n_random=3) == {"best": [], "worst": [], "random": []}


# --------------------------------------------------------------------------- per category


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), size=96, n_train=2, n_test_good=3,
                             n_test_defect=1)


def synthetic_run(root: Path, category: str, stored_root: Path | None = None,
                  pixel_level: bool = True, crop: int | None = None) -> ScoreRun:
    """A run over the demo test set whose maps are the masks pooled onto an 8x8 grid."""
    rows, maps = [], []
    rng = np.random.default_rng(0)
    for s in discover(root, category, "test"):
        mask = load_mask(s.mask_path) if s.mask_path else np.zeros((96, 96), bool)
        amap = mask.reshape(GRID, 96 // GRID, GRID, 96 // GRID).mean(axis=(1, 3))
        amap = amap + 0.01 * rng.random((GRID, GRID))
        path, mask_path = str(s.path), str(s.mask_path) if s.mask_path else ""
        if stored_root is not None:  # as if the dataset was scored somewhere else
            path = path.replace(str(root), str(stored_root))
            mask_path = mask_path.replace(str(root), str(stored_root))
        rows.append([path, s.defect_type, s.label, float(amap.max()), mask_path, 96, 96])
        maps.append(amap.astype(np.float32))
    info = {"method": "toy", "backbone": "none", "map_sigma": 4.0, "input_size": crop or 64,
            "image_size": 64, "crop": crop, "pixel_level": pixel_level}
    return ScoreRun(scores=pd.DataFrame(rows, columns=SCORE_COLUMNS),
                    maps=np.stack(maps) if pixel_level else None,
                    train_scores=np.array([0.01, 0.02, 0.015]), info=info)


def expected_names(run: ScoreRun, category: str, picks: dict[str, list[int]]) -> set[str]:
    names = {f"{category}_roc_pr.png", f"{category}_hist.png"}
    for kind, indices in picks.items():
        for i in indices:
            names.add(f"{category}_{kind}_{i}_{Path(run.scores['path'][i]).stem}.png")
    return names


def test_write_category_figures_names(demo_root: Path, tmp_path: Path) -> None:
    run = synthetic_run(demo_root, "demo_object")
    out = tmp_path / "figs"
    written = write_category_figures(run, "demo_object", out, max_side=64, n_random=2, seed=0)
    picks = pick_examples(run.scores, n_random=2, seed=0)
    assert sum(len(v) for v in picks.values()) == 5
    assert {p.name for p in written} == expected_names(run, "demo_object", picks)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert any(p.name.startswith("demo_object_best_") and p.name.endswith(".png")
               for p in written)
    for p in written:
        w, h = png_size(p)
        assert w > h
    assert plt.get_fignums() == []


def test_write_category_figures_image_level_and_moved_images(
    demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = synthetic_run(demo_root, "demo_texture", pixel_level=False)
    written = write_category_figures(run, "demo_texture", tmp_path / "img")
    assert sorted(p.name for p in written) == ["demo_texture_hist.png", "demo_texture_roc_pr.png"]

    # scored under another root: re-rooted with data_root, skipped (with a warning) without it
    moved = synthetic_run(demo_root, "demo_texture", stored_root=Path("/nowhere/data"))
    picks = pick_examples(moved.scores, n_random=1)
    rerooted = write_category_figures(moved, "demo_texture", tmp_path / "re", n_random=1,
                                      data_root=demo_root)
    assert {p.name for p in rerooted} == expected_names(moved, "demo_texture", picks)
    with caplog.at_level(logging.WARNING, logger="patchbank.evaluation.figures"):
        lost = write_category_figures(moved, "demo_texture", tmp_path / "lost", n_random=1)
    assert sorted(p.name for p in lost) == ["demo_texture_hist.png", "demo_texture_roc_pr.png"]
    skipped = [r for r in caplog.records if "triplet skipped" in r.getMessage()]
    assert len(skipped) == len(expected_names(moved, "demo_texture", picks)) - 2
    assert "/nowhere/data/demo_texture" in skipped[0].getMessage()


def test_load_example_sizes_and_peak_on_defect(demo_root: Path) -> None:
    run = synthetic_run(demo_root, "demo_object")
    best = pick_examples(run.scores)["best"][0]
    image, heat, mask = load_example(run, best, "demo_object", max_side=48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert heat.shape == mask.shape == (48, 48) and mask.any()
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert mask[peak]  # the synthetic map peaks on the defect
    lo, hi = map_range(run)
    assert lo <= heat.min() and heat.max() <= hi  # one colour scale covers every shown map
    good = int(np.flatnonzero(run.scores["label"].to_numpy() == 0)[0])
    image, heat, mask = load_example(run, good, "demo_object", max_side=512)
    assert image.shape == (96, 96, 3) and heat.shape == (96, 96) and mask is None
    # centre crop 48 of a 64 px input covers the middle 72 px of the 96 px image
    cropped = synthetic_run(demo_root, "demo_object", crop=48)
    image, heat, mask = load_example(cropped, best, "demo_object")
    assert image.shape == (72, 72, 3) and heat.shape == mask.shape == (72, 72)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resizing, align_corners=False (no torch)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(w, (np.arange(n_out), hi), x - lo)
    return w


@pytest.mark.parametrize(("crop", "max_side", "box", "shape", "sigma"), [
    (None, 48, slice(0, 96), 48, 4.0 * 48 / 64),  # whole image, shown at 48 px
    (None, 512, slice(0, 96), 96, 4.0 * 96 / 64),  # never enlarged
    (48, 512, slice(12, 84), 72, 4.0 * 72 / 48),  # crop 48 of 64 px = the middle 72 of 96 px
])
def test_load_example_matches_a_hand_computed_geometry(demo_root: Path, crop, max_side, box,
                                                       shape, sigma) -> None:
    run = synthetic_run(demo_root, "demo_object", crop=crop)
    best = pick_examples(run.scores)["best"][0]
    image, heat, mask = load_example(run, best, "demo_object", max_side=max_side)
    # the map: bilinear to the shown size, then sigma (4 px at model input) scaled to it
    w = bilinear_matrix(GRID, shape)
    expected = gaussian_filter(w @ run.maps[best].astype(np.float64) @ w.T, sigma,
                               mode="nearest")
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    original = np.asarray(load_image(run.scores["path"][best]))[box, box]
    full_mask = load_mask(run.scores["mask_path"][best])[box, box]
    if shape == box.stop - box.start:
        np.testing.assert_array_equal(image, original)
        np.testing.assert_array_equal(mask, full_mask)
    else:  # 2x down: bilinear samples the middle of each 2x2 block, i.e. its mean
        assert image.shape == (shape, shape, 3) and image.dtype == np.uint8
        blocks = full_mask.reshape(shape, 2, shape, 2).mean(axis=(1, 3))
        np.testing.assert_array_equal(mask, blocks >= 0.5)
    assert mask[np.unravel_index(np.argmax(heat), heat.shape)]


@pytest.mark.parametrize("crop", [None, 48])
def test_figures_and_metrics_share_one_geometry(demo_root: Path, crop) -> None:
    run = synthetic_run(demo_root, "demo_object", crop=crop)
    masks, maps = masks_and_maps(run, "demo_object", eval_size=40)
    for i in range(len(run.scores)):
        _, heat, mask = load_example(run, i, "demo_object", max_side=40)
        np.testing.assert_array_equal(heat, maps[i])
        np.testing.assert_array_equal(mask if mask is not None else np.zeros_like(masks[i]),
                                      masks[i])


def test_run_without_map_sigma_is_malformed_for_figures_too(demo_root: Path,
                                                            tmp_path: Path) -> None:
    run = synthetic_run(demo_root, "demo_object")
    del run.info["map_sigma"]
    with pytest.raises(ScoresError, match="map_sigma missing"):
        load_example(run, 0, "demo_object")
    with pytest.raises(ScoresError, match="map_sigma missing"):
        write_category_figures(run, "demo_object", tmp_path / "figs")
    assert not list((tmp_path / "figs").glob(".*"))  # no temporaries left behind
