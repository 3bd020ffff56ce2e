"""Choosing a configuration from synthetic-set metrics: ranking, the pick, the comparison with
real metrics (oracle, default, Spearman) and scripts/select_config.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from patchbank.core.errors import ScoresError
from patchbank.synth.select import collect, compare, pick, rank, spearman

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "select_config.py"


def write_run(scores: Path, backbone: str, run: str, category: str, **metrics: float) -> None:
    folder = scores / backbone / run / category
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"method": run.split("-")[0],
                                                 "params": {"k": 1}, "bank": "s224-x"}))
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"category": category,
                                                                 **metrics}}))


CONFIGS = ["padim-s224-a", "patchcore-s224-b", "knn-s224-c", "spade-s224-d"]


def make(scores: Path, values: dict[str, list[float]]) -> None:
    for category, vals in values.items():
        for run, v in zip(CONFIGS, vals, strict=True):
            write_run(scores, "efficientnet_lite0", run, category, image_auroc=v,
                      pixel_auroc=v / 2)


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rank_pick_and_compare(tmp_path: Path) -> None:
    make(tmp_path / "syn", {"a": [0.9, 0.8, 0.7, 0.6], "b": [0.5, 0.9, 0.9, 0.1]})
    make(tmp_path / "real", {"a": [0.7, 0.95, 0.8, 0.6], "b": [0.6, 0.7, 0.8, 0.9]})
    syn = collect(tmp_path / "syn")
    assert len(syn) == 8 and set(syn["method"]) == {"padim", "patchcore", "knn", "spade"}
    ranked = rank(syn)
    assert ranked[ranked["category"] == "a"]["run"].tolist() == CONFIGS
    # b: patchcore and knn tie at 0.9 -> other metrics' mean ties too -> config name order
    assert pick(syn)["run"].tolist() == ["padim-s224-a", "knn-s224-c"]
    table = compare(syn, collect(tmp_path / "real")).set_index("category")
    a, b = table.loc["a"], table.loc["b"]
    assert a["pick_real"] == 0.7 and a["pick_real_rank"] == 3
    assert a["oracle"].endswith("patchcore-s224-b") and a["oracle_real"] == 0.95
    assert a["default"].endswith("patchcore-s224-b") and a["default_real"] == 0.95
    assert a["spearman"] == pytest.approx(0.4)
    assert b["pick_real"] == 0.8 and b["oracle_real"] == 0.9 and b["default_real"] == 0.7
    assert b["spearman"] == pytest.approx(spearman([0.5, 0.9, 0.9, 0.1], [0.6, 0.7, 0.8, 0.9]))
    assert table.loc["mean", "pick_real"] == pytest.approx(0.75)


def test_collect_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ScoresError, match="no evaluated runs"):
        collect(tmp_path)


def test_select_script(tmp_path: Path) -> None:
    make(tmp_path / "syn", {"a": [0.9, 0.8, 0.7, 0.6]})
    make(tmp_path / "real", {"a": [0.7, 0.95, 0.8, 0.6]})
    out = tmp_path / "bench" / "select.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--scores-dir",
                           str(tmp_path / "syn"), "--real-scores-dir", str(tmp_path / "real"),
                           "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "- a: efficientnet_lite0/padim-s224-a (image_auroc 90.0" in text
    assert "| a | 4 | efficientnet_lite0 padim | 90.0 | 70.0 (3) | efficientnet_lite0 " \
           "patchcore | 95.0 | efficientnet_lite0 patchcore | 95.0 | +0.40 |" in text
    bad = subprocess.run([sys.executable, str(SCRIPT), "--scores-dir",
                          str(tmp_path / "none")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
    assert "no evaluated runs" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
