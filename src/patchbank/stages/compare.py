"""Compare stage: two or more score runs on the same test images -> paired differences.

For every category, every pair of runs ``(a, b)`` (in the order given: with runs A, B, C the
pairs A-B, A-C, B-C) and every metric of :data:`METRICS`: both values, ``diff = a - b``, its
paired stratified bootstrap percentile interval (the same resampled images for both runs,
seeded per category by :func:`patchbank.evaluation.bootstrap.category_seed`, as the evaluate
stage, so with the same seed both draw the same resamples) and a p-value: DeLong's test for
``image_auroc``, the two-sided bootstrap p-value otherwise
(:mod:`patchbank.evaluation.compare`). Then a ``mean`` row per pair and metric: the mean
over categories with the interval of the mean of the categories' replicates
and the Wilcoxon signed-rank p over the categories' differences. With more than two runs every
p is Holm-adjusted over the pairs (per category and metric, and for the mean rows).

Files, in ``out`` (default ``<scores_dir>/<backbone>/compare/``), written atomically:
``compare.csv`` (columns :data:`COLUMNS`; metrics as fractions), ``compare.md`` (the same in
percent, with notes) and ``compare_forest.png`` (differences with intervals, one panel per
metric).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from patchbank.core.atomic import atomic_open, atomic_path, atomic_write_text
from patchbank.core.errors import ScoresError
from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation import compare as stats
from patchbank.evaluation import metrics
from patchbank.stages.evaluate import masks_and_maps
from patchbank.store.catalog import resolve_run_name
from patchbank.store.runs import RunPaths, ScoreRun, load_run

log = logging.getLogger(__name__)

COLUMNS = ["category", "metric", "run_a", "run_b", "a", "b", "diff", "lo", "hi", "p"]
METRICS = stats.IMAGE_METRICS + stats.PIXEL_METRICS
#: Folder names under ``<scores_dir>/<backbone>`` that are never runs.


# --------------------------------------------------------------------------- runs


def _categories(scores_dir: Path, backbone: str, runs: Sequence[str],
                categories: Sequence[str] | str) -> list[str]:
    if isinstance(categories, str):
        if categories != "all":
            return [c.strip() for c in categories.split(",") if c.strip()]
        sets = [{p.parent.name for p in Path(scores_dir, backbone, r).glob("*/run.json")}
                for r in runs]
        common = sorted(set.intersection(*sets))
        if not common:
            raise ScoresError(f"{Path(scores_dir, backbone)}: runs {', '.join(runs)} have no "
                              "scored category in common; score them on the same categories")
        return common
    return list(dict.fromkeys(categories))


def _aligned(category: str, names: Sequence[str], loaded: Sequence[ScoreRun],
             ) -> list[np.ndarray]:
    """Per run, the row order that puts its test images in the first run's order; refuses
    (one line) when the runs scored different test images or disagree on their labels."""
    first = loaded[0].scores
    ref = first["path"].astype(str).tolist()
    if len(set(ref)) != len(ref):
        raise ScoresError(f"{category}: run {names[0]} lists a test image twice; re-score it")
    orders = []
    for name, run in zip(names, loaded, strict=True):
        paths = run.scores["path"].astype(str).tolist()
        if set(paths) != set(ref) or len(paths) != len(ref):
            only = [(names[0], sorted(set(ref) - set(paths))), (name, sorted(set(paths) -
                                                                           set(ref)))]
            what = "; ".join(f"{len(o)} only in {n}, e.g. {o[0]}" for n, o in only if o) or \
                f"{len(paths)} rows for {len(ref)} images"
            raise ScoresError(f"{category}: runs {names[0]} and {name} scored different test "
                              f"images ({what}); score both on the same test set")
        pos = {p: i for i, p in enumerate(paths)}
        order = np.array([pos[p] for p in ref], dtype=np.int64)
        labels = run.scores["label"].to_numpy(int)[order]
        if not np.array_equal(labels != 0, first["label"].to_numpy(int) != 0):
            raise ScoresError(f"{category}: runs {names[0]} and {name} label the same test "
                              "images differently; re-score both from the same dataset")
        orders.append(order)
    return orders


# --------------------------------------------------------------------------- per run


@dataclass
class _RunStats:
    scores: np.ndarray  # image scores in the common order
    point: dict[str, float]  # exact metrics of the observed sample
    reps: dict[str, np.ndarray]  # bootstrap replicates (empty arrays when off)


def _pixel_replicates(masks: list[np.ndarray], maps: list[np.ndarray], point: dict[str, float],
                      weights: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel metrics of every replicate: ``bootstrap.PixelStats`` (binned, shifted by its
    error on the observed sample) when available, else exact recomputation (slow)."""
    try:
        from patchbank.evaluation.bootstrap import PixelStats
    except ImportError:
        log.warning("pixel replicates recomputed exactly (slow): patchbank.evaluation."
                    "bootstrap.PixelStats is not available")

        def exact(w: np.ndarray) -> dict[str, float]:
            k = np.asarray(w, dtype=int)
            rep_masks = [m for m, c in zip(masks, k, strict=True) for _ in range(c)]
            rep_maps = [a for a, c in zip(maps, k, strict=True) for _ in range(c)]
            return metrics.pixel_metrics(rep_masks, rep_maps, progress=False)

        return stats.replicates(exact, weights)
    pixel = PixelStats(masks, maps)
    observed = pixel.metrics(np.ones(len(maps)))
    reps = pixel.replicates(weights) if hasattr(pixel, "replicates") else \
        stats.replicates(pixel.metrics, weights)
    return {k: np.asarray(v) + (point[k] - observed[k]) for k, v in reps.items()
            if k in point}


def _run_stats(run: ScoreRun, order: np.ndarray, category: str, data_root: Path | None,
               weights: np.ndarray, pixel: bool) -> _RunStats:
    df = run.scores.iloc[order].reset_index(drop=True)
    labels, scores = df["label"].to_numpy(int), df["score"].to_numpy(float)
    image = stats.ImageStats(labels, scores)  # validates: both classes, finite scores
    f1 = metrics.best_f1(labels, scores)[0]
    point = {"image_auroc": metrics.image_auroc(labels, scores),
             "image_ap": metrics.image_ap(labels, scores), "image_f1": f1}
    reps = image.replicates(weights) if len(weights) else {}
    if pixel and run.maps is not None and (df["mask_path"] != "").any():
        masks, maps = masks_and_maps(run, category, data_root)
        masks, maps = [masks[i] for i in order], [maps[i] for i in order]
        if not all(np.isfinite(a).all() for a in maps):
            raise ScoresError(f"{category}: anomaly maps contain NaN or inf; fix the scorer "
                              "output and re-score")
        values = metrics.pixel_metrics(masks, maps, progress=False)
        point.update({k: values[k] for k in stats.PIXEL_METRICS})
        if len(weights):
            reps.update(_pixel_replicates(masks, maps, point, weights))
    return _RunStats(scores, point, reps)


# --------------------------------------------------------------------------- stage


def _compare_category(scores_dir: Path, backbone: str, names: Sequence[str], category: str,
                      data_root: Path | None, n_boot: int, seed: int, ci: float,
                      pixel: bool) -> dict[tuple[int, int, str], stats.Paired]:
    loaded = [load_run(RunPaths.of(scores_dir, backbone, n, category)) for n in names]
    orders = _aligned(category, names, loaded)
    labels = loaded[0].scores["label"].to_numpy(int)
    if (labels != 0).all() or (labels == 0).all():
        raise ScoresError(f"{category}: the test images are all of one class; a comparison "
                          "needs good and defective images")
    idx = stats.stratified_indices(labels, n_boot, bs.category_seed(seed, category))
    weights = stats.index_weights(idx, len(labels))
    runs = [_run_stats(r, o, category, data_root, weights, pixel)
            for r, o in zip(loaded, orders, strict=True)]
    out: dict[tuple[int, int, str], stats.Paired] = {}
    for i, j in itertools.combinations(range(len(names)), 2):
        ra, rb = runs[i], runs[j]
        for metric in METRICS:
            if metric not in ra.point and metric not in rb.point:
                continue
            a, b = ra.point.get(metric, math.nan), rb.point.get(metric, math.nan)
            pair = stats.paired_difference(a, b, ra.reps.get(metric), rb.reps.get(metric), ci)
            if metric == "image_auroc":
                test = stats.delong(labels != 0, ra.scores, rb.scores)
                pair.p = test.p
            out[(i, j, metric)] = pair
    log.info("%s/%s: compared %d runs", backbone, category, len(names))
    return out


def compare_runs(scores_dir: Path, backbone: str, runs: Sequence[str],
                 categories: Sequence[str] | str, data_root: Path | None = None,
                 n_boot: int = 1000, seed: int = 0, out: Path | None = None, *,
                 ci: float = 0.95, pixel: bool = True) -> pd.DataFrame:
    """Paired comparison of ``runs`` (folder names or unique prefixes) over ``categories``
    (a list, a comma list or ``"all"``: every category all runs scored); writes
    ``compare.csv``, ``compare.md`` and ``compare_forest.png`` to ``out`` and returns the
    table (columns :data:`COLUMNS`). ``n_boot=0`` turns the bootstrap off (DeLong's p stays);
    ``pixel=False`` compares image metrics only."""
    if isinstance(n_boot, bool) or n_boot < 0 or 0 < n_boot < stats.MIN_BOOT:
        raise ScoresError(f"--bootstrap {n_boot}: use 0 (no intervals) or at least "
                          f"{stats.MIN_BOOT} replicates (1000 recommended)")
    if not 0.0 < ci < 1.0:
        raise ScoresError(f"confidence level {ci}: expected a value in (0, 1), e.g. 0.95")
    names = list(dict.fromkeys(resolve_run_name(scores_dir, backbone, r) for r in runs))
    if len(names) < 2:
        raise ScoresError(f"--runs {','.join(runs)}: name at least two different runs")
    cats = _categories(scores_dir, backbone, names, categories)
    results = {c: _compare_category(scores_dir, backbone, names, c, data_root, n_boot, seed,
                                    ci, pixel) for c in cats}
    rows, notes = _rows(names, results, ci)
    table = pd.DataFrame(rows, columns=COLUMNS)
    target = Path(out) if out is not None else Path(scores_dir, backbone, "compare")
    write_outputs(table, target, backbone, notes, n_boot, seed, ci)
    return table


def _rows(names: Sequence[str], results: dict[str, dict[tuple[int, int, str], stats.Paired]],
          ci: float) -> tuple[list[dict], list[str]]:
    """Table rows (categories, then ``mean``), Holm-adjusted with > 2 runs, and the notes."""
    rows: list[dict] = []
    notes: list[str] = []
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    means = {k: stats.across_categories([r[k] for r in results.values() if k in r], ci)
             for k in keys}
    for category, found in [*results.items(), ("mean", means)]:
        block = []
        for (i, j, metric), pair in found.items():
            block.append({"category": category, "metric": metric, "run_a": names[i],
                          "run_b": names[j], "a": pair.a, "b": pair.b, "diff": pair.diff,
                          "lo": pair.lo, "hi": pair.hi, "p": pair.p})
            if category == "mean" and pair.note:
                notes.append(f"mean {metric}, {names[i]} vs {names[j]}: {pair.note}")
                log.info("%s", notes[-1])
        if len(names) > 2:
            for metric in {r["metric"] for r in block}:
                family = [r for r in block if r["metric"] == metric]
                for r, p in zip(family, stats.holm([r["p"] for r in family]), strict=True):
                    r["p"] = float(p)
        rows += block
    return rows, notes


# --------------------------------------------------------------------------- outputs


def write_outputs(table: pd.DataFrame, out: Path, backbone: str, notes: Sequence[str],
                  n_boot: int, seed: int, ci: float) -> None:
    """``compare.csv``, ``compare.md`` and ``compare_forest.png`` in ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    n_runs = len(set(table["run_a"]) | set(table["run_b"]))
    atomic_write_text(out / "compare.md",
                      compare_markdown(table, backbone, notes, n_boot, seed, ci, n_runs))
    forest_plot(table, out / "compare_forest.png", ci)
    log.info("wrote %s (%d rows), compare.md, compare_forest.png", out / "compare.csv",
             len(table))


def _pct(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{100 * v:.1f}"


def compare_markdown(table: pd.DataFrame, backbone: str, notes: Sequence[str], n_boot: int,
                     seed: int, ci: float, n_runs: int) -> str:
    """The comparison as a Markdown table (metrics and differences in percentage points)."""
    level = f"{100 * ci:g} %"
    lines = [f"# Paired comparison ({backbone})", "",
             f"diff = a − b in percentage points, with its {level} paired stratified bootstrap "
             f"interval ({n_boot} replicates, seed {seed})." if n_boot else
             "diff = a − b in percentage points (bootstrap off: no intervals).",
             "p: DeLong's test for image_auroc, the paired bootstrap otherwise; `mean` rows: "
             "Wilcoxon signed-rank test over the categories"
             + (f"; Holm-adjusted over the {n_runs * (n_runs - 1) // 2} pairs of runs."
                if n_runs > 2 else "."), "",
             f"| category | metric | run_a | run_b | a | b | diff [{level}] | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        interval = "" if not math.isfinite(r.lo) else f" [{_pct(r.lo)}, {_pct(r.hi)}]"
        diff = "–" if not math.isfinite(r.diff) else f"{100 * r.diff:+.1f}{interval}"
        p = "–" if not math.isfinite(r.p) else f"{r.p:.3g}"
        lines.append(f"| {r.category} | {r.metric} | {r.run_a} | {r.run_b} | {_pct(r.a)} | "
                     f"{_pct(r.b)} | {diff} | {p} |")
    k = len(set(table["category"]) - {"mean"})
    if k:
        notes = [*notes, f"Wilcoxon over {k} categories: the smallest two-sided p possible is "
                 f"{2 / 2 ** k:.3g}; read the mean's interval for fewer than 6 categories."]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def forest_plot(table: pd.DataFrame, path: Path, ci: float = 0.95) -> Path:
    """Differences with their intervals: one panel per metric, one line per category (and
    pair of runs), the mean last in black; a dashed line at no difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = table[np.isfinite(table["diff"].to_numpy(float))]
    metrics_shown = [m for m in METRICS if m in set(shown["metric"])] or ["image_auroc"]
    pairs = list(dict.fromkeys(zip(table["run_a"], table["run_b"], strict=True)))
    cats = list(dict.fromkeys(table["category"]))
    labels = [c if len(pairs) == 1 else f"{c}: {a[:12]} − {b[:12]}" for c in cats
              for a, b in pairs]
    ncols = min(3, len(metrics_shown))
    nrows = math.ceil(len(metrics_shown) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 2.0, nrows * (0.35 * len(labels) + 1.6)), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(metrics_shown):]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics_shown, strict=False):
        part = shown[shown["metric"] == metric]
        for y, (c, (a, b)) in enumerate(itertools.product(cats, pairs)):
            row = part[(part["category"] == c) & (part["run_a"] == a) & (part["run_b"] == b)]
            if row.empty:
                continue
            r = row.iloc[0]
            color = "black" if c == "mean" else "tab:blue"
            if math.isfinite(r["lo"]):
                ax.plot([100 * r["lo"], 100 * r["hi"]], [y, y], color=color, lw=1.5)
            ax.plot(100 * r["diff"], y, "D" if c == "mean" else "o", color=color, ms=5)
        ax.axvline(0.0, color="grey", ls="--", lw=1)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(f"a − b (points, {100 * ci:g} % CI)", fontsize=8)
    for ax in grid[:, 0]:
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    if len(pairs) == 1:
        a, b = pairs[0]
        fig.suptitle(f"{a} − {b}", fontsize=9, y=1.02)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", bbox_inches="tight")
    finally:
        fig.clear()
    return path
