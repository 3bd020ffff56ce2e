"""Evaluate stage: score runs + ground-truth masks -> per-category metrics, tables, figures.

Pixel metrics are computed at the original mask resolution by default: each map is placed on
its image by :func:`patchbank.evaluation.geometry.run_map` (bilinear upsampling, smoothing with
the method's sigma scaled to that size); ``eval_size`` evaluates at a reduced resolution
instead, and the output says so.

Files. Each category's result is written once, next to its run:
``<scores_dir>/<backbone>/<method>/<category>/metrics.json`` =
``{"format", "backbone", "method", "category", "key", "metrics", "figures"}`` where ``metrics``
holds every column of :data:`METRIC_COLUMNS` + :data:`EXTRA_COLUMNS` (JSON ``null`` for NaN;
``shots`` null = every training image, ``seed`` the run's seed),
``figures`` the names of the PNGs drawn for it under ``<method>/figures/`` (``null`` when none
were drawn) and ``key`` what the result depends on (:func:`evaluation_key`: a hash of
``run.json``, the sizes and mtimes of the score files and of the masks, ``eval_size``, the
patchbank version). A category whose key still matches is skipped ("up to date, skipped");
``overwrite=True`` recomputes it. ``metrics.csv`` (per backbone/method: one row per category
plus ``mean``) and ``<scores_dir>/leaderboard.{csv,md}`` are views computed from the
``metrics.json`` files when read (:func:`metrics_table`, :func:`leaderboard`) and rewritten
after each evaluation, so evaluations of different categories running at the same time never
lose each other's rows. Every file is written atomically (:mod:`patchbank.core.atomic`).

Confidence intervals (``bootstrap`` replicates, default 1000, 0 = off; level ``ci``, default
0.95; :mod:`patchbank.evaluation.bootstrap`). Each category is resampled within itself
(stratified: good and defective images separately), seeded by :func:`category_seed` so two
runs of one category draw the same indices. ``metrics`` gains ``<metric>_lo``/``<metric>_hi``
(:data:`CI_COLUMNS`, for image_auroc, image_ap, image_f1, pixel_auroc, pro, best_dice, aupimo; null
when off or undefined) and the record a ``bootstrap`` entry ``{"n_boot", "ci", "seed",
"token"}`` (null when off); the key gains ``bootstrap`` ``{"n_boot", "ci", "seed"}``, so a
change of either re-evaluates. Beside it, ``bootstrap.npz`` holds the replicates (one
``(n_boot,)`` float64 array per metric of :data:`CI_METRICS`,
NaN where undefined, plus ``token``, equal to the one in ``metrics.json``, so a replicate file
from another evaluation is never mixed in). The ``mean`` row's interval is the percentile
interval of the per-replicate mean over categories (replicate r of the mean = mean over
categories of their replicate r), over the categories where the metric is defined; it is NaN
when a category has no matching ``bootstrap.npz`` or the categories' settings differ.

AUPIMO (:mod:`patchbank.evaluation.aupimo`, FPR range 1e-5..1e-4 of the good images, at the
evaluation resolution): ``aupimo`` is the mean over defective images of their per-image AUPIMO,
with ``aupimo_lo``/``aupimo_hi`` from the same replicate indices as the other metrics
(replicate = the multiplicity-weighted mean over the resampled defective images, exact) and a
``(n_boot,)`` ``aupimo`` array in ``bootstrap.npz``; NaN with a logged reason for image-level
runs, runs without masks or when undefined (see that module). Per image: ``per_image.csv``
next to ``metrics.json`` (columns :data:`PER_IMAGE_COLUMNS` = ``path, defect_type, label,
aupimo``; one row per test image in ``image_scores.csv`` order, ``aupimo`` empty for good
images and when undefined), for per-image statistical tests.

Per defect type: ``by_defect.csv`` per category (columns
:data:`~patchbank.evaluation.by_defect.BY_DEFECT_COLUMNS`) and, as views rewritten with
``metrics.csv``, ``<backbone>/<method>/metrics_by_defect.csv`` (all categories) and, with the
leaderboard, ``leaderboard_by_defect.{csv,md}`` (``backbone, method`` first) and
``defect_heatmap.png`` (defect type x run: image AUROC, and pixel AUROC where any run has it).
Format 1 files (before intervals) are read as stale and recomputed.

Registered metrics (:func:`patchbank.evaluation.registry.register_metric`): each adds
``<name>, <name>_lo, <name>_hi`` after every built-in column of ``metrics.json``,
``metrics.csv``, the leaderboard and the per-defect tables (:func:`columns`,
:func:`~patchbank.evaluation.by_defect.by_defect_columns`), a replicate array to
``bootstrap.npz``, and its name to the evaluation key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from patchbank import __version__
from patchbank.core.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_text,
    file_lock,
    sweep_stale_temporaries,
)
from patchbank.core.errors import ITEM_ERRORS, PartialFailure, ScoresError
from patchbank.data.mvtec import load_mask
from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation import metrics, registry
from patchbank.evaluation.aupimo import FPR_BOUNDS, aupimo_scores
from patchbank.evaluation.by_defect import by_defect_columns, metrics_by_defect
from patchbank.evaluation.figures import defect_heatmap, write_category_figures
from patchbank.evaluation.geometry import reroot, resize_mask, run_map
from patchbank.evaluation.registry import EXTRA_COLUMNS, METRIC_COLUMNS
from patchbank.evaluation.seeds import seed_summary
from patchbank.store.records import RunInfo
from patchbank.store.runs import RunPaths, ScoreRun, load_run, read_run_info

log = logging.getLogger(__name__)

#: Metrics with a bootstrap interval: bs.CI_METRICS and the mean AUPIMO over defective images.
CI_METRICS = (*bs.CI_METRICS, "aupimo")
#: Bootstrap interval bounds: ``<metric>_lo``, ``<metric>_hi`` per metric of CI_METRICS.
CI_COLUMNS = [f"{m}_{end}" for m in CI_METRICS for end in ("lo", "hi")]
#: The built-in columns; with registered metrics a table has :func:`columns`.
COLUMNS = METRIC_COLUMNS + EXTRA_COLUMNS + CI_COLUMNS
TEXT_COLUMNS = ("category", "eval_resolution")
METRICS_FORMAT = 2
#: The bootstrap's base seed (each category draws with category_seed(BOOTSTRAP_SEED, name)).
BOOTSTRAP_SEED = 0
#: Per category: the bootstrap replicates (for the mean's interval) and per-defect rows.
REPLICATES_NAME = "bootstrap.npz"
BY_DEFECT_NAME = "by_defect.csv"
#: Per category: one row per test image (columns PER_IMAGE_COLUMNS).
PER_IMAGE_NAME = "per_image.csv"
PER_IMAGE_COLUMNS = ["path", "defect_type", "label", "aupimo"]
#: Per backbone/method: every category's per-defect rows (a view, like metrics.csv).
BY_DEFECT_RUN_NAME = "metrics_by_defect.csv"
#: Lock file (in the scores folder) serialising rewrites of the derived tables.
LOCK_NAME = ".evaluate.lock"




def columns() -> list[str]:
    """:data:`COLUMNS`, then ``<name>, <name>_lo, <name>_hi`` per registered metric
    (:func:`patchbank.evaluation.registry.register_metric`)."""
    return COLUMNS + registry.added_columns()


def ci_metrics() -> tuple[str, ...]:
    """:data:`CI_METRICS`, then the registered metrics (all have intervals)."""
    return (*CI_METRICS, *(m.name for m in registry.added_metrics()))


# --------------------------------------------------------------------------- computing


def masks_and_maps(run: ScoreRun, category: str, data_root: Path | None = None,
                   eval_size: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ground-truth masks and smoothed maps at evaluation resolution, one pair per test image."""
    masks, maps = [], []
    for i, row in enumerate(tqdm(run.scores.itertuples(), total=len(run.scores),
                                 desc=f"{category} maps", leave=False)):
        h, w = int(row.height), int(row.width)
        mask = load_mask(reroot(row.mask_path, data_root, category), size=(w, h)) \
            if row.mask_path else None
        heatmap, (ys, xs) = run_map(run, i, h, w, eval_size)
        masks.append(resize_mask(mask[ys, xs], heatmap.shape) if mask is not None
                     else np.zeros(heatmap.shape, dtype=bool))
        maps.append(heatmap)
    return masks, maps


#: The bootstrap seed of one category (:func:`patchbank.evaluation.bootstrap.category_seed`).
category_seed = bs.category_seed


def evaluate_run(run: ScoreRun, category: str, data_root: Path | None = None,
                 eval_size: int | None = None, *, bootstrap: int = 0, ci: float = 0.95,
                 seed: int = BOOTSTRAP_SEED, extras: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    """All metrics of one category's run (NaN for pixel metrics of image-level runs).

    ``bootstrap`` replicates (0: none) give the ``_lo``/``_hi`` columns at level ``ci``. When
    ``extras`` is a dict it receives ``replicates`` ({metric: (bootstrap,) array}) and
    ``by_defect`` (the per-defect-type table, :func:`metrics_by_defect`).
    """
    df = run.scores
    labels, scores = df["label"].to_numpy(int), df["score"].to_numpy(float)
    row: dict[str, Any] = {"category": category, "n_test": len(df)}
    if len(np.unique(labels)) < 2:
        raise ScoresError(f"{category}: test set needs good and defective images for AUROC")
    row.update(registry.image_values(labels, scores, registry.METRICS.values()))
    _, thr, prec, rec = metrics.best_f1(labels, scores)
    row.update(f1_threshold=thr, f1_precision=prec, f1_recall=rec)
    if run.train_scores is not None and len(run.train_scores) >= 2:
        unsup = metrics.unsupervised_threshold(run.train_scores)
        m = metrics.threshold_metrics(labels, scores, unsup)
        row.update(unsup_threshold=unsup, unsup_precision=m["precision"],
                   unsup_recall=m["recall"], unsup_f1=m["f1"])
    pixel = dict.fromkeys(("pixel_auroc", "pixel_ap", "pro", "best_dice"), float("nan"))
    has_masks = bool((df["mask_path"] != "").any())
    masks = maps = stats = None
    per_image = np.full(len(df), np.nan)  # AUPIMO per image (NaN: good image or undefined)
    if run.maps is not None and has_masks:
        masks, maps = masks_and_maps(run, category, data_root, eval_size)
        pixel = metrics.pixel_metrics(masks, maps)
        row["eval_resolution"] = f"{eval_size}px" if eval_size else "original"
        stats = bs.PixelStats(masks, maps) if bootstrap else None
        per_image = _aupimo_values(category, masks, maps)
    else:
        log.info("%s: AUPIMO undefined (NaN): %s", category, "image-level run (no maps)"
                 if run.maps is None else "no ground-truth masks")
    row.update(pixel)
    row["aupimo"] = _finite_mean(per_image)
    cat_seed = category_seed(seed, category)
    idx = bs.stratified_indices(labels, bootstrap, cat_seed) if bootstrap else None
    reps = bs.bootstrap_replicates(labels, scores, stats, bootstrap, cat_seed,
                                   pixel_points=pixel, indices=idx)
    reps["aupimo"] = np.full(bootstrap, np.nan) if idx is None or np.isnan(row["aupimo"]) \
        else bs.mean_replicates(per_image, bs.index_weights(idx, len(df)))
    reps.update(_added_replicates(labels, scores, idx, bootstrap))
    for k, v in reps.items():
        row[f"{k}_lo"], row[f"{k}_hi"] = bs.percentile_interval(v, ci)
    if extras is not None:
        extras["replicates"] = reps
        extras["by_defect"] = metrics_by_defect(
            category, labels, scores, df["defect_type"].astype(str).tolist(), masks, maps,
            pixel_stats=stats, n_boot=bootstrap, ci=ci, seed=cat_seed, aupimo=per_image)
        extras["per_image"] = pd.DataFrame({
            "path": df["path"].astype(str), "defect_type": df["defect_type"].astype(str),
            "label": labels, "aupimo": per_image}, columns=PER_IMAGE_COLUMNS)
    row.update(metrics.composite_scores(row["image_auroc"], row["image_ap"],
                                        row["pixel_auroc"], row["best_dice"]))
    info = run.record
    row.update(fit_s=info.fit_s, score_s=info.score_s)
    # few-shot protocol: shots NaN = every training image; n_train = images the model saw
    row.update(shots=info.shots, seed=info.seed, n_train=info.n_train)
    return row


def _added_replicates(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray | None,
                      n_boot: int) -> dict[str, np.ndarray]:
    """Replicates of the registered metrics (NaN when off or, as for the built-in ones, when
    the image scores make intervals undefined)."""
    added = registry.added_metrics()
    if idx is None or bs.image_problem(labels, scores) is not None:
        return {m.name: np.full(n_boot, np.nan) for m in added}
    return registry.image_replicates(labels, scores, idx, added)


def _aupimo_values(category: str, masks: Sequence[np.ndarray],
                   maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image AUPIMO (:func:`aupimo_scores`); all NaN, with the reason logged, when the
    maps hold NaN/inf (the other metrics report that case themselves)."""
    try:
        return aupimo_scores(masks, maps)
    except ScoresError as err:
        log.warning("%s: AUPIMO undefined (NaN): %s", category, err)
        return np.full(len(maps), np.nan)


def _finite_mean(values: np.ndarray) -> float:
    ok = values[np.isfinite(values)]
    return float(ok.mean()) if ok.size else float("nan")


# --------------------------------------------------------------------------- metrics.json


def _stat(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def evaluation_key(paths: RunPaths, category: str, data_root: Path | None = None,
                   eval_size: int | None = None, bootstrap: int = 0, ci: float = 0.95,
                   ) -> dict[str, Any] | None:
    """What one category's metrics depend on, as JSON values; None when the run is unreadable.

    ``run``: sha256 of ``run.json``; ``files``: size and mtime of the score files; ``masks``:
    sha256 over the (re-rooted) mask paths with their sizes and mtimes; ``eval_size``;
    ``bootstrap``: ``{"n_boot", "ci", "seed"}`` (null when off); ``aupimo``: its FPR range
    (results from before AUPIMO existed are recomputed); ``patchbank_version``; ``metrics``:
    the names of the registered metrics, only when there are any (registering or removing one
    re-evaluates).
    """
    try:
        run_hash = hashlib.sha256(paths.run_json.read_bytes()).hexdigest()
        mask_paths = pd.read_csv(paths.image_scores, usecols=["mask_path"],
                                 keep_default_na=False, dtype=str)["mask_path"]
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256()
    for stored in mask_paths:
        if stored:
            path = reroot(stored, data_root, category)
            digest.update(f"{path}\t{_stat(path)}\n".encode())
    key = {
        "format": METRICS_FORMAT,
        "run": run_hash,
        "files": {p.name: _stat(p) for p in (paths.image_scores, paths.maps, paths.train_scores)},
        "masks": digest.hexdigest(),
        "eval_size": int(eval_size) if eval_size else None,
        "bootstrap": {"n_boot": int(bootstrap), "ci": float(ci), "seed": BOOTSTRAP_SEED}
        if bootstrap else None,
        "aupimo": list(FPR_BOUNDS),
        "patchbank_version": __version__,
    }
    added = [m.name for m in registry.added_metrics()]
    return {**key, "metrics": added} if added else key


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_metrics(paths: RunPaths, backbone: str, method: str, category: str,
                  key: Mapping[str, Any] | None, row: Mapping[str, Any],
                  figures: Sequence[str] | None,
                  bootstrap: Mapping[str, Any] | None = None) -> None:
    """Write one category's ``metrics.json`` (atomically); ``bootstrap``: the record's
    ``{"n_boot", "ci", "seed", "token"}`` naming its ``bootstrap.npz`` (None: none)."""
    record = {
        "format": METRICS_FORMAT, "backbone": backbone, "method": method, "category": category,
        "key": key, "metrics": {c: _to_json(row.get(c)) for c in columns()},
        "figures": None if figures is None else list(figures),
        "bootstrap": None if bootstrap is None else dict(bootstrap),
    }
    atomic_write_text(paths.metrics_json, json.dumps(record, indent=2, allow_nan=False) + "\n")


def read_metrics(path: Path) -> dict[str, Any] | None:
    """A well-formed ``metrics.json`` (``metrics`` values: NaN for null), else None."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); the category will be re-evaluated", path, err)
        return None
    if isinstance(record, dict) and isinstance(record.get("format"), int) and \
            record["format"] < METRICS_FORMAT:
        log.warning("%s: written by an older patchbank (format %d, now %d); the category will "
                    "be re-evaluated", path, record["format"], METRICS_FORMAT)
        return None
    ok = isinstance(record, dict) and record.get("format") == METRICS_FORMAT and \
        isinstance(record.get("metrics"), dict) and \
        record["metrics"].get("category") == Path(path).parent.name
    if not ok:
        log.warning("%s: not a metrics file of this patchbank; the category will be "
                    "re-evaluated", path)
        return None
    record["metrics"] = {c: (float("nan") if record["metrics"].get(c) is None
                             else record["metrics"][c]) for c in columns()}
    return record


def _figures_present(record: Mapping[str, Any], fig_dir: Path) -> bool:
    names = record.get("figures")
    return isinstance(names, list) and all((fig_dir / n).is_file() for n in names)


# --------------------------------------------------------------------------- stage


def evaluate_category(scores_dir: Path, backbone: str, method: str, category: str,
                      data_root: Path | None = None, eval_size: int | None = None,
                      figures: bool = True, overwrite: bool = False, *,
                      bootstrap: int = 1000, ci: float = 0.95) -> str:
    """Evaluate one category's run into its ``metrics.json``; returns what happened.

    ``"skipped"`` when its key still matches (figures are drawn if asked for and missing),
    else ``"computed"``, ``"recomputed"`` (stale) or ``"overwritten"`` (``overwrite``).
    Figures are redrawn whenever the metrics are recomputed. ``bootstrap`` replicates (0: no
    intervals, else >= 100) at level ``ci``; both are part of the evaluation key.
    """
    bootstrap, ci = bs.check_n_boot(bootstrap), bs.check_ci(ci)
    paths = RunPaths.of(scores_dir, backbone, method, category)
    if not paths.folder.is_dir():
        load_run(paths)  # the one-line "no complete score run; run ..." error
    # One writer per run folder (shared with the score stage): a second evaluation waits for
    # the first, then finds its metrics up to date.
    with file_lock(paths.lock, on_wait=lambda: log.info(
            "%s: another score or evaluate run is writing it; waiting", paths.folder)):
        return _evaluate_category(paths, scores_dir, backbone, method, category, data_root,
                                  eval_size, figures, overwrite, bootstrap, ci)


def _evaluate_category(paths: RunPaths, scores_dir: Path, backbone: str, method: str,
                       category: str, data_root: Path | None, eval_size: int | None,
                       figures: bool, overwrite: bool, bootstrap: int, ci: float) -> str:
    fig_dir = Path(scores_dir, backbone, method, "figures")
    name = f"{backbone}/{method}/{category}"
    key = evaluation_key(paths, category, data_root, eval_size, bootstrap, ci)
    stored = read_metrics(paths.metrics_json)
    if stored is not None and key is not None and stored.get("key") == key and not overwrite:
        log.info("%s: up to date, skipped", name)
        if figures and not _figures_present(stored, fig_dir):
            drawn = _draw(load_run(paths), category, fig_dir, data_root, stored)
            write_metrics(paths, backbone, method, category, key, stored["metrics"], drawn,
                          stored.get("bootstrap"))
        return "skipped"
    status = "computed" if stored is None else "overwritten" if overwrite and \
        stored.get("key") == key else "recomputed"
    if status == "recomputed":
        log.info("%s: run, masks or settings changed since the last evaluation, recomputing",
                 name)
    run = load_run(paths)
    extras: dict[str, Any] = {}
    row = evaluate_run(run, category, data_root, eval_size, bootstrap=bootstrap, ci=ci,
                       extras=extras)
    log.info("%s: image AUROC %.4f [%.4f, %.4f], pixel AUROC %.4f, PRO %.4f", name,
             row["image_auroc"], row["image_auroc_lo"], row["image_auroc_hi"],
             row["pixel_auroc"], row["pro"])
    drawn = _draw(run, category, fig_dir, data_root, stored) if figures else None
    boot = _write_extras(paths, extras, bootstrap, ci)
    write_metrics(paths, backbone, method, category, key, row, drawn, boot)
    return status


def _write_extras(paths: RunPaths, extras: Mapping[str, Any], bootstrap: int,
                  ci: float) -> dict[str, Any] | None:
    """Write a category's ``per_image.csv``, ``by_defect.csv`` and (bootstrap on)
    ``bootstrap.npz`` before its ``metrics.json``; returns the latter's record (None: off)."""
    if extras.get("per_image") is not None:
        with atomic_path(paths.folder / PER_IMAGE_NAME) as tmp:
            extras["per_image"].to_csv(tmp, index=False, float_format="%.6g")
    by_defect = paths.folder / BY_DEFECT_NAME
    if extras.get("by_defect") is not None:
        with atomic_path(by_defect) as tmp:
            extras["by_defect"].to_csv(tmp, index=False, float_format="%.6g")
    npz = paths.folder / REPLICATES_NAME
    if not bootstrap or "replicates" not in extras:
        npz.unlink(missing_ok=True)
        return None
    token = uuid.uuid4().hex
    with atomic_open(npz) as f:
        np.savez(f, token=np.array(token), **{k: np.asarray(v, np.float64)
                                               for k, v in extras["replicates"].items()})
    return {"n_boot": bootstrap, "ci": ci, "seed": BOOTSTRAP_SEED, "token": token}


def _draw(run: ScoreRun, category: str, fig_dir: Path, data_root: Path | None,
          stored: Mapping[str, Any] | None) -> list[str]:
    """Draw a category's figures; remove the ones it had before that were not redrawn."""
    names = [p.name for p in write_category_figures(run, category, fig_dir,
                                                    data_root=data_root)]
    old = (stored or {}).get("figures") or []
    for gone in set(old) - set(names):
        if isinstance(gone, str) and Path(gone).name == gone:
            (fig_dir / gone).unlink(missing_ok=True)
    return names


def evaluate(scores_dir: Path, backbone: str, method: str, categories: Sequence[str],
             data_root: Path | None = None, eval_size: int | None = None,
             figures: bool = True, overwrite: bool = False, *,
             fail_fast: bool = True, bootstrap: int = 1000, ci: float = 0.95) -> pd.DataFrame:
    """Evaluate one (backbone, method) over categories (each skipped when up to date); writes
    their ``metrics.json``, figures and ``metrics.csv``; returns the table of every category
    evaluated so far for this backbone and method (:func:`metrics_table`).

    ``fail_fast=False`` goes on past a category that fails (a user-facing error, a disk
    error, memory), writes the table of the others, then raises :class:`PartialFailure` with
    every failure and the table as its ``result``. ``bootstrap``/``ci``: the confidence
    intervals (:func:`evaluate_category`).
    """
    bootstrap, ci = bs.check_n_boot(bootstrap), bs.check_ci(ci)
    for folder in (Path(scores_dir), Path(scores_dir, backbone, method),
                   Path(scores_dir, backbone, method, "figures"),
                   *(Path(scores_dir, backbone, method, c) for c in categories)):
        sweep_stale_temporaries(folder)  # left by killed evaluations
    failures: list[tuple[str, BaseException]] = []
    for category in categories:
        try:
            evaluate_category(scores_dir, backbone, method, category, data_root, eval_size,
                              figures, overwrite, bootstrap=bootstrap, ci=ci)
        except ITEM_ERRORS as err:
            if fail_fast:
                raise
            if len(categories) > 1:
                log.error("%s/%s/%s: failed, going on with the other categories", backbone,
                          method, category)
            failures.append((f"{backbone}/{method}/{category}", err))
    table = write_metrics_table(scores_dir, backbone, method)
    if failures:
        raise PartialFailure(failures, result=table, total=len(categories))
    return table


# --------------------------------------------------------------------------- derived tables


def metrics_table(scores_dir: Path, backbone: str, method: str) -> pd.DataFrame:
    """One row per category with a ``metrics.json``, sorted by category, then their ``mean``
    (columns :func:`columns`); an empty table when nothing was evaluated."""
    records = _records(scores_dir, backbone, method)
    cols = columns()
    table = pd.DataFrame([r["metrics"] for _, r in records], columns=cols)
    if table.empty:
        return table
    numeric = [c for c in cols if c not in TEXT_COLUMNS]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce").astype(float)
    mean = table.drop(columns=list(TEXT_COLUMNS)).mean(numeric_only=True).to_dict()
    mean.update(_mean_intervals(records))
    mean.update(category="mean", eval_resolution=table["eval_resolution"].iloc[0])
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)[cols]


def _records(scores_dir: Path, backbone: str, method: str) -> list[tuple[Path, dict]]:
    """(category folder, well-formed metrics.json record) per evaluated category, by name."""
    out = []
    for path in sorted(Path(scores_dir, backbone, method).glob("*/metrics.json"),
                       key=lambda p: p.parent.name):
        record = read_metrics(path)
        if record is not None:
            out.append((path.parent, record))
    return out


def _mean_intervals(records: Sequence[tuple[Path, Mapping[str, Any]]]) -> dict[str, float]:
    """The mean row's intervals: replicate r of the mean = the mean over categories of each
    category's replicate r (each category resampled within itself), from ``bootstrap.npz``.
    A metric averages the categories where it is defined, as the mean row's point values."""
    names = ci_metrics()
    out = {f"{k}_{end}": float("nan") for k in names for end in ("lo", "hi")}
    boots = [r.get("bootstrap") for _, r in records]
    if not boots or not all(isinstance(b, dict) for b in boots):
        return out
    settings = {(b.get("n_boot"), b.get("ci")) for b in boots}
    if len(settings) != 1:
        log.warning("%s: categories evaluated with different bootstrap settings %s; no "
                    "interval for the mean", records[0][0].parent, sorted(settings))
        return out
    reps = []
    for (folder, _), b in zip(records, boots, strict=True):
        try:
            with np.load(folder / REPLICATES_NAME, allow_pickle=False) as npz:
                if str(npz["token"]) != b.get("token"):
                    raise ValueError("token differs from metrics.json")
                reps.append({k: npz[k] for k in names})
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: %s unreadable (%s); no interval for the mean; re-evaluate with "
                        "--overwrite", folder, REPLICATES_NAME, err)
            return out
    ci = float(next(iter(settings))[1])
    for k in names:
        vecs = [r[k] for r, (_, rec) in zip(reps, records, strict=True)
                if np.isfinite(float(rec["metrics"][k])) and np.isfinite(r[k]).any()]
        if vecs:
            out[f"{k}_lo"], out[f"{k}_hi"] = bs.percentile_interval(np.mean(vecs, axis=0), ci)
    return out


def by_defect_table(scores_dir: Path, backbone: str, method: str) -> pd.DataFrame:
    """Every evaluated category's per-defect-type rows (columns :func:`by_defect_columns`)."""
    parts = []
    for folder, _ in _records(scores_dir, backbone, method):
        try:
            parts.append(pd.read_csv(folder / BY_DEFECT_NAME, keep_default_na=False,
                                     na_values=[""], dtype={"defect_type": str}))
        except (OSError, ValueError):
            continue  # evaluated before per-defect metrics existed
    cols = by_defect_columns()
    parts = [p for p in parts if list(p.columns) == cols and not p.empty]
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)


def write_metrics_table(scores_dir: Path, backbone: str, method: str) -> pd.DataFrame:
    """:func:`metrics_table`, also written to ``<backbone>/<method>/metrics.csv``."""
    out = Path(scores_dir, backbone, method, "metrics.csv")
    with file_lock(Path(scores_dir, LOCK_NAME)):
        table = metrics_table(scores_dir, backbone, method)
        if not table.empty:
            with atomic_path(out) as tmp:
                table.to_csv(tmp, index=False, float_format="%.6g")
            log.info("wrote %s (%d categories)", out, len(table) - 1)
        by_defect = by_defect_table(scores_dir, backbone, method)
        if not by_defect.empty:
            with atomic_path(out.with_name(BY_DEFECT_RUN_NAME)) as tmp:
                by_defect.to_csv(tmp, index=False, float_format="%.6g")
    return table


def leaderboard_table(scores_dir: Path) -> pd.DataFrame:
    """Every evaluated backbone x method: mean metrics and times, best first."""
    rows = []
    methods = sorted({p.parent.parent for p in Path(scores_dir).glob("*/*/*/metrics.json")})
    for folder in methods:
        backbone, method = folder.parent.name, folder.name
        table = metrics_table(scores_dir, backbone, method)
        if table.empty:
            continue
        row = table.iloc[-1].to_dict()
        row.pop("category")
        cats = table["category"].iloc[:-1].astype(str)
        rows.append({"backbone": backbone, "method": method, "n_categories": len(cats),
                     "categories": ",".join(cats), **row})
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board["_rank"] = board["overall_score"].fillna(board["image_score"] / 2)
    board = board.sort_values(["_rank", "image_auroc"], ascending=False).drop(columns="_rank")
    return board.reset_index(drop=True)


def leaderboard_by_defect(scores_dir: Path) -> pd.DataFrame:
    """Every evaluated backbone x method's per-defect rows, with ``backbone, method`` first."""
    parts = []
    for folder in sorted({p.parent.parent for p in Path(scores_dir).glob("*/*/*/metrics.json")}):
        table = by_defect_table(scores_dir, folder.parent.name, folder.name)
        if not table.empty:
            parts.append(table.assign(backbone=folder.parent.name, method=folder.name))
    if not parts:
        return pd.DataFrame(columns=["backbone", "method", *by_defect_columns()])
    return pd.concat(parts, ignore_index=True)[["backbone", "method", *by_defect_columns()]]


def leaderboard(scores_dir: Path) -> pd.DataFrame:
    """:func:`leaderboard_table`, also written to ``leaderboard.csv`` and ``leaderboard.md``;
    the per-defect view to ``leaderboard_by_defect.{csv,md}`` and ``defect_heatmap.png``; runs
    that differ only in the seed to ``leaderboard_seeds.{csv,md}`` (:func:`leaderboard_seeds_table`;
    removed when there are none)."""
    with file_lock(Path(scores_dir, LOCK_NAME)):
        board = leaderboard_table(scores_dir)
        if not board.empty:
            with atomic_path(Path(scores_dir, "leaderboard.csv")) as tmp:
                board.to_csv(tmp, index=False, float_format="%.6g")
            atomic_write_text(Path(scores_dir, "leaderboard.md"), leaderboard_markdown(board))
        by_defect = leaderboard_by_defect(scores_dir)
        if not by_defect.empty:
            with atomic_path(Path(scores_dir, "leaderboard_by_defect.csv")) as tmp:
                by_defect.to_csv(tmp, index=False, float_format="%.6g")
            cols = ["backbone", "method", "category", "defect_type", "n_images",
                    "image_auroc", "image_ap", "pixel_auroc", "pro", "best_dice", "aupimo",
                    *(m.name for m in registry.added_metrics())]
            atomic_write_text(Path(scores_dir, "leaderboard_by_defect.md"),
                              leaderboard_markdown(by_defect, cols))
            defect_heatmap(by_defect, Path(scores_dir, "defect_heatmap.png"))
        seeds = leaderboard_seeds_table(scores_dir, board)
        for name in ("leaderboard_seeds.csv", "leaderboard_seeds.md"):
            Path(scores_dir, name).unlink(missing_ok=True)
        if not seeds.empty:
            with atomic_path(Path(scores_dir, "leaderboard_seeds.csv")) as tmp:
                seeds.to_csv(tmp, index=False, float_format="%.6g")
            atomic_write_text(Path(scores_dir, "leaderboard_seeds.md"), seeds_markdown(seeds))
    return board


#: Metrics of the seed view and the keys that make runs "the same but for the seed".
SEED_METRICS = ("image_auroc", "pixel_auroc", "pro", "aupimo")
SEED_KEYS = ["backbone", "method", "params", "shots", "bank", "holdout", "categories"]


def _run_setting(scores_dir: Path, backbone: str, run: str, category: str,
                 ) -> dict[str, Any] | None:
    """A run's setting without its seed, and the seed (run.json ``seed``, or the scorer
    parameter ``seed`` when given: ``(run seed, param seed)``); None when unreadable."""
    info = read_run_info(RunPaths.of(scores_dir, backbone, run, category))
    if info is None or RunInfo.problems(info):
        return None
    rec = RunInfo.from_json(info, run)
    params = {k: v for k, v in rec.params.items() if k != "seed"}
    return {"method": rec.method, "params": json.dumps(params, sort_keys=True, default=str),
            "shots": float("nan") if rec.shots is None else rec.shots, "bank": rec.bank or "",
            "holdout": float(rec.holdout), "seed": f"{rec.fit_seed}/{rec.params.get('seed', '')}"}


def leaderboard_seeds_table(scores_dir: Path, board: pd.DataFrame | None = None,
                            ci: float = 0.95) -> pd.DataFrame:
    """Runs that differ only in their seed (same backbone, method, params but ``seed``, shots,
    bank, hold-out and categories; see :data:`SEED_KEYS`), groups of >= 2 seeds: columns
    ``SEED_KEYS, n_seeds, seeds, runs``, then per metric of :data:`SEED_METRICS`
    ``<m>_mean, <m>_std, <m>_t_lo, <m>_t_hi, <m>_n`` (:func:`seed_summary` over the runs'
    mean-over-categories values, Student-t ``ci`` interval) and ``<m>_boot_width`` (the mean
    over those runs of their own bootstrap interval width ``<m>_hi - <m>_lo``)."""
    board = leaderboard_table(scores_dir) if board is None else board
    rows = []
    for r in ([] if board.empty else board.to_dict("records")):
        first = str(r["categories"]).split(",")[0]
        setting = _run_setting(scores_dir, r["backbone"], r["method"], first)
        if setting is None:
            continue
        row = {**setting, "backbone": r["backbone"], "method": setting["method"],
               "run": r["method"], "categories": r["categories"]}
        for m in SEED_METRICS:
            row[m] = float(r.get(m, np.nan))
            row[f"{m}_boot_width"] = float(r.get(f"{m}_hi", np.nan)) - \
                float(r.get(f"{m}_lo", np.nan))
        rows.append(row)
    widths = [f"{m}_boot_width" for m in SEED_METRICS]
    cols = [*SEED_KEYS, "n_seeds", "seeds", "runs",
            *(f"{m}_{x}" for m in SEED_METRICS for x in ("mean", "std", "t_lo", "t_hi", "n")),
            *widths]
    if not rows:
        return pd.DataFrame(columns=cols)
    runs = pd.DataFrame(rows)
    runs["shots"] = runs["shots"].fillna(-1)  # groupby keeps NaN apart; -1 = every image
    summary = seed_summary(runs, [*SEED_METRICS, *widths], SEED_KEYS, ci)
    grouped = runs.groupby(SEED_KEYS, sort=True)
    summary["seeds"] = [",".join(sorted(g["seed"])) for _, g in grouped]
    summary["runs"] = [",".join(sorted(g["run"])) for _, g in grouped]
    summary["n_seeds"] = [g["seed"].nunique() for _, g in grouped]
    for w in widths:
        summary[w] = summary[f"{w}_mean"]
    summary["shots"] = summary["shots"].replace(-1, np.nan)
    summary = summary[summary["n_seeds"] >= 2]
    return summary[cols].reset_index(drop=True)


def seeds_markdown(table: pd.DataFrame) -> str:
    """The seed view in percent: ``mean ± std [t_lo, t_hi]`` and the mean bootstrap width."""
    heads = ["backbone", "method", "params", "n_seeds",
             *(h for m in SEED_METRICS for h in (f"{m} (seeds)", f"{m} boot width"))]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, r in table.iterrows():
        cells = [str(r["backbone"]), str(r["method"]), str(r["params"]), str(r["n_seeds"])]
        for m in SEED_METRICS:
            if pd.isna(r[f"{m}_mean"]):
                cells += ["–", "–"]
                continue
            cells.append(f"{100 * r[f'{m}_mean']:.1f} ± {100 * r[f'{m}_std']:.1f} "
                         f"[{100 * r[f'{m}_t_lo']:.1f}, {100 * r[f'{m}_t_hi']:.1f}]")
            w = r[f"{m}_boot_width"]
            cells.append("–" if pd.isna(w) else f"{100 * w:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(r: Mapping[str, Any], c: str) -> str:
    """A metric in percent, with its interval as ``98.5 [97.1, 99.4]`` when it has one (an
    interval that rounds to the point value itself is left out)."""
    v = r.get(c)
    if not isinstance(v, float | np.floating):
        return str(v)
    if np.isnan(v):
        return "–"
    point = f"{100 * v:.1f}"
    lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return point
    lo_s, hi_s = f"{100 * float(lo):.1f}", f"{100 * float(hi):.1f}"
    return point if lo_s == hi_s == point else f"{point} [{lo_s}, {hi_s}]"


def leaderboard_markdown(board: pd.DataFrame, cols: Sequence[str] | None = None) -> str:
    """A Markdown table of the leaderboard's main columns, then the registered metrics (in
    percent, intervals in brackets; a metric where lower is better is headed ``name ↓``)."""
    cols = list(cols or ["backbone", "method", "categories", "image_auroc", "image_ap",
                         "image_f1", "pixel_auroc", "pro", "best_dice", "aupimo", "overall_score",
                         "fit_s", "score_s", *(m.name for m in registry.added_metrics())])
    lower = {m.name for m in registry.added_metrics() if not m.higher_is_better}
    heads = [f"{c} ↓" if c in lower else c for c in cols]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for _, r in board.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            if c in ("fit_s", "score_s"):
                cells.append("" if pd.isna(v) else f"{float(v):.1f}")
            elif c == "n_images":
                cells.append(str(int(v)))
            else:
                cells.append(_cell(r, c))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
