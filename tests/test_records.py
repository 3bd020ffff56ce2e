"""Typed run records (RunInfo, BankFingerprint) read back from the files the stages write, the
model header's version, and one fit-with-hold-out shared by the score stage, predict's refit
and the app's quick model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TOY_TAG, write_toy_banks
from PIL import Image
from test_predict import make_runs

from patchbank.app import logic
from patchbank.core.errors import BankError, ScoresError
from patchbank.data.demo import make_demo_dataset
from patchbank.evaluation.holdout import fit_with_holdout, holdout_rows
from patchbank.evaluation.metrics import unsupervised_threshold
from patchbank.features.spec import ExtractSpec
from patchbank.inference import load_run_model
from patchbank.scorers import load_scorer, make_scorer, model_header
from patchbank.scorers.base import MODEL_VERSION
from patchbank.stages.score import score_category
from patchbank.store.banks import BankPaths, load_bank
from patchbank.store.records import BankFingerprint, RunInfo
from patchbank.store.runs import RunPaths, load_run

BACKBONE = "efficientnet_lite0"
CATEGORY = "demo_texture"
METHODS = {"padim": {}, "patchcore": {"coreset": "0.25"}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """One demo category extracted (random lite0, 64 px), scored and evaluated by each of
    METHODS (test_predict's real-stage pipeline)."""
    base = tmp_path_factory.mktemp("records")
    root = make_demo_dataset(base / "demo", size=64, n_train=10, n_test_good=2,
                             n_test_defect=2)
    spec = ExtractSpec(BACKBONE, weights="random", image_size=64)
    runs = make_runs(base, root, [CATEGORY], METHODS, spec)
    return {"banks": base / "featurebanks", "tag": spec.tag(),
            "runs": {m: RunPaths(runs[m, CATEGORY]) for m in METHODS}}


# --------------------------------------------------------------------------- round trips


def test_run_json_of_the_score_stage_round_trips(demo) -> None:
    paths = demo["runs"]["padim"]
    text = paths.run_json.read_text()
    raw = json.loads(text)
    info = RunInfo.from_json(raw, paths.run_json)
    assert info.to_json() == raw and list(info.to_json()) == list(raw)  # keys, order, values
    assert json.dumps(info.to_json(), indent=2) == text  # the very bytes written
    assert info.method == "padim" and info.seed == 0 and info.fit_seed == 0
    assert info.shots is None and info.holdout == 0.2 and info.holdout_applied is True
    assert info.pixel_level is True and info.map_sigma == 4.0 and info.input_size == 64
    assert info.n_train == 10 and info.n_test == len(pd.read_csv(paths.image_scores)) == 8
    assert info.extra == {}
    assert info.geometry == {"image_size": 64, "crop": None, "input_size": 64,
                             "map_sigma": 4.0}
    assert info.train_fingerprint == raw["banks"]["train"]
    # a record built field by field writes the same object
    rebuilt = RunInfo(**{k: v for k, v in raw.items()})
    assert rebuilt.to_json() == raw


def test_bank_json_of_the_extract_stage_round_trips(demo) -> None:
    for split, n in (("train", 10), ("test", 8)):
        paths = BankPaths.of(demo["banks"], BACKBONE, demo["tag"], CATEGORY, split)
        text = paths.json.read_text()
        raw = json.loads(text)
        fp = BankFingerprint.from_json(raw, paths.json)
        assert fp.to_json() == raw
        assert json.dumps(fp.to_json(), indent=2, sort_keys=True) == text
        assert fp.split == split and fp.n_images == n and fp.crop is None
        assert fp.image_size == 64 and fp.backbone == BACKBONE and fp.tag == demo["tag"]
        assert fp.weights.startswith("random:") and fp.dtype == "float16"
        assert [t["layer"] for t in fp.taps] == fp.layers
        bank = load_bank(demo["banks"], BACKBONE, demo["tag"], CATEGORY, split)
        assert bank.record.to_json() == raw


def test_toy_run_round_trips_and_reads_typed(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    name, _ = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "knn", "widget",
                             {"k": "1"}, holdout=0.0, seed=3, shots=8)
    run = load_run(RunPaths.of(tmp_path / "scores", "toy", name, "widget"))
    info = run.record
    assert info.to_json() == run.info
    assert (info.seed, info.shots, info.holdout, info.n_train, info.n_train_bank) == \
        (3, 8, 0.0, 8, 30)
    assert len(info.train_indices) == 8 and info.holdout_applied is False
    assert info.bank == TOY_TAG and info.layers == [0] and info.grid == [6, 6]
    assert info.holdout_fit_score_s is None and info.model["file"] == "model.npz"
    fp = BankFingerprint.from_json(info.banks["test"], "run.json")
    assert fp.model_id == "toy" and fp.patchbank_version is None  # toy banks lack it


# --------------------------------------------------------------------------- old files


def test_old_run_json_without_optional_keys_still_loads(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    name, _ = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "knn", "widget",
                             {"k": "1"})
    paths = RunPaths.of(tmp_path / "scores", "toy", name, "widget")
    raw = json.loads(paths.run_json.read_text())
    for key in ("seed", "shots", "holdout", "patchbank_version", "n_train_bank",
                "train_indices", "holdout_applied", "grid", "holdout_fit_score_s", "model"):
        del raw[key]
    raw["written_by_a_later_patchbank"] = [1, 2]
    paths.run_json.write_text(json.dumps(raw, indent=2))
    info = load_run(paths).record
    assert info.seed is None and info.fit_seed == 0 and info.shots is None
    assert info.holdout == 0.0 and info.holdout_applied is None and info.model is None
    assert info.extra == {"written_by_a_later_patchbank": [1, 2]}
    assert info.to_json() == raw  # absent keys stay absent, unknown ones are kept
    assert RunInfo.from_json({"method": "knn"}, "x").to_json() == {"method": "knn"}


def test_old_bank_fingerprint_without_optional_keys_still_loads(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")  # toy fingerprints: no patchbank_version, no spec
    for key in ("model_id", "weights", "dtype", "files_hash"):
        paths = BankPaths.of(tmp_path / "banks", "toy", TOY_TAG, "widget", "train")
        raw = json.loads(paths.json.read_text())
        del raw[key]
        paths.json.write_text(json.dumps(raw))
        bank = load_bank(tmp_path / "banks", "toy", TOY_TAG, "widget", "train")
        assert getattr(bank.record, key) is None and bank.record.to_json() == raw


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("method"), "key 'method' missing or not a string"),
    (lambda d: d.update(seed="zero"), "key 'seed' missing or not an integer or null"),
    (lambda d: d.update(pixel_level=1), "key 'pixel_level' missing or not true/false"),
    (lambda d: d.update(banks={"train": 3}), "banks must map each split"),
])
def test_bad_run_json_is_one_line_naming_the_file(tmp_path: Path, edit, message) -> None:
    write_toy_banks(tmp_path / "banks")
    name, _ = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "knn", "widget",
                             {"k": "1"})
    paths = RunPaths.of(tmp_path / "scores", "toy", name, "widget")
    raw = json.loads(paths.run_json.read_text())
    edit(raw)
    paths.run_json.write_text(json.dumps(raw))
    with pytest.raises(ScoresError) as err:
        load_run(paths)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(paths.run_json))
    assert message in text and "re-score with --overwrite" in text
    with pytest.raises(ScoresError, match=message):
        RunInfo.from_json(raw, paths.run_json)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("tag"), "key 'tag' missing or not a string"),
    (lambda d: d.update(n_images="30"), "key 'n_images' missing or not an integer"),
    (lambda d: d.update(weights=7), "key 'weights' missing or not a string or null"),
])
def test_bad_bank_json_is_one_line_naming_the_file(tmp_path: Path, edit, message) -> None:
    write_toy_banks(tmp_path / "banks")
    paths = BankPaths.of(tmp_path / "banks", "toy", TOY_TAG, "widget", "train")
    raw = json.loads(paths.json.read_text())
    edit(raw)
    paths.json.write_text(json.dumps(raw))
    with pytest.raises(BankError) as err:
        load_bank(tmp_path / "banks", "toy", TOY_TAG, "widget", "train")
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(paths.json)) and message in text
    with pytest.raises(BankError, match=f"^{paths.json}: .*{message}.*re-extract"):
        BankFingerprint.from_json(raw, paths.json)


# --------------------------------------------------------------------------- model header


def test_model_header_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    taps = {0: rng.normal(size=(8, 4, 4, 6)).astype(np.float32)}
    scorer = make_scorer("padim", device="cpu").fit(taps)
    path = tmp_path / "model.npz"
    scorer.save(path)
    header, arrays = model_header(path)
    assert header["version"] == MODEL_VERSION == 3
    assert header["params"]["image_score"] == "max_map" and "input_size" in header
    expected = scorer.score(taps)[0]

    def rewrite(**changes) -> None:
        meta = {k: v for k, v in header.items() if k != "version"} | changes
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **arrays)

    rewrite()  # a model saved before the header had a version
    assert model_header(path)[0]["version"] == 1
    np.testing.assert_allclose(load_scorer(path, device="cpu").score(taps)[0], expected,
                               rtol=1e-6)
    rewrite(version=MODEL_VERSION + 1)
    with pytest.raises(ScoresError, match=r"model.npz: model header version 4, this "
                                          r"patchbank reads 1\.\.3"):
        load_scorer(path)


# --------------------------------------------------------------------------- one hold-out fit


@pytest.mark.parametrize("method", list(METHODS))
def test_score_stage_predict_and_app_hold_out_identically(demo, method, monkeypatch) -> None:
    """The held-out scores and map maxima of the score stage (train_scores.csv), predict's
    refit from the train bank and the app's quick model fitted on the same images agree."""
    paths = demo["runs"][method]
    stage = pd.read_csv(paths.train_scores)
    assert len(stage) == 2 and "map_max" in stage

    model = load_run_model(paths.folder, device="cpu", banks_dir=demo["banks"])
    refit = model.refit_holdout()
    np.testing.assert_allclose(refit.held_scores, stage["score"], rtol=1e-12)
    np.testing.assert_allclose(refit.held_map_max, stage["map_max"], rtol=1e-12)

    bank = load_bank(demo["banks"], BACKBONE, demo["tag"], CATEGORY, "train")
    held_paths = bank.meta["path"].to_numpy()[refit.held_out]
    assert held_paths.tolist() == stage["path"].tolist()
    images = [Image.open(p).convert("RGB") for p in bank.meta["path"]]
    # the app's features are the bank's (the test compares fitting, not extraction)
    monkeypatch.setattr(logic, "quick_features",
                        lambda _model, _images: {k: np.asarray(v) for k, v in bank.taps.items()})
    quick = logic.quick_model(images, backbone=BACKBONE, method=method, weights="random",
                              image_size=64, params=METHODS[method], device="cpu")
    np.testing.assert_array_equal(quick.train_scores, refit.held_scores)
    pixel = quick.pixel_threshold("auto")
    assert pixel.value == unsupervised_threshold(refit.held_map_max)
    assert quick.image_threshold("auto").value == unsupervised_threshold(refit.held_scores)

    # and fit_with_holdout called directly, with the stage's split, gives the same numbers
    scorer = make_scorer(method, METHODS[method], device="cpu")
    direct = fit_with_holdout(scorer, bank.taps, holdout_rows(bank.meta, 0.2, 0),
                              geometry=model.info.geometry, heights=bank.meta["height"],
                              widths=bank.meta["width"])
    np.testing.assert_array_equal(direct.held_scores, refit.held_scores)
    np.testing.assert_array_equal(direct.held_map_max, refit.held_map_max)
    assert direct.pixel_threshold() == pixel.value
    assert direct.image_threshold() == quick.image_threshold("auto").value
