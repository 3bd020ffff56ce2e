"""The one-command pipeline: all stages, leaderboard, and the untrained-weights fallback."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from patchbank.data.demo import make_demo_dataset
from patchbank.features.spec import ExtractSpec
from patchbank.scorers import make_scorer
from patchbank.stages.pipeline import method_params, run_pipeline
from patchbank.stages.score import run_name
from patchbank.store.banks import find_tags


def test_weights_auto_falls_back_to_untrained_and_says_so(tmp_path: Path, monkeypatch,
                                                          caplog) -> None:
    from huggingface_hub import constants as hf_constants

    # resnet18's hub weights cannot be fetched (offline, fail fast instead of retrying)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = make_demo_dataset(tmp_path / "demo", size=64, n_train=6, n_test_good=2,
                             n_test_defect=1)
    spec = ExtractSpec("resnet18", weights="auto", image_size=64)
    with caplog.at_level("WARNING"):
        board = run_pipeline(root, "demo_texture", [spec], ["knn"],
                             banks_dir=tmp_path / "banks", scores_dir=tmp_path / "scores",
                             device="cpu", figures=False)
    assert "NO PRETRAINED WEIGHTS" in caplog.text and "UNTRAINED resnet18" in caplog.text
    # the banks live under the spec actually used (weights "random"), not the one asked for
    used = replace(spec, weights="random")
    assert find_tags(tmp_path / "banks", "resnet18", "demo_texture") == [used.tag()]
    fp = json.loads((tmp_path / "banks" / "resnet18" / used.tag() / "demo_texture" /
                     "train.json").read_text())
    assert fp["weights"] == "random:seed0" and fp["spec"]["weights"] == "random"
    name = run_name("knn", make_scorer("knn").params, used.tag(), 0.2, 0)
    assert (tmp_path / "scores" / "resnet18" / name / "demo_texture" / "run.json").is_file()
    assert board[["backbone", "method", "categories"]].values.tolist() == [
        ["resnet18", name, "demo_texture"]]
    assert (tmp_path / "scores/leaderboard.md").is_file()
    assert 0.0 <= board["image_auroc"].iloc[0] <= 1.0


def test_two_specs_of_one_backbone_are_both_scored(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", size=64, n_train=6, n_test_good=2,
                             n_test_defect=1)
    specs = [ExtractSpec("efficientnet_lite0", "random", image_size=64),
             ExtractSpec("efficientnet_lite0", "random", layers=(2, 3), image_size=64)]
    kw = {"banks_dir": tmp_path / "banks", "scores_dir": tmp_path / "scores", "device": "cpu",
          "figures": False, "holdout": 0.0}
    board = run_pipeline(root, "demo_object", specs, ["mahalanobis"], **kw)
    params = make_scorer("mahalanobis").params
    names = sorted(run_name("mahalanobis", params, s.tag(), 0.0, 0) for s in specs)
    assert sorted(board["method"]) == names and len(set(names)) == 2
    assert find_tags(tmp_path / "banks", "efficientnet_lite0", "demo_object") == sorted(
        s.tag() for s in specs)
    run_pipeline(root, "demo_object", specs, ["mahalanobis"], **kw)  # all cached: no change
    assert sorted(p.name for p in (tmp_path / "scores" / "efficientnet_lite0").iterdir()) == \
        names


@pytest.mark.parametrize("params, method, expected", [
    ({"k": "3", "patchcore.coreset": "0.01"}, "patchcore", {"k": "3", "coreset": "0.01"}),
    ({"k": "3", "patchcore.coreset": "0.01"}, "knn", {"k": "3"}),
    (None, "knn", {}),
])
def test_method_params(params, method, expected) -> None:
    assert method_params(params, method) == expected
