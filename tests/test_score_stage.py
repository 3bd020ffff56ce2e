"""Score stage: banks only in, image scores + maps + run.json out, cached by configuration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_toy_banks

from patchbank.core.errors import BankError, PatchbankError
from patchbank.stages.score import holdout_split, score_category
from patchbank.store.runs import RunPaths, load_run


def test_patchcore_run_written_and_read_back(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    status = score_category(tmp_path / "banks", tmp_path / "scores", "toy", "patchcore", "widget",
                            {"coreset": "0.5"})
    assert status == "computed"
    run = load_run(RunPaths.of(tmp_path / "scores", "toy", "patchcore", "widget"))
    assert run.scores["label"].tolist() == [0] * 6 + [1] * 6
    good, bad = run.scores["score"][:6], run.scores["score"][6:]
    assert bad.min() > good.max()  # the injected blocks are found
    assert run.maps.shape == (12, 6, 6) and run.maps.dtype == np.float32
    assert run.info["params"]["coreset"] == 0.5 and run.info["input_size"] == 32
    assert run.info["banks"]["train"]["split"] == "train" and run.info["fit_s"] >= 0
    assert len(run.train_scores) == 6  # 20 % of 30 held out


def test_rerun_skips_changed_params_recompute_overwrite_forces(tmp_path: Path) -> None:
    banks, scores = tmp_path / "banks", tmp_path / "scores"
    write_toy_banks(banks)
    args = (banks, scores, "toy", "knn", "widget")
    assert score_category(*args, {"k": "1"}) == "computed"
    assert score_category(*args, {"k": "1"}) == "skipped"
    assert score_category(*args, {"k": "2"}) == "recomputed"
    assert load_run(RunPaths.of(scores, "toy", "knn", "widget")).info["params"]["k"] == 2
    assert score_category(*args, {"k": "2"}, overwrite=True) == "overwritten"
    write_toy_banks(banks, seed=1, n_train=20)  # banks changed -> recompute
    assert score_category(*args, {"k": "2"}) == "recomputed"


def test_image_level_method_writes_no_maps(tmp_path: Path) -> None:
    write_toy_banks(tmp_path / "banks")
    score_category(tmp_path / "banks", tmp_path / "scores", "toy", "mahalanobis", "widget")
    paths = RunPaths.of(tmp_path / "scores", "toy", "mahalanobis", "widget")
    run = load_run(paths)
    assert run.maps is None and not paths.maps.exists() and run.info["pixel_level"] is False


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="no complete train bank"):
        score_category(tmp_path, tmp_path / "s", "toy", "knn", "widget")
    write_toy_banks(tmp_path / "banks")
    with pytest.raises(PatchbankError, match="--method nosuch"):
        score_category(tmp_path / "banks", tmp_path / "s", "toy", "nosuch", "widget")
    with pytest.raises(PatchbankError, match="coreset"):
        score_category(tmp_path / "banks", tmp_path / "s", "toy", "knn", "widget",
                       {"coreset": "0.1"})


def test_cli_reports_missing_banks_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/score.py", "--backbone", "toy", "--method", "knn",
         "--category", "widget", "--banks-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


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
            score_category(Path({str(tmp_path / 'banks')!r}), Path({str(tmp_path / 's')!r}),
                           "toy", m, "widget")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
    scores = pd.read_csv(tmp_path / "s" / "toy" / "padim" / "widget" / "image_scores.csv")
    assert len(scores) == 12
    info = json.loads((tmp_path / "s" / "toy" / "spade" / "widget" / "run.json").read_text())
    assert info["method"] == "spade"


def test_holdout_split_is_seeded_and_disjoint() -> None:
    fit, out = holdout_split(50, 0.2, seed=0)
    assert len(out) == 10 and len(fit) == 40 and not set(fit) & set(out)
    assert np.array_equal(out, holdout_split(50, 0.2, seed=0)[1])
    assert not np.array_equal(out, holdout_split(50, 0.2, seed=1)[1])
    assert len(holdout_split(50, 0.0, seed=0)[1]) == 0
