"""The settings benchmark: derived image-score runs equal fitted ones; the decision rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.bench.settings import decide, derive_image_score_run
from patchbank.data.demo import make_demo_dataset
from patchbank.features.spec import ExtractSpec
from patchbank.scorers import load_scorer
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.score import score_category
from patchbank.store.runs import RunPaths, load_run

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def banks(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("settings")
    root = make_demo_dataset(base / "demo", size=64, n_train=8, n_test_good=3, n_test_defect=3)
    spec = ExtractSpec(BACKBONE, weights="random", image_size=64)
    extract(root, ["demo_texture"], ExtractConfig(spec, num_workers=0, device="cpu"),
            base / "banks")
    return base / "banks"


@pytest.mark.parametrize("method, params, rule", [("padim", {"image_score": "max_map"},
                                                   "max_grid"),
                                                  ("patchcore", {"coreset": "0.25"}, "max_map")])
def test_derived_run_equals_fitting_with_the_rule(banks: Path, tmp_path: Path, method, params,
                                                  rule) -> None:
    scores = tmp_path / "scores"
    base, _ = score_category(banks, scores, BACKBONE, method, "demo_texture", params,
                             holdout=0.0, device="cpu")
    direct, _ = score_category(banks, scores, BACKBONE, method, "demo_texture",
                               {**params, "image_score": rule}, holdout=0.0, device="cpu")
    derive_image_score_run(scores, BACKBONE, base, "demo_texture", rule, "derived")
    got = load_run(RunPaths.of(scores, BACKBONE, "derived", "demo_texture"))
    want = load_run(RunPaths.of(scores, BACKBONE, direct, "demo_texture"))
    np.testing.assert_allclose(got.scores["score"], want.scores["score"], rtol=1e-6)
    np.testing.assert_array_equal(got.maps, want.maps)
    assert got.info["params"] == want.info["params"] and got.info["run"] == "derived"
    model = load_scorer(RunPaths.of(scores, BACKBONE, "derived", "demo_texture").model)
    assert model.params["image_score"] == rule


def _pairs(rows: list[tuple]) -> pd.DataFrame:
    cols = ["method", "category", "metric", "run_a", "run_b", "diff", "lo", "hi", "p"]
    return pd.DataFrame([("m", *r) for r in rows], columns=cols)


def test_decide_needs_a_significant_gain_and_no_significant_loss() -> None:
    # diff = reference - alternative
    rows = [("mean", "image_auroc", "ref", "alt1", -0.03, -0.05, -0.01, 0.5),
            ("d1", "image_auroc", "ref", "alt1", -0.03, -0.05, -0.01, 0.01),
            ("d1", "pro", "ref", "alt1", 0.02, 0.01, 0.03, 0.01),  # alt1 worse in PRO on d1
            ("mean", "image_auroc", "ref", "alt2", -0.01, -0.02, -0.001, 0.5),
            ("d1", "pro", "ref", "alt2", 0.01, -0.01, 0.03, 0.2),
            ("mean", "image_auroc", "ref", "alt3", -0.04, -0.09, 0.01, 0.5)]  # interval has 0
    best, why = decide(_pairs(rows))["m"]
    assert best == "alt2" and why.startswith("image_auroc +1.00 [0.10, 2.00]")
    assert decide(_pairs(rows[:3] + rows[5:]))["m"][0] == "ref"
