"""The ``patchbank`` command: subcommands, help texts, run selection by method or name."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.cli.main import COMMANDS, main
from patchbank.core.errors import ScoresError
from patchbank.store.catalog import find_one_run, find_runs, list_runs
from patchbank.store.runs import SCORE_COLUMNS, RunPaths, write_run

REPO = Path(__file__).resolve().parents[1]


class _Parsed(Exception):
    """Raised instead of parsing, carrying the parser a subcommand built."""


def _parser_of(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def capture(self: argparse.ArgumentParser, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        main([name])
    return caught.value.args[0]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("extract", "score", "evaluate", "run", "predict", "sweep", "synth", "select",
                 "compare", "app", "weights"):
        assert f"\n  {name} " in out
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 2


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["evalute"])
    assert done.value.code == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help_and_the_help_ends_with_an_example(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _parser_of(name, monkeypatch)
    assert p.prog == f"patchbank {name}"
    missing = [a.option_strings for a in p._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"patchbank {name}: flags without help text: {missing}"
    example = p.format_help().rstrip().splitlines()[-1].strip()
    assert example.startswith(f"patchbank {name}"), example


@pytest.mark.parametrize("name", ["extract", "score", "evaluate", "predict"])
def test_subcommand_help_runs_as_a_process(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", "patchbank", name, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "example:" in done.stdout and "--help" in done.stdout


def test_unknown_method_suggests_the_closest(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["score", "--backbone", "toy", "--method", "patchcor", "--banks-dir",
              str(tmp_path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'patchcore'" in err


def test_unknown_backbone_suggests_the_closest(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["extract", "--backbone", "dinov3", "--category", "demo_object", "--banks-dir",
              str(tmp_path / "banks"), "--data-root", str(tmp_path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'dinov2'" in err


# --------------------------------------------------------------------------- run selection


def toy_run(scores: Path, name: str, method: str, category: str = "widget",
            score_bad: float = 0.9) -> RunPaths:
    """A complete image+map run of two test images (one good, one defective, no masks)."""
    rows = [["/x/000.png", "good", 0, 0.1, "", 40, 40],
            ["/x/001.png", "blob", 1, score_bad, "", 40, 40]]
    paths = RunPaths.of(scores, "toy", name, category)
    write_run(paths, pd.DataFrame(rows, columns=SCORE_COLUMNS), np.zeros((2, 5, 5), np.float32),
              None, {"method": method, "pixel_level": True, "map_sigma": 0.0,
                     "input_size": 40, "image_size": 40, "crop": None})
    return paths


@pytest.fixture
def scores(tmp_path: Path) -> Path:
    root = tmp_path / "scores"
    toy_run(root, "patchcore-aaa-11111111", "patchcore")
    toy_run(root, "patchcore-bbb-22222222", "patchcore", score_bad=0.05)
    toy_run(root, "padim-aaa-33333333", "padim")
    toy_run(root, "padim-aaa-33333333", "padim", category="gadget")
    (root / "toy" / "figures").mkdir()  # not a run
    return root


def test_list_and_find_runs(scores: Path) -> None:
    runs = list_runs(scores, "toy")
    assert [(r.name, r.method, r.categories) for r in runs] == [
        ("padim-aaa-33333333", "padim", ("gadget", "widget")),
        ("patchcore-aaa-11111111", "patchcore", ("widget",)),
        ("patchcore-bbb-22222222", "patchcore", ("widget",))]
    assert [r.name for r in find_runs(scores, "toy", method="patchcore")] == [
        "patchcore-aaa-11111111", "patchcore-bbb-22222222"]
    assert find_runs(scores, "toy", run="patchcore-b")[0].name == "patchcore-bbb-22222222"
    assert find_runs(scores, "toy", method="padim", categories=["gadget"])[0].method == "padim"
    # an exact run folder name given as --method still selects it (older commands)
    assert find_runs(scores, "toy", method="padim-aaa-33333333")[0].name == "padim-aaa-33333333"


def test_run_selection_errors_name_what_exists_and_what_to_run(scores: Path) -> None:
    with pytest.raises(ScoresError) as err:
        find_runs(scores, "toy", method="knn")
    text = str(err.value)
    assert "no run of method 'knn'" in text and "patchcore-aaa-11111111 (patchcore" in text
    assert "`patchbank score --backbone toy --method knn --scores-dir" in text
    with pytest.raises(ScoresError, match="did you mean 'patchcore'"):
        find_runs(scores, "toy", method="patchcor")
    with pytest.raises(ScoresError, match="matches 2 runs"):
        find_runs(scores, "toy", run="patchcore-")
    with pytest.raises(ScoresError, match="pick one with --run NAME"):
        find_one_run(scores, "toy", method="patchcore")
    with pytest.raises(ScoresError, match="no run of method 'patchcore' with category gadget"):
        find_runs(scores, "toy", method="patchcore", categories=["gadget"])


def test_evaluate_by_method_evaluates_every_run_of_it(scores: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    main(["evaluate", "--backbone", "toy", "--method", "patchcore", "--scores-dir", str(scores),
          "--no-figures", "--category", "widget"])
    out = capsys.readouterr().out
    assert "toy/patchcore-aaa-11111111:" in out and "toy/patchcore-bbb-22222222:" in out
    aurocs = [json.loads((scores / "toy" / n / "widget" / "metrics.json").read_text())
              ["metrics"]["image_auroc"] for n in ("patchcore-aaa-11111111",
                                                   "patchcore-bbb-22222222")]
    assert aurocs == [1.0, 0.0]
    assert not (scores / "toy" / "padim-aaa-33333333" / "widget" / "metrics.json").exists()
    board = pd.read_csv(scores / "leaderboard.csv")
    assert set(board["method"]) == {"patchcore-aaa-11111111", "patchcore-bbb-22222222"}
    main(["evaluate", "--backbone", "toy", "--run", "padim", "--scores-dir", str(scores),
          "--no-figures"])  # a unique prefix; every category of the run
    for category in ("widget", "gadget"):
        assert (scores / "toy" / "padim-aaa-33333333" / category / "metrics.json").is_file()


def test_evaluate_of_a_missing_method_is_one_line(scores: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--backbone", "toy", "--method", "knn", "--scores-dir", str(scores)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "patchbank score --backbone toy --method knn" in err
    assert "python scripts/score.py" not in err


def test_predict_by_method_needs_exactly_one_run(scores: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["predict", "--backbone", "toy", "--method", "patchcore", "--scores-dir",
              str(scores), "--images", str(scores)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "2 runs of method 'patchcore'" in err and "--run NAME" in err
    with pytest.raises(SystemExit) as done:
        main(["predict", "--backbone", "toy", "--run", "padim", "--scores-dir", str(scores),
              "--images", str(scores)])
    assert done.value.code == 2
    assert "holds gadget, widget; pick one with --category" in capsys.readouterr().err


def test_app_preselect() -> None:
    from patchbank.app.logic import preselect

    runs = pd.DataFrame(
        [["toy", "patchcore-aaa", "widget", "patchcore"], ["toy", "patchcore-bbb", "widget",
                                                           "patchcore"],
         ["toy", "padim-aaa", "widget", "padim"], ["toy", "padim-aaa", "gadget", "padim"]],
        columns=["backbone", "run", "category", "method"])
    assert len(preselect(runs)) == 4
    assert set(preselect(runs, method="patchcore")["run"]) == {"patchcore-aaa", "patchcore-bbb"}
    picked = preselect(runs, run="padim", category="gadget")
    assert picked[["run", "category"]].values.tolist() == [["padim-aaa", "gadget"]]
    assert preselect(runs, run="patchcore-aaa")["run"].tolist() == ["patchcore-aaa"]
    assert preselect(runs, backbone="other").empty


# --------------------------------------------------------------------------- installing


@pytest.mark.slow
def test_non_editable_install_runs_from_another_folder(tmp_path: Path) -> None:
    """``pip install .`` (no editable link to this checkout) into a fresh venv, then
    ``patchbank run`` on the demo from an empty folder: nothing depends on the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    # the dependencies come from this interpreter's site-packages (offline); its editable
    # patchbank link is a .pth file there, which Python does not read from a plain path entry
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "deps.pth").write_text("\n".join(map(str, deps)) + "\n")
    python = venv / "bin" / "python"
    src = tmp_path / "checkout"
    top = {".git", ".venv", "featurebanks", "scores", "data"}  # outputs of this checkout
    shutil.copytree(REPO, src, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == REPO and n in top) or n == "__pycache__"
        or n.endswith(".egg-info")])
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps",
                           "--no-build-isolation", "-q", str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(src)  # the installed package must not need the checkout
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run(
        [str(venv / "bin" / "patchbank"), "run", "--category", "demo_object", "--method",
         "padim", "--weights", "random", "--no-figures"],
        cwd=work, capture_output=True, text=True, timeout=900,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TQDM_DISABLE": "1", "HOME": str(work)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Leaderboard" in done.stdout
    assert (work / "scores" / "leaderboard.csv").is_file()
    assert (work / "data" / "demo" / "demo_object" / "train" / "good").is_dir()
    check = subprocess.run([str(python), "-c", "import patchbank; print(patchbank.__file__)"],
                           capture_output=True, text=True, cwd=work)
    assert check.stdout.startswith(str(site)), check.stdout
