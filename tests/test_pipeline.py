"""The one-command pipeline: all stages, leaderboard, and the untrained-weights fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchbank.data.demo import make_demo_dataset
from patchbank.stages.pipeline import method_params, run_pipeline


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
    with caplog.at_level("WARNING"):
        board = run_pipeline(root, "demo_texture", ["resnet18"], ["knn"],
                             banks_dir=tmp_path / "banks", scores_dir=tmp_path / "scores",
                             weights="auto", image_size=64, device="cpu", figures=False)
    assert "NO PRETRAINED WEIGHTS" in caplog.text and "UNTRAINED resnet18" in caplog.text
    fp = json.loads((tmp_path / "banks/resnet18/demo_texture/train.json").read_text())
    assert fp["weights"] == "random:seed0"
    assert board[["backbone", "method", "categories"]].values.tolist() == [
        ["resnet18", "knn", "demo_texture"]]
    assert (tmp_path / "scores/leaderboard.md").is_file()
    assert 0.0 <= board["image_auroc"].iloc[0] <= 1.0


@pytest.mark.parametrize("params, method, expected", [
    ({"k": "3", "patchcore.coreset": "0.01"}, "patchcore", {"k": "3", "coreset": "0.01"}),
    ({"k": "3", "patchcore.coreset": "0.01"}, "knn", {"k": "3"}),
    (None, "knn", {}),
])
def test_method_params(params, method, expected) -> None:
    assert method_params(params, method) == expected
