"""Few-shot protocol: fit on a seeded subset of the train bank's rows, full test set; shots and
seed in the run name, run.json and the metrics; shots=None keeps the old run names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TOY_TAG, write_toy_banks

from patchbank.cli.stages import score_main
from patchbank.core.errors import PatchbankError
from patchbank.scorers import make_scorer
from patchbank.stages.evaluate import evaluate
from patchbank.stages.score import (
    fit_bank,
    holdout_rows,
    holdout_split,
    run_name,
    score_category,
    shot_indices,
    shot_rows,
)
from patchbank.store.banks import Bank, load_bank
from patchbank.store.runs import RunPaths, load_run


def test_existing_run_names_do_not_change() -> None:
    # pinned from run_name before few-shot existed (commit 94f8295)
    assert run_name("knn", {"k": 1, "level": "patch"}, TOY_TAG, 0.2, 0) == \
        "knn-s32-l2.3-toy-767b65f2"
    assert run_name("padim", {"d": 100, "eps": 0.01, "seed": 0},
                    "s224-l1.2.3-half-hub-1a2b3c4d", 0.0, 3) == \
        "padim-s224-l1.2.3-half-hub-ebf7d44e"
    assert run_name("knn", {"k": 1}, TOY_TAG, 0.2, 0, None) == \
        run_name("knn", {"k": 1}, TOY_TAG, 0.2, 0)
    names = {run_name("knn", {"k": 1}, TOY_TAG, 0.2, seed, shots)
             for shots in (None, 1, 4) for seed in (0, 1)}
    assert len(names) == 6


def test_shot_indices_seeded_sorted_distinct() -> None:
    assert shot_indices(10, None, 3).tolist() == list(range(10))
    a = shot_indices(30, 5, 1)
    assert a.tolist() == shot_indices(30, 5, 1).tolist() and len(set(a.tolist())) == 5
    assert (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 30
    assert a.tolist() != shot_indices(30, 5, 2).tolist()


def test_shots_of_an_augmented_bank_are_images_with_their_copies() -> None:
    # 6 images, 2 augmented copies each, interleaved as the extract stage writes them
    meta = pd.DataFrame({"augment": np.tile([0, 1, 2], 6),
                         "augment_of": np.repeat(np.arange(6) * 3, 3)})
    chosen, rows = shot_rows(meta, 2, 5)
    assert (meta["augment"].to_numpy()[chosen] == 0).all() and len(chosen) == 2
    assert chosen.tolist() == (np.arange(6) * 3)[shot_indices(6, 2, 5)].tolist()
    assert rows.tolist() == sorted(r for c in chosen for r in (c, c + 1, c + 2))
    assert shot_rows(meta, None, 5)[1].tolist() == list(range(18))
    plain = pd.DataFrame({"path": list("abcdef")})
    chosen, rows = shot_rows(plain, 3, 1)
    assert chosen.tolist() == rows.tolist() == shot_indices(6, 3, 1).tolist()


def test_hold_out_and_few_shot_keep_copies_with_their_image() -> None:
    # 10 images, 2 copies each, interleaved; the tap value is the image number
    meta = pd.DataFrame({"augment": np.tile([0, 1, 2], 10),
                         "augment_of": np.repeat(np.arange(10) * 3, 3)})
    fit, out = holdout_rows(meta, 0.2, 4)
    held = (np.arange(10) * 3)[holdout_split(10, 0.2, 4)[1]]
    assert out.tolist() == held.tolist()  # two originals, none of their copies
    assert set(fit).isdisjoint({h + c for h in held for c in range(3)})
    assert len(fit) == 24 and (np.diff(fit) > 0).all()
    plain = pd.DataFrame({"path": list("abcdefghij")})
    assert [a.tolist() for a in holdout_rows(plain, 0.2, 4)] == \
        [a.tolist() for a in holdout_split(10, 0.2, 4)]
    # a few-shot subset re-points augment_of at its own rows, so the hold-out still works
    taps = {1: np.repeat(np.arange(10), 3).astype(np.float32).reshape(30, 1, 1, 1)}
    sub = fit_bank(Bank(taps, meta, {}), 4, 0)
    assert len(sub.meta) == 12 and sub.meta["augment"].tolist() == [0, 1, 2] * 4
    assert sub.meta["augment_of"].tolist() == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]
    fit, out = holdout_rows(sub.meta, 0.5, 0)
    assert len(out) == 2 and len(fit) == 6
    images = sub.taps[1][:, 0, 0, 0]
    assert set(images[fit].tolist()).isdisjoint(images[out].tolist())


def test_few_shot_fits_on_the_seeded_rows_only(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    name, status = score_category(banks, scores, "toy", "knn", "widget", {"k": "1"},
                                  shots=5, seed=1)
    assert status == "computed"
    run = load_run(RunPaths.of(scores, "toy", name, "widget"))
    rows = shot_indices(30, 5, 1)
    assert run.info["shots"] == 5 and run.info["seed"] == 1
    assert run.info["train_indices"] == rows.tolist()
    assert run.info["n_train"] == 5 and run.info["n_train_bank"] == 30
    assert run.info["n_test"] == 12 and len(run.scores) == 12  # the full test set
    # 5 shots with a 20 % hold-out would hold out 1: skipped, and said so
    assert run.info["holdout_applied"] is False and run.train_scores is None
    # the same scores as a scorer fitted by hand on exactly those bank rows
    train = load_bank(banks, "toy", TOY_TAG, "widget", "train")
    test = load_bank(banks, "toy", TOY_TAG, "widget", "test")
    ref = make_scorer("knn", {"k": "1"}).fit({k: np.asarray(v[rows])
                                               for k, v in train.taps.items()})
    np.testing.assert_allclose(run.scores["score"], ref.score(test.taps)[0], rtol=1e-6)
    # another seed is another subset and another run; a repeat is skipped
    other, _ = score_category(banks, scores, "toy", "knn", "widget", {"k": "1"}, shots=5,
                              seed=2)
    assert other != name
    assert load_run(RunPaths.of(scores, "toy", other, "widget")).info["train_indices"] != \
        rows.tolist()
    assert score_category(banks, scores, "toy", "knn", "widget", {"k": "1"}, shots=5,
                          seed=1) == (name, "skipped")


def test_holdout_applies_when_enough_shots_and_all_keeps_name(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    name, _ = score_category(banks, scores, "toy", "knn", "widget", {"k": "1"}, shots=20)
    run = load_run(RunPaths.of(scores, "toy", name, "widget"))
    assert run.info["holdout_applied"] is True and len(run.train_scores) == 4
    held = set(pd.read_csv(RunPaths.of(scores, "toy", name, "widget").train_scores)["path"])
    chosen = set(load_bank(banks, "toy", TOY_TAG, "widget", "train").meta["path"]
                 .iloc[run.info["train_indices"]])
    assert held <= chosen  # held out from the shots, not from the whole bank
    full, _ = score_category(banks, scores, "toy", "knn", "widget", {"k": "1"})
    params = make_scorer("knn", {"k": "1"}).params
    assert full == run_name("knn", params, TOY_TAG, 0.2, 0)
    info = load_run(RunPaths.of(scores, "toy", full, "widget")).info
    assert info["shots"] is None and info["train_indices"] is None and info["n_train"] == 30


def test_too_many_shots_is_one_clear_error(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    with pytest.raises(PatchbankError, match=r"--shots 31: .*train\.csv has 30 training"):
        score_category(tmp_path / "banks", tmp_path / "scores", "toy", "knn", "widget",
                       shots=31)


def test_metrics_carry_shots_and_seed(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    params = {"level": "image"}  # image level: no masks needed
    few, _ = score_category(banks, scores, "toy", "knn", "widget", params, shots=4, seed=2)
    full, _ = score_category(banks, scores, "toy", "knn", "widget", params)
    table = evaluate(scores, "toy", few, ["widget"], figures=False)
    assert table.loc[0, "shots"] == 4 and table.loc[0, "seed"] == 2
    assert table.loc[0, "n_train"] == 4
    record = json.loads((scores / "toy" / few / "widget" / "metrics.json").read_text())
    assert record["metrics"]["shots"] == 4 and record["metrics"]["seed"] == 2
    csv = pd.read_csv(scores / "toy" / few / "metrics.csv")
    assert csv["shots"].tolist() == [4, 4] and csv["seed"].tolist() == [2, 2]
    evaluate(scores, "toy", full, ["widget"], figures=False)
    record = json.loads((scores / "toy" / full / "widget" / "metrics.json").read_text())
    assert record["metrics"]["shots"] is None and record["metrics"]["n_train"] == 30


def test_score_cli_shots_and_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    score_main(["--backbone", "toy", "--method", "knn", "--category", "widget", "--shots", "3",
                "--seed", "4", "--banks-dir", str(banks), "--scores-dir", str(scores)])
    name = capsys.readouterr().out.split("/")[1]
    info = load_run(RunPaths.of(scores, "toy", name, "widget")).info
    assert info["shots"] == 3 and info["seed"] == 4
    with pytest.raises(SystemExit) as err:
        score_main(["--backbone", "toy", "--method", "knn", "--shots", "0",
                    "--banks-dir", str(banks)])
    assert err.value.code == 2
    assert "expected a positive integer or 'all'" in capsys.readouterr().err
