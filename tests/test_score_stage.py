"""Score stage: banks only in, image scores + maps + run.json out, one run folder per
configuration (method, parameters, bank), cached."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TOY_TAG, toy_fingerprint, write_toy_banks

from patchbank.core.errors import BankError, PatchbankError
from patchbank.scorers import make_scorer
from patchbank.stages.score import holdout_split, resolve_tag, run_name, score_category
from patchbank.store.banks import META_COLUMNS, BankPaths, BankWriter
from patchbank.store.runs import RunPaths, load_run

OTHER_TAG = "s32-l2.3-toy-11111111"


def copy_banks_to_tag(banks: Path, tag: str) -> None:
    """The toy banks once more under another configuration's tag (fingerprints say so too)."""
    dst = banks / "toy" / tag
    shutil.copytree(banks / "toy" / TOY_TAG, dst)
    for split in ("train", "test"):
        fp = dst / "widget" / f"{split}.json"
        fp.write_text(json.dumps({**json.loads(fp.read_text()), "tag": tag}))


def test_patchcore_run_written_and_read_back(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    name, status = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "patchcore",
                                  "widget", {"coreset": "0.5"})
    assert status == "computed"
    params = make_scorer("patchcore", {"coreset": "0.5"}).params
    assert name == run_name("patchcore", params, TOY_TAG, 0.2, 0)
    assert name.startswith("patchcore-s32-l2.3-toy-") and name != "patchcore-" + TOY_TAG
    run = load_run(RunPaths.of(tmp_path / "scores", "toy", name, "widget"))
    assert run.scores["label"].tolist() == [0] * 6 + [1] * 6
    good, bad = run.scores["score"][:6], run.scores["score"][6:]
    assert bad.min() > good.max()  # the injected blocks are found
    assert run.maps.shape == (12, 6, 6) and run.maps.dtype == np.float32
    assert run.info["params"]["coreset"] == 0.5 and run.info["input_size"] == 32
    assert run.info["bank"] == TOY_TAG and run.info["run"] == name
    assert run.info["layers"] == [0] and run.info["grid"] == [6, 6]
    assert run.info["banks"]["train"]["split"] == "train" and run.info["fit_s"] >= 0
    assert len(run.train_scores) == 6  # 20 % of 30 held out
    held = pd.read_csv(RunPaths.of(tmp_path / "scores", "toy", name, "widget").train_scores)
    assert list(held.columns) == ["path", "score", "map_max"]
    # each held-out map's maximum once smoothed and placed at image size: at most its grid max
    assert (held["map_max"] > 0).all() and (held["map_max"] <= held["score"] * (1 + 1e-5)).all()


def test_run_name_hashes_the_whole_configuration() -> None:
    base = run_name("knn", {"k": 1}, TOY_TAG, 0.2, 0)
    assert base.startswith("knn-s32-l2.3-toy-") and len(base.rsplit("-", 1)[1]) == 8
    assert run_name("knn", {"k": 1}, TOY_TAG, 0.2, 0) == base
    others = {run_name("knn", {"k": 2}, TOY_TAG, 0.2, 0), run_name("knn", {"k": 1}, OTHER_TAG,
                                                                   0.2, 0),
              run_name("knn", {"k": 1}, TOY_TAG, 0.0, 0), run_name("knn", {"k": 1}, TOY_TAG,
                                                                   0.2, 1)}
    assert len(others) == 4 and base not in others


def test_changed_params_get_a_new_run_and_leave_the_old_one(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    args = (banks, scores, "toy", "knn", "widget")
    k1, status = score_category(*args, {"k": "1"})
    assert status == "computed"
    assert score_category(*args, {"k": "1"}) == (k1, "skipped")
    old = RunPaths.of(scores, "toy", k1, "widget")
    before = {p.name: p.read_bytes() for p in old.folder.iterdir()}
    k2, status = score_category(*args, {"k": "2"})
    assert status == "computed" and k2 != k1
    assert {p.name: p.read_bytes() for p in old.folder.iterdir()} == before  # intact
    assert load_run(old).info["params"]["k"] == 1
    assert load_run(RunPaths.of(scores, "toy", k2, "widget")).info["params"]["k"] == 2
    assert score_category(*args, {"k": "2"}, overwrite=True) == (k2, "overwritten")
    write_toy_banks(banks, seed=1, n_train=20)  # banks changed (same tag) -> recompute
    assert score_category(*args, {"k": "2"}) == (k2, "recomputed")
    assert sorted(p.name for p in (scores / "toy").iterdir()) == sorted([k1, k2])


def test_explicit_name_is_recomputed_in_place(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    args = (banks, scores, "toy", "knn", "widget")
    assert score_category(*args, {"k": "1"}, name="mine") == ("mine", "computed")
    assert score_category(*args, {"k": "1"}, name="mine") == ("mine", "skipped")
    assert score_category(*args, {"k": "2"}, name="mine") == ("mine", "recomputed")
    assert load_run(RunPaths.of(scores, "toy", "mine", "widget")).info["params"]["k"] == 2


def test_several_bank_configurations_need_a_choice(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    copy_banks_to_tag(banks, OTHER_TAG)
    args = (banks, scores, "toy", "knn", "widget")
    with pytest.raises(BankError, match="2 bank configurations for widget") as err:
        score_category(*args)
    assert TOY_TAG in str(err.value) and OTHER_TAG in str(err.value)
    assert "--bank" in str(err.value) and "\n" not in str(err.value)
    assert not scores.exists()  # nothing written
    a, _ = score_category(*args, bank=TOY_TAG)
    b, _ = score_category(*args, bank="s32-l2.3-toy-1")  # a unique prefix
    assert a != b
    assert load_run(RunPaths.of(scores, "toy", a, "widget")).info["bank"] == TOY_TAG
    assert load_run(RunPaths.of(scores, "toy", b, "widget")).info["bank"] == OTHER_TAG
    with pytest.raises(BankError, match="--bank s32: ambiguous"):
        score_category(*args, bank="s32")
    with pytest.raises(BankError, match="--bank nosuch: no such bank.*known: "):
        score_category(*args, bank="nosuch")
    assert resolve_tag(banks, "toy", "widget", OTHER_TAG) == OTHER_TAG


def test_taps_at_several_resolutions_are_chosen_per_method(tmp_path: Path) -> None:
    """A bank with three taps: PatchCore uses the two coarse ones, PaDiM all three; maps come
    back on the finest chosen grid."""
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    shapes = ((8, 8, 4), (4, 4, 8), (2, 2, 8))
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        rows = [[f"/nowhere/widget/{split}/{i:03d}.png", "widget", split, "good", 0, "", 32, 32]
                for i in range(n)]
        paths = BankPaths.of(banks, "toy", TOY_TAG, "widget", split)
        with BankWriter(paths, n, [0, 1, 2], shapes) as w:
            w.write(np.arange(n), [rng.normal(size=(n, *s)) for s in shapes])
            w.commit(pd.DataFrame(rows, columns=META_COLUMNS),
                     toy_fingerprint(split, n, shapes=shapes))
    for method, layers, grid in (("patchcore", [1, 2], [4, 4]), ("padim", [0, 1, 2], [8, 8]),
                                 ("knn", [1, 2], [4, 4])):
        name, _ = score_category(banks, scores, "toy", method, "widget", {}, holdout=0.0)
        run = load_run(RunPaths.of(scores, "toy", name, "widget"))
        assert run.info["layers"] == layers and run.info["grid"] == grid, method
        assert run.maps.shape == (4, *grid) and run.train_scores is None
    name, _ = score_category(banks, scores, "toy", "knn", "widget", {"layers": "0"},
                             holdout=0.0)
    assert load_run(RunPaths.of(scores, "toy", name, "widget")).info["grid"] == [8, 8]
    with pytest.raises(BankError, match=r"layers \[5\] asked for, the bank holds \[0, 1, 2\]"):
        score_category(banks, scores, "toy", "knn", "widget", {"layers": "5"})


def test_image_level_method_writes_no_maps(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    name, _ = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "mahalanobis",
                             "widget")
    paths = RunPaths.of(tmp_path / "scores", "toy", name, "widget")
    run = load_run(paths)
    assert run.maps is None and not paths.maps.exists() and run.info["pixel_level"] is False
    assert run.info["grid"] is None


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="no widget banks.*extract.py") as err:
        score_category(tmp_path, tmp_path / "s", "toy", "knn", "widget")
    assert "\n" not in str(err.value)
    write_toy_banks(tmp_path / "banks")
    with pytest.raises(PatchbankError, match="--method nosuch"):
        score_category(tmp_path / "banks", tmp_path / "s", "toy", "nosuch", "widget")
    with pytest.raises(PatchbankError, match="coreset"):
        score_category(tmp_path / "banks", tmp_path / "s", "toy", "knn", "widget",
                       {"coreset": "0.1"})
    # a damaged bank is refused with the fix
    (tmp_path / "banks" / "toy" / TOY_TAG / "widget" / "test.layer0.npy").write_bytes(b"")
    with pytest.raises(BankError, match="unreadable bank.*--overwrite"):
        score_category(tmp_path / "banks", tmp_path / "s", "toy", "knn", "widget")


def cli_errors(stderr: str) -> list[str]:
    """The CLI's ``error: ...`` lines (log lines may come before them)."""
    return [line for line in stderr.strip().splitlines() if line.startswith("error: ")]


def test_cli_reports_missing_banks_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/score.py", "--backbone", "toy", "--method", "knn",
         "--category", "widget", "--banks-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = cli_errors(proc.stderr)
    assert len(errors) == 1 and "no widget banks" in errors[0] and "extract.py" in errors[0]


def test_cli_needs_bank_when_several_configurations_exist(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    copy_banks_to_tag(tmp_path / "banks", OTHER_TAG)
    base = [sys.executable, "scripts/score.py", "--backbone", "toy", "--method", "mahalanobis",
            "--category", "widget", "--banks-dir", str(tmp_path / "banks"), "--scores-dir",
            str(tmp_path / "s")]
    cwd = Path(__file__).resolve().parents[1]
    proc = subprocess.run(base, capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = cli_errors(proc.stderr)
    assert len(errors) == 1 and "--bank" in errors[0]
    assert TOY_TAG in errors[0] and OTHER_TAG in errors[0]
    proc = subprocess.run([*base, "--bank", OTHER_TAG], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-1500:]
    name = run_name("mahalanobis", make_scorer("mahalanobis").params, OTHER_TAG, 0.2, 0)
    assert f"toy/{name}/widget: computed" in proc.stdout


def test_scoring_needs_no_images_and_no_backbone_packages(tmp_path: Path) -> None:
    """Image paths in the banks do not exist, and timm/transformers/PIL cannot be imported."""
    write_toy_banks(tmp_path / "banks")
    script = textwrap.dedent(f"""
        import sys
        for mod in ("timm", "transformers", "torchvision", "PIL"):
            sys.modules[mod] = None  # any import of these now fails
        from pathlib import Path
        from patchbank.stages.score import score_category
        for m in ("knn", "padim", "patchcore", "spade", "mahalanobis", "iforest"):
            name, status = score_category(Path({str(tmp_path / 'banks')!r}),
                                          Path({str(tmp_path / 's')!r}), "toy", m, "widget")
            print(name, status)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "ok" and all(line.endswith(" computed") for line in lines[:-1])
    names = dict(line.split()[0].split("-", 1) for line in lines[:-1])
    scores = pd.read_csv(tmp_path / "s" / "toy" / f"padim-{names['padim']}" / "widget" /
                         "image_scores.csv")
    assert len(scores) == 12
    info = json.loads((tmp_path / "s" / "toy" / f"spade-{names['spade']}" / "widget" /
                       "run.json").read_text())
    assert info["method"] == "spade"


def test_holdout_split_is_seeded_and_disjoint() -> None:
    fit, out = holdout_split(50, 0.2, seed=0)
    assert len(out) == 10 and len(fit) == 40 and not set(fit) & set(out)
    assert np.array_equal(out, holdout_split(50, 0.2, seed=0)[1])
    assert not np.array_equal(out, holdout_split(50, 0.2, seed=1)[1])
    assert len(holdout_split(50, 0.0, seed=0)[1]) == 0
