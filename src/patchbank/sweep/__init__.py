"""Sweeps: categories x backbones x extract settings x methods x parameter grids x shots x seeds.

>>> cfg = load_config(Path("sweep.yaml"))  # doctest: +SKIP
>>> result = run_sweep(cfg)  # doctest: +SKIP  (in-process; cfg.executor="ray" for Ray)

:mod:`~patchbank.sweep.config` (the typed configuration), :mod:`~patchbank.sweep.graph` (the
jobs and what one job does), :mod:`~patchbank.sweep.executors` (in-process, Ray) and
:mod:`~patchbank.sweep.summary` (the table and figures). Every job goes through the stages,
which skip what is up to date, so a killed or extended sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from patchbank.core.atomic import atomic_write_text
from patchbank.core.errors import PartialFailure
from patchbank.sweep.config import SweepConfig, load_config
from patchbank.sweep.executors import InProcessExecutor, RayExecutor, make_executor
from patchbank.sweep.graph import SweepGraph, build_graph
from patchbank.sweep.summary import sweep_table, write_summary

log = logging.getLogger(__name__)

#: Folder under the scores directory holding every sweep's table, summary and figures.
SWEEPS_DIR = "sweeps"


@dataclass
class SweepResult:
    """What a sweep produced: its table, the files written, job counts, and its wall time."""

    table: pd.DataFrame
    files: dict[str, Path]
    statuses: dict[str, Counter] = field(default_factory=dict)
    wall_s: float = 0.0
    graph: SweepGraph | None = None


def run_sweep(config: SweepConfig, executor: InProcessExecutor | RayExecutor | None = None,
              on_result: Callable[[str, dict[str, Any]], None] | None = None,
              figures: bool = True) -> SweepResult:
    """Expand and run ``config``; write ``<scores_dir>/sweeps/<name>.{csv,md,json}``, its
    figures and the leaderboard. Raises :class:`PartialFailure` (``result``: the
    :class:`SweepResult`) when some jobs failed, after writing everything else."""
    from patchbank.stages.evaluate import leaderboard

    t0 = time.perf_counter()
    graph = build_graph(config)
    executor = executor or make_executor(config.executor, config.ray_address, config.num_cpus)
    log.info("sweep %s: %d extraction + %d score jobs (%d duplicates dropped), executor %s",
             config.name, len(graph.extracts), len(graph.scores), graph.duplicates,
             executor.name)
    statuses: dict[str, Counter] = {"extract": Counter(), "score": Counter(),
                                    "evaluate": Counter()}
    failures: list[tuple[str, BaseException]] = []

    def collect(kind: str, result: dict[str, Any]) -> None:
        if kind == "extract":
            statuses["extract"][result["status"]] += 1
            if result.get("error"):
                failures.append((result["id"], RuntimeError(result["error"])))
        else:
            statuses["score"][result["score_status"]] += 1
            statuses["evaluate"][result["eval_status"]] += 1
            if result.get("error") and result["score_status"] != "not run":
                failures.append((result["job"], RuntimeError(result["error"])))
        if on_result:
            on_result(kind, result)

    rows = executor.run(graph, collect)
    table = sweep_table(rows)
    out_dir = Path(config.scores_dir, SWEEPS_DIR)
    files = write_summary(table, out_dir, config.name, figures=figures)
    wall = time.perf_counter() - t0
    record = {"config": config.to_json(), "executor": executor.name,
              "jobs": {"extract": len(graph.extracts), "score": len(graph.scores),
                       "duplicates_dropped": graph.duplicates,
                       "left_out": graph.inapplicable},
              "statuses": {k: dict(v) for k, v in statuses.items()}, "wall_s": round(wall, 2)}
    files["json"] = atomic_write_text(out_dir / f"{config.name}.json",
                                      json.dumps(record, indent=2) + "\n")
    leaderboard(config.scores_dir)
    log.info("sweep %s: %.1f s; extract %s; score %s; evaluate %s; table %s", config.name,
             wall, dict(statuses["extract"]), dict(statuses["score"]),
             dict(statuses["evaluate"]), files["csv"])
    result = SweepResult(table, files, statuses, wall, graph)
    if failures:
        raise PartialFailure(failures, result=result, total=len(graph))
    return result


__all__ = ["InProcessExecutor", "RayExecutor", "SweepConfig", "SweepResult", "build_graph",
           "load_config", "make_executor", "run_sweep"]
