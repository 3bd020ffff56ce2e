"""Faults end in one line and lose nothing: full disks at every write, SIGTERM/SIGKILL at each
stage boundary, corrupt or mislabelled files of every kind, two writers at once, and
multi-category runs that finish what they can.

Everything runs on a tiny demo dataset (64 px, EfficientNet-Lite0 with random weights, PaDiM).
Kills and concurrent writers use subprocesses that pause right before publishing a chosen file
(a patched ``AtomicFile.commit``), so the signal lands while temporaries exist; the processes of
one test run side by side to keep the module short.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.cli import stages as cli
from patchbank.core.errors import BankError, ScoresError
from patchbank.data.demo import make_demo_dataset
from patchbank.features.spec import ExtractSpec
from patchbank.scorers import load_scorer
from patchbank.stages.extract import ExtractConfig, Extractor
from patchbank.store.banks import BankPaths, bank_folder, load_bank, load_pair
from patchbank.store.runs import RunPaths, load_run, verify_run

BACKBONE = "efficientnet_lite0"
SPEC = ExtractSpec(BACKBONE, weights="random", image_size=64)
TAG = SPEC.tag()
CAT = "demo_texture"
EXTRACT = ["--backbone", BACKBONE, "--weights", "random", "--image-size", "64",
           "--batch-size", "4", "--workers", "0"]
NO_SPACE = os.strerror(errno.ENOSPC)


# --------------------------------------------------------------------------- helpers


def run_cli(main: Callable[[Sequence[str]], None], args: Sequence[object]) -> int:
    """Run a command-line entry point in this process; its exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return 0 if exit_.code is None else int(exit_.code)
    return 0


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a command's stderr (progress bars use carriage returns)."""
    return [line.strip() for line in re.split(r"[\r\n]", stderr)
            if line.strip().startswith("error:")]


def one_error(stderr: str) -> str:
    """The single error line: no traceback, no exception class path."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not re.search(r"\b[a-z_]+(\.[a-z_]+)+\.[A-Za-z]*(Error|Exception):", lines[0])
    return lines[0]


def temporaries(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in Path(folder).rglob(".*.tmp"))


def bank_dir(banks: Path, category: str = CAT) -> Path:
    return bank_folder(banks, BACKBONE, TAG, category)


def run_dir(scores: Path, name: str, category: str = CAT) -> Path:
    return RunPaths.of(scores, BACKBONE, name, category).folder


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@dataclass(frozen=True)
class Ref:
    """A clean extract -> score -> evaluate of two demo categories, to copy and damage."""

    data: Path
    banks: Path
    scores: Path
    name: str  # the score-run folder

    def score_args(self, banks: Path, scores: Path, category: str = CAT) -> list[object]:
        return ["--backbone", BACKBONE, "--method", "padim", "--banks-dir", banks,
                "--scores-dir", scores, "--category", category]

    def evaluate_args(self, scores: Path, category: str = CAT) -> list[object]:
        return ["--backbone", BACKBONE, "--method", self.name, "--data-root", self.data,
                "--scores-dir", scores, "--category", category, "--no-figures"]

    def extract_args(self, banks: Path, category: str = CAT,
                     data: Path | None = None) -> list[object]:
        return [*EXTRACT, "--data-root", data or self.data, "--banks-dir", banks,
                "--category", category]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Ref:
    root = tmp_path_factory.mktemp("ref")
    data = make_demo_dataset(root / "data", size=64, n_train=10, n_test_good=2, n_test_defect=1)
    banks, scores = root / "banks", root / "scores"
    two = "demo_object,demo_texture"
    r = Ref(data, banks, scores, "")
    assert run_cli(cli.extract_main, r.extract_args(banks, two)) == 0
    assert run_cli(cli.score_main, r.score_args(banks, scores, two)) == 0
    (name,) = [p.name for p in (scores / BACKBONE).iterdir()]
    r = Ref(data, banks, scores, name)
    assert run_cli(cli.evaluate_main, r.evaluate_args(scores, two)) == 0
    assert temporaries(root) == []
    return r


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor(ExtractConfig(SPEC, batch_size=4, num_workers=0))


def copy_banks(ref: Ref, dest: Path) -> Path:
    shutil.copytree(ref.banks / BACKBONE, dest / BACKBONE)
    return dest


#: what the evaluate stage writes (dropped from a copy that is to be evaluated again)
EVALUATION_OUTPUTS = ("metrics.json", "bootstrap.npz", "by_defect.csv", "metrics_by_defect.csv",
                      "leaderboard*", "defect_heatmap.png")


def copy_scores(ref: Ref, dest: Path, keep_metrics: bool = True) -> Path:
    skip = (".locks",) if keep_metrics else (".locks", *EVALUATION_OUTPUTS)
    shutil.copytree(ref.scores, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


def assert_same_banks(banks: Path, ref: Ref, category: str = CAT) -> None:
    for got, want in zip(load_pair(banks, BACKBONE, TAG, category),
                         load_pair(ref.banks, BACKBONE, TAG, category), strict=True):
        assert got.meta.equals(want.meta)
        for layer in want.taps:
            np.testing.assert_allclose(got.taps[layer], want.taps[layer], atol=2e-3)


def assert_same_scores(folder: Path, ref_folder: Path) -> None:
    got, want = load_run(RunPaths(folder)), load_run(RunPaths(ref_folder))
    assert got.scores.drop(columns="score").equals(want.scores.drop(columns="score"))
    np.testing.assert_allclose(got.scores["score"], want.scores["score"], rtol=1e-5)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- full disk


class _NoSpaceRaw(io.FileIO):
    """A file whose every write fails as on a full disk (the file itself is created)."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, NO_SPACE)


def full_disk_at(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """Writes to the temporary of every published file whose name matches ``pattern`` fail
    with ENOSPC, at the level of the operating system's write (whatever library writes)."""
    real_open = builtins.open

    def fake_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None,
                  closefd=True, opener=None):
        name = os.path.basename(os.fspath(file)) if isinstance(file, str | os.PathLike) else ""
        if any(c in mode for c in "wxa") and fnmatch.fnmatch(str(name), f".{pattern}.*.tmp"):
            buffered = io.BufferedWriter(_NoSpaceRaw(file, "w"))
            return buffered if "b" in mode else io.TextIOWrapper(
                buffered, encoding=encoding or "utf-8", errors=errors, newline=newline)
        return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize("site", ["train.layer1.npy", "train.layer3.npy", "train.csv",
                                  "train.json", "test.layer2.npy"])
def test_full_disk_during_extract_is_one_line_and_leaves_nothing(
        ref: Ref, tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    banks = tmp_path / "banks"
    with monkeypatch.context() as m:
        full_disk_at(m, site)
        code = run_cli(cli.extract_main, ref.extract_args(banks))
    assert code == 2
    assert one_error(capsys.readouterr().err) == (
        f"error: {bank_dir(banks) / site}: {NO_SPACE}; free space on that file system, or "
        f"point --banks-dir {banks} at another one")
    assert temporaries(banks) == []
    split = site.split(".")[0]
    assert not BankPaths.of(banks, BACKBONE, TAG, CAT, split).json.exists()
    if split == "test":  # what finished before the disk filled is kept
        load_bank(banks, BACKBONE, TAG, CAT, "train")


@pytest.mark.parametrize("site", ["train-64px.npy", "train-64px.json"])
def test_full_disk_in_the_image_cache_only_costs_the_cache(
        ref: Ref, tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch, capsys,
        caplog: pytest.LogCaptureFixture) -> None:
    banks = tmp_path / "banks"
    with monkeypatch.context() as m, caplog.at_level("WARNING"):
        full_disk_at(m, site)
        code = run_cli(cli.extract_main, ref.extract_args(banks))
    assert code == 0 and error_lines(capsys.readouterr().err) == []
    assert "cannot write the image cache" in caplog.text
    cache = banks / "_imagecache" / CAT
    assert not (cache / "train-64px.json").exists() and (cache / "test-64px.json").exists()
    assert temporaries(banks) == []
    assert_same_banks(banks, ref)


@pytest.mark.parametrize("site", ["model.npz", "image_scores.csv", "maps.npz",
                                  "train_scores.csv", "run.json"])
def test_full_disk_during_score_is_one_line_and_leaves_nothing(
        ref: Ref, tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    scores = tmp_path / "scores"
    with monkeypatch.context() as m:
        full_disk_at(m, site)
        code = run_cli(cli.score_main, ref.score_args(ref.banks, scores))
    assert code == 2
    folder = run_dir(scores, ref.name)
    assert one_error(capsys.readouterr().err) == (
        f"error: {folder / site}: {NO_SPACE}; free space on that file system, or point "
        f"--scores-dir {scores} at another one")
    assert temporaries(scores) == [] and not (folder / "run.json").exists()
    # space again: the run completes
    assert run_cli(cli.score_main, ref.score_args(ref.banks, scores)) == 0
    assert capsys.readouterr().out.strip().endswith(": computed")
    assert_same_scores(folder, run_dir(ref.scores, ref.name))


@pytest.mark.parametrize("site", ["metrics.json", "metrics.csv", "leaderboard.csv",
                                  "leaderboard.md", f"{CAT}_*.png"])
def test_full_disk_during_evaluate_is_one_line_and_leaves_nothing(
        ref: Ref, tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    scores = copy_scores(ref, tmp_path / "scores", keep_metrics=False)
    args = ref.evaluate_args(scores)
    if site.endswith(".png"):
        args.remove("--no-figures")
    with monkeypatch.context() as m:
        full_disk_at(m, site)
        code = run_cli(cli.evaluate_main, args)
    assert code == 2
    line = one_error(capsys.readouterr().err)
    method_dir = scores / BACKBONE / ref.name
    where = {"metrics.json": method_dir / CAT, "metrics.csv": method_dir,
             "leaderboard.csv": scores, "leaderboard.md": scores}.get(site, method_dir / "figures")
    assert fnmatch.fnmatchcase(line, f"error: {where / site}: {NO_SPACE}; free space on that "
                                     f"file system, or point --scores-dir {scores} at another "
                                     "one"), line
    assert temporaries(scores) == []
    if site == "metrics.json" or site.endswith(".png"):
        assert not (method_dir / CAT / "metrics.json").exists()


@pytest.mark.parametrize("error, expected", [
    (MemoryError(), f"error: {CAT}: out of memory; close other programs, use a machine with "
                    "more memory"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "SCORES/x.csv"),
     f"error: {CAT}: SCORES/x.csv: {os.strerror(errno.EACCES)}; make it writable, or point "
     "--scores-dir SCORES elsewhere"),
])
def test_memory_and_permission_errors_are_one_line(
        ref: Ref, tmp_path: Path, error: BaseException, expected: str,
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    scores = tmp_path / "scores"
    if isinstance(error, OSError):
        error.filename = str(scores / "x.csv")

    def fail(*args: object, **kw: object) -> None:
        raise error

    monkeypatch.setattr("patchbank.stages.score.score_category", fail)
    assert run_cli(cli.score_main, ref.score_args(ref.banks, scores)) == 2
    assert one_error(capsys.readouterr().err) == expected.replace("SCORES", str(scores))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 20 MB tmpfs (skipped, with the reason, where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def leave_free(mnt: Path, nbytes: int) -> None:
    """Grow a filler file until ``nbytes`` are free on the file system of ``mnt``."""
    filler = mnt / "filler"
    size = filler.stat().st_size if filler.exists() else 0
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, size + free - nbytes))


def test_a_really_full_tmpfs_ends_every_stage_in_one_line(
        ref: Ref, server: ForkServer, small_tmpfs: Path, tmp_path: Path, capsys) -> None:
    mnt = small_tmpfs
    eval_scores = copy_scores(ref, mnt / "eval", keep_metrics=False)
    leave_free(mnt, 64 * 1024)  # room for a file header, not for the images or features
    # in another process: writing through a memory map onto a full tmpfs is a SIGBUS, which
    # would take pytest down with it
    job = spawn(server, tmp_path, "extract", "extract_main", ref.extract_args(mnt / "banks"))
    assert job.wait() == 2, job.stderr()[-3000:]
    line = one_error(job.stderr())
    assert line.startswith(f"error: {mnt / 'banks'}/") and line.endswith(
        f": {NO_SPACE}; free space on that file system, or point --banks-dir {mnt / 'banks'} "
        "at another one")

    assert run_cli(cli.score_main, ref.score_args(ref.banks, mnt / "scores")) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {mnt / 'scores'}/") and f"--scores-dir {mnt / 'scores'}" \
        in line and NO_SPACE in line

    leave_free(mnt, 0)
    args = ref.evaluate_args(eval_scores)
    args.remove("--no-figures")
    assert run_cli(cli.evaluate_main, args) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {eval_scores}/") and NO_SPACE in line
    assert temporaries(mnt) == []
    assert not list((mnt / "scores").rglob("run.json"))
    assert not list(eval_scores.rglob("metrics.json"))


# --------------------------------------------------------------------------- corrupt files


def _np_save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def _n(folder: Path, split: str) -> int:
    return json.loads((folder / f"{split}.json").read_text())["n_images"]


def _drop_last_row(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


# name -> (the split it breaks, what it does to the bank folder)
BANK_DAMAGE: dict[str, tuple[str, Callable[[Path], object]]] = {
    "empty tap": ("train", lambda f: _empty(f / "train.layer1.npy")),
    "truncated tap": ("train", lambda f: truncate(f / "train.layer2.npy")),
    "tap of another shape": ("train", lambda f: _np_save(
        f / "train.layer3.npy", np.zeros((_n(f, "train"), 3, 3, 112), np.float16))),
    "tap of another dtype": ("test", lambda f: _np_save(
        f / "test.layer1.npy", np.zeros((_n(f, "test"), 16, 16, 24), np.float32))),
    "fingerprint {}": ("train", lambda f: (f / "train.json").write_text("{}")),
    "fingerprint [1,2,3]": ("train", lambda f: (f / "train.json").write_text("[1, 2, 3]")),
    "truncated fingerprint": ("test", lambda f: truncate(f / "test.json")),
    "empty csv": ("test", lambda f: _empty(f / "test.csv")),
    "csv row missing": ("train", lambda f: _drop_last_row(f / "train.csv")),
    "unfinished (no test.json)": ("test", lambda f: (f / "test.json").unlink()),
}


@pytest.mark.parametrize("damage", list(BANK_DAMAGE))
def test_damaged_bank_is_refused_before_fitting_and_rebuilt_by_extract(
        ref: Ref, extractor: Extractor, tmp_path: Path, damage: str,
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    banks = copy_banks(ref, tmp_path / "banks")
    split, harm = BANK_DAMAGE[damage]
    harm(bank_dir(banks))

    def never(*args: object, **kw: object) -> None:
        raise AssertionError("fitted on a damaged bank")

    with monkeypatch.context() as m:
        m.setattr("patchbank.scorers.base.Scorer.fit", never)
        assert run_cli(cli.score_main, ref.score_args(banks, tmp_path / "scores")) == 2
    line = one_error(capsys.readouterr().err)
    assert str(bank_dir(banks)) in line and "scripts/extract.py" in line
    # the fix names the same settings, dataset and banks folder, so it rebuilds this bank
    assert f"--data-root {ref.data}" in line and f"--banks-dir {banks}" in line
    assert "--weights random" in line and "--image-size 64" in line

    other = "train" if split == "test" else "test"
    assert extractor.run(ref.data, CAT, banks) == {
        split: "built" if damage.startswith("unfinished") else "rebuilt", other: "skipped"}
    assert_same_banks(banks, ref)


@pytest.mark.parametrize("where", ["category", "tag", "backbone"])
def test_bank_in_another_folder_is_refused_and_extract_rebuilds_it(
        ref: Ref, extractor: Extractor, tmp_path: Path, where: str, capsys) -> None:
    banks = tmp_path / "banks"
    backbone, tag, category = {"category": (BACKBONE, TAG, "demo_object"),
                               "tag": (BACKBONE, TAG[:-8] + "deadbeef", CAT),
                               "backbone": ("resnet18", TAG, CAT)}[where]
    shutil.copytree(bank_dir(ref.banks), bank_folder(banks, backbone, tag, category))
    with pytest.raises(BankError, match="does not belong in this folder"):
        load_bank(banks, backbone, tag, category, "train")
    args = ["--backbone", backbone, "--method", "padim", "--banks-dir", banks, "--scores-dir",
            tmp_path / "scores", "--category", category]
    assert run_cli(cli.score_main, args) == 2
    line = one_error(capsys.readouterr().err)
    assert "does not belong in this folder" in line and where in line
    if where == "category":  # extract never takes it for this category's bank
        assert extractor.run(ref.data, category, banks) == {"train": "rebuilt",
                                                            "test": "rebuilt"}
        assert_same_banks(banks, ref, category)


RUN_DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty maps.npz": lambda f: _empty(f / "maps.npz"),
    "truncated maps.npz": lambda f: truncate(f / "maps.npz"),
    "empty model.npz": lambda f: _empty(f / "model.npz"),
    "truncated model.npz": lambda f: truncate(f / "model.npz", 0.9),
    "run.json [1,2,3]": lambda f: (f / "run.json").write_text("[1, 2, 3]"),
    "empty image_scores.csv": lambda f: _empty(f / "image_scores.csv"),
}


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_damaged_run_is_one_line_for_evaluate_and_recomputed_by_score(
        ref: Ref, tmp_path: Path, damage: str, capsys) -> None:
    scores = copy_scores(ref, tmp_path / "scores")
    folder = run_dir(scores, ref.name)
    RUN_DAMAGE[damage](folder)
    if "model.npz" in damage:  # evaluate never reads the model; whoever loads it gets a line
        with pytest.raises(ScoresError, match="model.npz: unreadable model"):
            load_scorer(folder / "model.npz")
    else:
        assert run_cli(cli.evaluate_main, ref.evaluate_args(scores)) == 2
        line = one_error(capsys.readouterr().err)
        assert str(folder) in line and "scripts/score.py" in line and "--overwrite" in line
    # score does not call a damaged run up to date
    assert run_cli(cli.score_main, ref.score_args(ref.banks, scores)) == 0
    assert capsys.readouterr().out.strip().endswith(": recomputed")
    assert verify_run(RunPaths(folder), load_run(RunPaths(folder)).info) == []
    load_scorer(folder / "model.npz")
    assert run_cli(cli.evaluate_main, ref.evaluate_args(scores)) == 0


@pytest.mark.parametrize("damage", ["metrics.json", "metrics.csv"])
def test_empty_metrics_files_are_recomputed(ref: Ref, tmp_path: Path, damage: str,
                                            capsys) -> None:
    scores = copy_scores(ref, tmp_path / "scores")
    method_dir = scores / BACKBONE / ref.name
    target = method_dir / CAT / damage if damage == "metrics.json" else method_dir / damage
    _empty(target)
    assert run_cli(cli.evaluate_main, ref.evaluate_args(scores)) == 0
    assert error_lines(capsys.readouterr().err) == []
    if damage == "metrics.json":
        assert json.loads(target.read_text())["metrics"]["category"] == CAT
    else:
        assert set(pd.read_csv(target)["category"]) == {"demo_object", "demo_texture", "mean"}


# --------------------------------------------------------------------------- --category all


@pytest.fixture
def bad_data(ref: Ref, tmp_path: Path) -> Path:
    """The demo with one undecodable training image in demo_object."""
    data = tmp_path / "data"
    shutil.copytree(ref.data, data)
    (data / "demo_object" / "train" / "good" / "003.png").write_bytes(b"not a png")
    return data


def test_category_all_finishes_what_it_can_in_extract_and_run(
        ref: Ref, bad_data: Path, tmp_path: Path, capsys) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    bad = bad_data / "demo_object" / "train" / "good" / "003.png"
    args = [*ref.extract_args(banks, "all", bad_data), "--workers", "1"]  # decoded in a worker
    assert run_cli(cli.extract_main, args) == 2
    captured = capsys.readouterr()
    first, summary = error_lines(captured.err)
    assert first.startswith(f"error: {bad}: cannot read image") and "Traceback" not in captured.err
    assert "patchbank.core.errors" not in first and "DatasetError:" not in first
    assert summary == "error: 1 of 3 failed (listed above); everything else finished"
    for category in ("demo_crack", "demo_texture"):
        load_pair(banks, BACKBONE, TAG, category)
        assert f"{category}: train built, test built" in captured.out

    run_args = ["--data-root", bad_data, "--category", "demo_object,demo_texture", "--method",
                "padim", "--weights", "random", "--image-size", "64", "--banks-dir", banks,
                "--scores-dir", scores, "--no-figures"]
    assert run_cli(cli.run_main, run_args) == 2
    captured = capsys.readouterr()
    first, summary = error_lines(captured.err)
    assert first.startswith(f"error: {bad}: cannot read image")
    assert summary == "error: 1 failed (listed above); everything else finished"
    board = pd.read_csv(scores / "leaderboard.csv")
    assert list(board["categories"]) == ["demo_texture"] and "demo_texture" in captured.out


def test_fail_fast_stops_at_the_first_failing_category(ref: Ref, bad_data: Path,
                                                       tmp_path: Path, capsys) -> None:
    banks = tmp_path / "banks"
    assert run_cli(cli.extract_main, [*ref.extract_args(banks, "all", bad_data),
                                      "--fail-fast"]) == 2
    assert "cannot read image" in one_error(capsys.readouterr().err)
    load_pair(banks, BACKBONE, TAG, "demo_crack")  # before the bad category
    assert not bank_dir(banks, "demo_texture").exists()  # after it


def test_score_and_evaluate_all_report_a_broken_category_and_finish_the_others(
        ref: Ref, tmp_path: Path, capsys) -> None:
    banks = copy_banks(ref, tmp_path / "banks")
    (bank_dir(banks, "demo_object") / "test.json").unlink()  # an unfinished extraction
    scores = tmp_path / "scores"
    args = ["--backbone", BACKBONE, "--method", "padim", "--banks-dir", banks, "--scores-dir",
            scores]
    assert run_cli(cli.score_main, args) == 2  # --category all
    captured = capsys.readouterr()
    first, summary = error_lines(captured.err)
    assert first.startswith(f"error: {bank_dir(banks, 'demo_object') / 'test.json'}: test bank "
                            "missing")
    assert summary == "error: 1 of 2 failed (listed above); everything else finished"
    assert captured.out.strip() == f"{BACKBONE}/{ref.name}/demo_texture: computed"

    scores = copy_scores(ref, tmp_path / "eval", keep_metrics=False)
    _empty(run_dir(scores, ref.name, "demo_object") / "image_scores.csv")
    eval_args = ref.evaluate_args(scores, "all")
    assert run_cli(cli.evaluate_main, [*eval_args, "--fail-fast"]) == 2
    assert "demo_object" in one_error(capsys.readouterr().err)
    assert not (run_dir(scores, ref.name) / "metrics.json").exists()  # stopped before it
    assert run_cli(cli.evaluate_main, eval_args) == 2
    first, summary = error_lines(capsys.readouterr().err)
    assert str(run_dir(scores, ref.name, "demo_object")) in first
    assert summary == "error: 1 of 2 failed (listed above); everything else finished"
    table = pd.read_csv(scores / BACKBONE / ref.name / "metrics.csv")
    assert list(table["category"]) == ["demo_texture", "mean"]


# --------------------------------------------------------------------------- subprocesses

# A fork server: imports patchbank once, then forks one child per command-line run (each a
# real process with its own pid, signals and exit status; importing torch and the scorers in
# every child would cost several seconds of CPU each). With "pause" set, the child's first
# commit of a file matching it waits (temporary written, not yet renamed) after creating
# "ready", until "go" exists.
FORK_SERVER = r"""
import atexit, fnmatch, json, os, sys, time, traceback
from pathlib import Path
import patchbank.cli.stages
import patchbank.stages.evaluate, patchbank.stages.extract, patchbank.stages.score
from patchbank.core import atomic


def pause_before(pattern, ready, go):
    commit, paused = atomic.AtomicFile.commit, []

    def pausing_commit(self):
        if not paused and fnmatch.fnmatch(self.target.name, pattern):
            paused.append(True)
            Path(ready).write_text(str(os.getpid()))
            start = time.time()
            while not (go and os.path.exists(go)) and time.time() - start < 300:
                time.sleep(0.02)
        return commit(self)

    atomic.AtomicFile.commit = pausing_commit


def child(req):
    for name, fd in (("out", 1), ("err", 2)):
        os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if req.get("pause"):
        pause_before(req["pause"], req["ready"], req.get("go"))
    code = 0
    try:
        getattr(patchbank.cli.stages, req["main"])(req["args"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (temporaries cleanup)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


status = {}
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(req)
        answer = {"pid": pid}
    else:  # "poll"
        pid = req["pid"]
        if pid not in status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status[pid] = os.waitstatus_to_exitcode(code)
        answer = {"status": status.get(pid)}
    print(json.dumps(answer), flush=True)
"""


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.pids: list[int] = []

    def ask(self, **request: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def close(self) -> None:
        for pid in self.pids:
            if self.ask(op="poll", pid=pid)["status"] is None:
                os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.kill()  # nothing to clean up; a torch interpreter is slow to finalise
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> ForkServer:
    srv = ForkServer()
    yield srv
    srv.close()


@dataclass
class Job:
    server: ForkServer
    pid: int
    out: Path
    err: Path
    ready: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def poll(self) -> int | None:
        return self.server.ask(op="poll", pid=self.pid)["status"]

    def wait(self, timeout: float = 120) -> int:
        start = time.time()
        while (code := self.poll()) is None:
            if time.time() - start > timeout:
                os.kill(self.pid, signal.SIGKILL)
                pytest.fail(f"did not finish:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        return code


def spawn(server: ForkServer, folder: Path, label: str, main: str, args: Sequence[object],
          pause: str | None = None, go: Path | None = None) -> Job:
    folder.mkdir(parents=True, exist_ok=True)
    out, err, ready = (folder / f"{label}.{x}" for x in ("out", "err", "ready"))
    pid = server.ask(op="spawn", main=main, args=[str(a) for a in args], out=str(out),
                     err=str(err), ready=str(ready), pause=pause, go=str(go) if go else None
                     )["pid"]
    server.pids.append(pid)
    return Job(server, pid, out, err, ready)


def wait_until(check: Callable[[], bool], jobs: Sequence[Job], what: str,
               timeout: float = 180) -> None:
    start = time.time()
    while not check():
        for job in jobs:
            if (code := job.poll()) is not None:
                pytest.fail(f"{what}: a process ended early ({code}):\n{job.stderr()[-3000:]}")
        if time.time() - start > timeout:
            pytest.fail(f"{what}: timed out")
        time.sleep(0.05)


def test_sigterm_and_sigkill_at_each_stage_boundary(ref: Ref, server: ForkServer,
                                                    tmp_path: Path) -> None:
    """Extraction (before its fingerprint lands), score after the fit (before its maps land)
    and evaluate (before metrics.json lands), each killed both ways."""
    jobs: dict[tuple[str, str], Job] = {}
    dirs: dict[str, dict[str, Path]] = {}
    for sig in ("TERM", "KILL"):
        d = tmp_path / sig
        dirs[sig] = {"banks": d / "banks", "scores": d / "scores",
                     "eval": copy_scores(ref, d / "eval", keep_metrics=False)}
        jobs[sig, "extract"] = spawn(server, d, "extract", "extract_main", [
            *ref.extract_args(dirs[sig]["banks"]), "--workers", "1"], pause="train.json")
        jobs[sig, "score"] = spawn(server, d, "score", "score_main",
                                   ref.score_args(ref.banks, dirs[sig]["scores"]),
                                   pause="maps.npz")
        jobs[sig, "evaluate"] = spawn(server, d, "evaluate", "evaluate_main",
                                      ref.evaluate_args(dirs[sig]["eval"]), pause="metrics.json")
    wait_until(lambda: all(j.ready.exists() for j in jobs.values()), list(jobs.values()),
               "stage boundaries")
    for (sig, stage), job in jobs.items():
        assert temporaries(dirs[sig]["banks" if stage == "extract" else
                                     "scores" if stage == "score" else "eval"]), stage
        os.kill(job.pid, getattr(signal, f"SIG{sig}"))
    codes = {key: job.wait() for key, job in jobs.items()}

    for sig in ("TERM", "KILL"):
        banks, scores, evals = dirs[sig]["banks"], dirs[sig]["scores"], dirs[sig]["eval"]
        for stage in ("extract", "score", "evaluate"):
            job = jobs[sig, stage]
            if sig == "TERM":
                assert codes[sig, stage] == 128 + signal.SIGTERM, job.stderr()[-3000:]
                assert "terminated:" in job.stderr() and "Traceback" not in job.stderr()
            else:
                assert codes[sig, stage] == -signal.SIGKILL
        # nothing that looks complete
        assert not BankPaths.of(banks, BACKBONE, TAG, CAT, "train").json.exists()
        assert not list(scores.rglob("run.json"))
        assert not (run_dir(evals, ref.name) / "metrics.json").exists()
        left = temporaries(banks, scores, evals)
        if sig == "TERM":
            assert left == []  # removed on the way out
            continue
        assert left  # SIGKILL leaves them; the next run on this host sweeps them
        assert run_cli(cli.extract_main, ref.extract_args(banks)) == 0
        assert run_cli(cli.score_main, ref.score_args(ref.banks, scores)) == 0
        assert run_cli(cli.evaluate_main, ref.evaluate_args(evals)) == 0
        assert temporaries(banks, scores, evals) == []
        assert_same_banks(banks, ref)
        assert_same_scores(run_dir(scores, ref.name), run_dir(ref.scores, ref.name))
        got = json.loads((run_dir(evals, ref.name) / "metrics.json").read_text())["metrics"]
        want = json.loads((run_dir(ref.scores, ref.name) / "metrics.json").read_text())
        assert got.keys() == want["metrics"].keys()
        for key, value in want["metrics"].items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_two_writers_at_once_wait_for_each_other(ref: Ref, server: ForkServer,
                                                  tmp_path: Path) -> None:
    """A second extraction, score or evaluation of the same output waits for the first,
    then finds it complete and skips it."""
    go = tmp_path / "go"
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    evals = copy_scores(ref, tmp_path / "eval", keep_metrics=False)
    args = {"extract": ("extract_main", ref.extract_args(banks), "train.json"),
            "score": ("score_main", ref.score_args(ref.banks, scores), "maps.npz"),
            "evaluate": ("evaluate_main", ref.evaluate_args(evals), "metrics.json")}
    first = {k: spawn(server, tmp_path / "first", k, main, a, pause=p, go=go)
             for k, (main, a, p) in args.items()}
    wait_until(lambda: all(j.ready.exists() for j in first.values()), list(first.values()),
               "first writers paused")
    second = {k: spawn(server, tmp_path / "second", k, main, a)
              for k, (main, a, _) in args.items()}
    everyone = [*first.values(), *second.values()]
    wait_until(lambda: all("waiting" in j.stderr() for j in second.values()), everyone,
               "second writers waiting")
    go.touch()
    for job in everyone:
        assert job.wait() == 0, job.stderr()[-3000:]

    # extract: the first built train while the second waited; each test bank built once
    out1, out2 = first["extract"].stdout(), second["extract"].stdout()
    assert "train built" in out1 and "train skipped" in out2
    assert ("test built" in out1) != ("test built" in out2)
    assert_same_banks(banks, ref)
    assert first["score"].stdout().strip().endswith(": computed")
    assert second["score"].stdout().strip().endswith(": skipped")
    assert f"{BACKBONE}/{ref.name}/{CAT}: up to date, skipped" in second["evaluate"].stderr()
    assert (run_dir(evals, ref.name) / "metrics.json").is_file()
    assert temporaries(banks, scores, evals) == []
