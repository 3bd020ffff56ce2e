"""Sweeps: YAML/flag configuration, job graph expansion and deduplication, the in-process
executor (resume after an interrupt redoes nothing finished), the Ray executor (same table as
in-process), the summary table and figures."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbank.cli.sweep import sweep_main
from patchbank.core.errors import SweepError
from patchbank.sweep import run_sweep
from patchbank.sweep.config import ExtractSetting, MethodGrid, SweepConfig, load_config
from patchbank.sweep.executors import InProcessExecutor, RayExecutor, import_ray
from patchbank.sweep.graph import build_graph
from patchbank.sweep.summary import seed_summary, summary_markdown

METRICS = ["image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pro", "best_dice",
           "unsup_threshold", "unsup_f1", "n_train", "n_test"]
KEYS = ["backbone", "bank", "category", "method", "params", "shots", "seed", "run"]


def small_config(work: Path, scores: str = "scores", **kw) -> SweepConfig:
    """Demo texture, untrained Lite0, knn (k grid) + padim, 2 shots and all, seeds 0 and 1."""
    return SweepConfig(
        name="small", categories="demo_texture", backbones=("efficientnet_lite0",),
        extract=(ExtractSetting(weights="random"),),
        methods=(MethodGrid("knn", (("k", ("1", "3")),)), MethodGrid("padim")),
        shots=(2, None), seeds=(0, 1), banks_dir=work / "banks", scores_dir=work / scores,
        **kw)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """One folder for the module: the banks are extracted once and shared."""
    path = Path(tempfile.mkdtemp(prefix="pb-sweep-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- configuration


def test_yaml_config_parsed_typed(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("""
name: fewshot
data_root: /data/mvtec
categories: [bottle, screw]
backbones: efficientnet_lite0,efficientnet_lite2
extract:
  - {weights: auto}
  - {weights: hub, image_size: 256, normalize: imagenet, layers: [2, 3]}
methods:
  padim: {}
  knn: {k: [1, 3], metric: cosine}
shots: [1, 4, all]
seeds: [0, 1, 2]
holdout: 0
executor: ray
""")
    cfg = load_config(path)
    assert cfg.name == "fewshot" and cfg.data_root == Path("/data/mvtec")
    assert cfg.categories == "bottle,screw"
    assert cfg.backbones == ("efficientnet_lite0", "efficientnet_lite2")
    assert cfg.extract[1] == ExtractSetting("hub", 256, (2, 3), None, "imagenet")
    assert cfg.methods[1] == MethodGrid("knn", (("k", ("1", "3")), ("metric", ("cosine",))))
    assert cfg.methods[1].combinations() == [{"k": "1", "metric": "cosine"},
                                             {"k": "3", "metric": "cosine"}]
    assert cfg.shots == (1, 4, None) and cfg.seeds == (0, 1, 2) and cfg.holdout == 0.0
    assert cfg.executor == "ray"


@pytest.mark.parametrize(("text", "match"), [
    ("nme: x\n", r"unknown key\(s\) \['nme'\]"),
    ("shots: [0, all]\n", "shots .*positive integers"),
    ("shots: [few]\n", "shots 'few'"),
    ("extract: [{size: 3}]\n", r"extract: unknown key\(s\) \['size'\]"),
    ("executor: slurm\n", "executor 'slurm'"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: [\n", "not valid YAML"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_method_or_parameter_refused_before_running(tmp_path: Path) -> None:
    for methods, match in (((MethodGrid("nope"),), "unknown scoring method"),
                           ((MethodGrid("knn", (("kk", ("1",)),)),), "kk")):
        with pytest.raises(SweepError, match=match):
            build_graph(replace(small_config(tmp_path), methods=methods))


def test_flags_override_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: base\ncategories: demo_texture\nmethods: {padim: {}}\n"
                    "shots: [1]\nseeds: [0]\n")
    sweep_main(["--config", str(path), "--method", "padim,knn", "--grid", "knn.k=1,3",
                "--shots", "2,all", "--seeds", "0,1,2", "--dry-run"])
    out = capsys.readouterr().out
    # per parameter set (padim, knn k=1, knn k=3): shots=2 x 3 seeds + shots=all once
    assert "1 extraction + 12 score jobs (6 duplicates dropped)" in out
    assert "knn/{\"k\": \"3\"}/shots=all/seed=0" in out and "shots=all/seed=1" not in out
    with pytest.raises(SystemExit) as err:
        sweep_main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"])
    assert err.value.code == 2 and "missing.yaml: no such sweep file" in capsys.readouterr().err


# --------------------------------------------------------------------------- graph


def test_graph_expands_and_dedupes(tmp_path: Path) -> None:
    cfg = replace(small_config(tmp_path), backbones=("efficientnet_lite0", "resnet18"),
                  methods=(MethodGrid("knn", (("k", ("1", "3")),)), MethodGrid("knn"),
                           MethodGrid("padim")), shots=(1, 2, None), seeds=(0, 1, 2))
    graph = build_graph(cfg)
    assert len(graph.extracts) == 2  # once per (backbone, setting, category)
    # per backbone: knn k=1, k=3, padim = 3 parameter sets x (2 shots x 3 seeds + all once);
    # knn {} resolves to k=1: dropped as a duplicate; padim cannot fit 1 image: left out
    assert len(graph.scores) == 2 * 3 * 7 - 2 * 3
    assert graph.inapplicable == ["padim at 1 shot(s): needs at least 2 training images"]
    assert not any(j.method == "padim" and j.shots == 1 for j in graph.scores)
    assert all(j.seed == 0 for j in graph.scores if j.shots is None)
    ids = {j.extract_id for j in graph.scores}
    assert ids == {e.id for e in graph.extracts}
    assert all(Path(j.banks_dir).is_absolute() and Path(j.scores_dir).is_absolute()
               for j in graph.scores)


# --------------------------------------------------------------------------- running


@pytest.mark.slow
def test_in_process_sweep_table_figures_and_rerun_skips(work: Path) -> None:
    cfg = small_config(work)
    result = run_sweep(cfg)
    table = result.table
    assert len(table) == 9  # knn k=1, k=3, padim x (2 shots x 2 seeds + all)
    assert result.statuses["extract"] == {"computed": 1}
    assert result.statuses["score"] == {"computed": 9}
    assert table["error"].isna().all()
    assert set(table["shots"]) == {"2", "all"} and table["n_train"].tolist().count(2) == 6
    assert table.loc[table["shots"] == "all", "n_train"].eq(24).all()
    assert {"param.k", "fit_s", "score_s", "job_s", "image_auroc", "pixel_auroc", "pro",
            "weights", "bank", "seed"} <= set(table.columns)
    assert table[["image_auroc", "pixel_auroc", "pro"]].notna().all().all()
    for name in ("small.csv", "small.md", "small.json", "small_heatmap.png", "small_shots.png"):
        assert (cfg.scores_dir / "sweeps" / name).stat().st_size > 0
    on_disk = pd.read_csv(cfg.scores_dir / "sweeps" / "small.csv", dtype={"shots": str})
    assert on_disk["run"].tolist() == table["run"].tolist()
    board = pd.read_csv(cfg.scores_dir / "leaderboard.csv")
    assert set(table["run"]) == set(board["method"]) and {"shots", "seed"} <= set(board)
    again = run_sweep(cfg)
    assert again.statuses["extract"] == {"skipped": 1}
    assert again.statuses["score"] == {"skipped": 9} == again.statuses["evaluate"]
    pd.testing.assert_frame_equal(again.table[METRICS], table[METRICS])


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_jobs(work: Path) -> None:
    cfg = small_config(work, scores="scores_interrupted")
    finished: list[dict] = []

    def stop_after_three(kind: str, row: dict) -> None:
        if kind == "score":
            finished.append(row)
            if len(finished) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, InProcessExecutor(), on_result=stop_after_three)
    done = {r["job"]: r["run"] for r in finished}
    stamps = {job: (cfg.scores_dir / "efficientnet_lite0" / run / "demo_texture" / f)
              .stat().st_mtime_ns for job, run in done.items()
              for f in ("run.json",)}
    seen: dict[str, dict] = {}
    result = run_sweep(cfg, on_result=lambda kind, row: seen.setdefault(row.get("job", ""), row))
    assert result.statuses["score"] == {"skipped": 3, "computed": 6}
    for job, run in done.items():
        assert seen[job]["score_status"] == "skipped" == seen[job]["eval_status"]
        path = cfg.scores_dir / "efficientnet_lite0" / run / "demo_texture" / "run.json"
        assert path.stat().st_mtime_ns == stamps[job]


@pytest.fixture
def local_ray() -> Iterator[object]:
    """A local Ray (2 CPUs, temporary files in a fresh folder), always shut down."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="pbray-")  # short: Ray's socket paths have a length limit
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp,
                 object_store_memory=128 * 1024 * 1024, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_gives_the_same_table_as_in_process(work: Path, local_ray) -> None:
    import faiss
    import torch

    cfg = small_config(work, scores="scores_inprocess")
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    # two threads in-process and two cores per Ray task: the same float reductions
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    try:
        local = run_sweep(cfg, InProcessExecutor(), figures=False).table
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    on_ray = run_sweep(replace(cfg, scores_dir=work / "scores_ray"),
                       RayExecutor(cpus_per_task=2), figures=False)
    assert local_ray.is_initialized()  # a Ray already running is used, not shut down
    assert on_ray.statuses["score"] == {"computed": 9}
    remote = on_ray.table
    assert remote[KEYS].equals(local[KEYS])
    pd.testing.assert_frame_equal(remote[METRICS], local[METRICS], check_exact=True)
    assert (work / "scores_ray" / "sweeps" / "small.csv").is_file()


def test_missing_ray_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SweepError, match=r"pip install 'patchbank\[sweep\]'"):
        import_ray()


# --------------------------------------------------------------------------- summary


def test_seed_summary_mean_and_std_over_seeds() -> None:
    rows = []
    for shots, seed, a, b in (("1", 0, 0.6, 0.8), ("1", 1, 0.8, 1.0), ("all", 0, 0.9, 0.9)):
        for category, value in (("x", a), ("y", b)):
            rows.append({"backbone": "bb", "bank": "t", "method": "knn", "params": "{}",
                         "shots": shots, "seed": seed, "category": category, "error": None,
                         "image_auroc": value, "pixel_auroc": value, "pro": np.nan})
    summary = seed_summary(pd.DataFrame(rows))
    one = summary[summary["shots"] == "1"].iloc[0]
    # categories first (0.7 and 0.9), then seeds: mean 0.8, sample std 0.1414
    assert one["image_auroc_mean"] == pytest.approx(0.8)
    assert one["image_auroc_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert one["n_seeds"] == 2 and summary["shots"].tolist() == ["1", "all"]
    text = summary_markdown(summary)
    assert "| bb | knn | 1 | 80.0 ± 14.1 | 80.0 ± 14.1 | – | 2 |" in text
    assert "| bb | knn | all | 90.0 | 90.0 | – | 1 |" in text
