"""A sweep as a task graph: extraction jobs, then score+evaluate jobs that read their banks.

Expansion: categories x backbones x extract settings -> one :class:`ExtractJob` each; then
x methods x parameter combinations x shots x seeds -> one :class:`ScoreJob` each, depending on
its extraction job. Jobs are plain frozen dataclasses of JSON-able values, so any executor can
ship them (in-process calls, Ray tasks); :func:`run_extract_job` and :func:`run_score_job` run
one job each and return a plain dict. Both go through the stages, which skip whatever is up to
date, so re-running a sweep (after a kill, or with a larger grid) only computes what is missing.

Deduplication. Two score jobs are the same job when the method, its *resolved* parameters
(defaults filled in, so ``{}`` and ``{k: 1}`` for knn are one job), bank, shots and effective
seed agree. With ``shots: all`` the run's seed only picks the hold-out split (every training
image is fitted; scorer randomness such as PaDiM's channel subset has its own ``seed``
parameter, which a grid can vary), so ``shots=all`` runs **once, with the first seed**; the
summary reports it with ``n_seeds = 1``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from patchbank.core.errors import ITEM_ERRORS, PatchbankError, SweepError, WeightsError
from patchbank.sweep.config import ExtractSetting, SweepConfig, params_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractJob:
    """Extract one category's train and test banks with one backbone and setting."""

    id: str
    backbone: str
    setting: ExtractSetting
    category: str
    data_root: str
    banks_dir: str
    device: str = "auto"
    batch_size: int = 16


@dataclass(frozen=True)
class ScoreJob:
    """Score one category with one method, parameters, shots and seed, then evaluate it."""

    id: str
    extract_id: str
    backbone: str
    setting: ExtractSetting
    category: str
    method: str
    params: tuple[tuple[str, str], ...]
    shots: int | None
    seed: int
    holdout: float
    data_root: str
    banks_dir: str
    scores_dir: str
    device: str = "auto"
    eval_size: int | None = None
    figures: bool = False


@dataclass
class SweepGraph:
    """Extraction jobs (each run once) and the score jobs that depend on them."""

    config: SweepConfig
    extracts: list[ExtractJob]
    scores: list[ScoreJob]
    duplicates: int = 0
    #: method x shots combinations left out because the method cannot fit so few images.
    inapplicable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.extracts) + len(self.scores)


def _resolved_params(method: str, params: Mapping[str, str], where: str) -> dict[str, Any]:
    """The method's parameters with defaults filled in; a bad name or value is one line."""
    from patchbank.scorers import make_scorer

    try:
        return dict(make_scorer(method, params, device="cpu").params)
    except (ValueError, TypeError) as err:
        raise SweepError(f"{where}: methods.{method} {dict(params)}: {err}") from None


def build_graph(config: SweepConfig) -> SweepGraph:
    """Expand ``config`` into jobs (paths made absolute: every worker must see them)."""
    from patchbank.data.demo import ensure_demo_dataset
    from patchbank.data.mvtec import resolve_categories
    from patchbank.scorers import SCORERS

    root = Path(config.data_root).resolve() if config.data_root else ensure_demo_dataset()
    root = Path(root).resolve()
    categories = resolve_categories(root, config.categories)
    banks, scores = str(Path(config.banks_dir).resolve()), str(Path(config.scores_dir).resolve())
    extracts: list[ExtractJob] = []
    jobs: list[ScoreJob] = []
    seen: set[str] = set()
    duplicates = 0
    inapplicable: set[str] = set()
    methods = []
    for grid in config.methods:
        for combo in grid.combinations():
            resolved = _resolved_params(grid.method, combo, config.source)
            methods.append((grid.method, combo, resolved))
    for backbone in config.backbones:
        for s_idx, setting in enumerate(config.extract):
            try:
                setting.spec(backbone)
            except PatchbankError as err:
                raise SweepError(f"{config.source}: {backbone}: {err}") from None
            for category in categories:
                ex = ExtractJob(f"extract/{backbone}/x{s_idx}/{category}", backbone, setting,
                                category, str(root), banks, config.device, config.batch_size)
                extracts.append(ex)
                for method, combo, resolved in methods:
                    for shots in config.shots:
                        need = SCORERS[method].min_train
                        if shots is not None and shots < need:
                            inapplicable.add(f"{method} at {shots} shot(s): needs at least "
                                             f"{need} training images")
                            continue
                        for seed in config.seeds:
                            eff_seed = config.seeds[0] if shots is None else seed
                            key = (f"{ex.id}/{method}/{params_json(resolved)}/"
                                   f"{shots}/{eff_seed}")
                            if key in seen:
                                duplicates += 1
                                continue
                            seen.add(key)
                            jobs.append(ScoreJob(
                                f"score/{backbone}/x{s_idx}/{category}/{method}/"
                                f"{params_json(combo)}/shots={shots or 'all'}/seed={eff_seed}",
                                ex.id, backbone, setting, category, method,
                                tuple(sorted(combo.items())), shots, eff_seed, config.holdout,
                                str(root), banks, scores, config.device, config.eval_size,
                                config.figures))
    if duplicates:
        log.info("%d duplicate score jobs dropped (shots=all runs once, with seed %d; equal "
                 "resolved parameters run once)", duplicates, config.seeds[0])
    for reason in sorted(inapplicable):
        log.warning("left out: %s", reason)
    return SweepGraph(config, extracts, jobs, duplicates, sorted(inapplicable))


# --------------------------------------------------------------------------- running one job


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_extract_job(job: ExtractJob) -> dict[str, Any]:
    """Extract (skipping up-to-date banks); ``weights: auto`` falls back to untrained weights
    with a warning when no pretrained ones can be had. Returns ``{id, tag, weights, status,
    seconds, error}``; ``tag`` is None when it failed."""
    from patchbank.stages.extract import ExtractConfig, extract

    t0 = time.perf_counter()
    spec = job.setting.spec(job.backbone)
    out: dict[str, Any] = {"id": job.id, "tag": None, "weights": None, "status": "failed",
                           "error": None}

    def attempt(weights: str) -> str:
        used = replace(spec, weights=weights)
        config = ExtractConfig(used, batch_size=job.batch_size, device=job.device)
        done = extract(Path(job.data_root), [job.category], config, Path(job.banks_dir))
        out.update(tag=used.tag(), weights=weights)
        statuses = set(done.get(job.category, {}).values())
        return "skipped" if statuses == {"skipped"} else "computed"

    try:
        if spec.weights != "auto":
            out["status"] = attempt(spec.weights)
        else:
            try:
                out["status"] = attempt("hub")
            except WeightsError as err:
                log.warning("%s\nNO PRETRAINED WEIGHTS for %s: falling back to an UNTRAINED "
                            "backbone; its numbers are a smoke test only", err, job.backbone)
                out["status"] = attempt("random")
    except ITEM_ERRORS as err:
        log.error("%s: failed: %s", job.id, _one_line(err))
        out.update(tag=None, status="failed", error=_one_line(err))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_score_job(job: ScoreJob, extracted: Mapping[str, Any]) -> dict[str, Any]:
    """Score then evaluate one job on the banks ``extracted`` produced (skipping what is up to
    date); returns one row of the sweep table (settings, statuses, metrics, times)."""
    from patchbank.stages.evaluate import (
        COLUMNS,
        TEXT_COLUMNS,
        evaluate_category,
        read_metrics,
        write_metrics_table,
    )
    from patchbank.stages.score import score_category
    from patchbank.store.runs import RunPaths

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "job": job.id, "backbone": job.backbone, **job.setting.columns(),
        "bank": extracted.get("tag"), "weights_used": extracted.get("weights"),
        "category": job.category, "method": job.method,
        "params": params_json(dict(job.params)),
        **{f"param.{k}": v for k, v in job.params},
        "shots": "all" if job.shots is None else str(job.shots), "seed": job.seed,
        "holdout": job.holdout, "run": None, "score_status": None, "eval_status": None,
        "error": None,
    }
    if extracted.get("tag") is None:
        row.update(score_status="not run", eval_status="not run",
                   error=f"extraction failed: {extracted.get('error')}")
        return row
    scores_dir = Path(job.scores_dir)
    try:
        name, status = score_category(
            Path(job.banks_dir), scores_dir, job.backbone, job.method, job.category,
            dict(job.params), bank=extracted["tag"], holdout=job.holdout, seed=job.seed,
            shots=job.shots, device=job.device)
        row.update(run=name, score_status=status)
        row["eval_status"] = evaluate_category(
            scores_dir, job.backbone, name, job.category, Path(job.data_root), job.eval_size,
            figures=job.figures)
        write_metrics_table(scores_dir, job.backbone, name)
        record = read_metrics(RunPaths.of(scores_dir, job.backbone, name, job.category)
                              .metrics_json)
        metrics = dict(record["metrics"]) if record else {}
        for col in COLUMNS:
            if col not in TEXT_COLUMNS and col not in ("shots", "seed"):
                row[col] = metrics.get(col)
        row["eval_resolution"] = metrics.get("eval_resolution")
    except ITEM_ERRORS as err:
        log.error("%s: failed: %s", job.id, _one_line(err))
        row.update(error=_one_line(err))
        row["score_status"] = row["score_status"] or "failed"
        row["eval_status"] = row["eval_status"] or "failed"
    row["job_s"] = round(time.perf_counter() - t0, 3)
    return row
