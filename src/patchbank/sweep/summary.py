"""The sweep's tidy table, its compact Markdown summary, and two figures.

``scores/sweeps/<name>.csv``: one row per score job, every setting a column (backbone, extract
setting, bank, category, method, ``params`` as JSON plus one ``param.<key>`` column per grid
key, shots, seed, holdout), the run folder, what each stage did (``score_status``,
``eval_status``: computed / skipped / ...), every metric of the evaluate stage, the fit and
score times recorded in ``run.json``, and ``job_s`` (this sweep's wall time for the job).
``<name>.md`` and ``<name>_seeds.csv``: per backbone x method x parameters x shots, mean ± std
and the 95 % Student-t interval over seeds (after averaging categories) of image AUROC, pixel
AUROC and PRO. Figures: ``<name>_heatmap.png``
(method x category, at the largest shots) and ``<name>_shots.png`` (metric vs shots, seed
spread as error bars).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank.core.atomic import atomic_path, atomic_write_text
from patchbank.evaluation import seeds

log = logging.getLogger(__name__)

SETTING_COLUMNS = ["backbone", "weights", "image_size", "layers", "crop", "normalize", "bank",
                   "weights_used", "category", "method", "params"]
RUN_COLUMNS = ["shots", "seed", "holdout", "run", "score_status", "eval_status"]
METRICS = ["image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pro", "best_dice",
           "image_score", "pixel_score", "overall_score", "unsup_threshold", "unsup_f1",
           "eval_resolution", "n_test", "n_train"]
TIME_COLUMNS = ["fit_s", "score_s", "job_s"]
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pro")
LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO"}


def shots_order(values: Sequence[str]) -> list[str]:
    """``["all", "16", "1", "4"]`` -> ``["1", "4", "16", "all"]``."""
    return sorted(set(values), key=lambda s: (s == "all", int(s) if s != "all" else 0))


def sweep_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The tidy table of the score jobs' rows, in a stable column and row order."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    params = sorted(c for c in df.columns if c.startswith("param."))
    cols = SETTING_COLUMNS + params + RUN_COLUMNS + METRICS + TIME_COLUMNS + ["error", "job"]
    for c in cols:
        if c not in df.columns:
            df[c] = None
    df = df[cols]
    order = {s: i for i, s in enumerate(shots_order(df["shots"].astype(str)))}
    df = df.assign(_shots=df["shots"].map(order)).sort_values(
        ["backbone", "weights", "image_size", "layers", "crop", "normalize", "category",
         "method", "params", "_shots", "seed"], kind="stable", na_position="first")
    return df.drop(columns="_shots").reset_index(drop=True)


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and 95 % Student-t interval over seeds (categories averaged first) of the
    summary metrics, per backbone x setting x method x parameters x shots; ``n_seeds`` counted
    (columns ``<m>_mean``, ``<m>_std``, ``<m>_t_lo``, ``<m>_t_hi``, ``<m>_n``, see
    :func:`patchbank.evaluation.seeds.seed_summary`)."""
    ok = table[table["error"].isna()] if "error" in table else table
    keys = ["backbone", "bank", "method", "params", "shots"]
    per_seed = ok.groupby(keys + ["seed"], dropna=False)[list(SUMMARY_METRICS)].mean()
    out = seeds.seed_summary(per_seed.reset_index(), SUMMARY_METRICS, keys)
    order = {s: i for i, s in enumerate(shots_order(out["shots"].astype(str)))}
    out = out.assign(_o=out["shots"].map(order)).sort_values(keys[:-1] + ["_o"])
    return out.drop(columns="_o").reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame) -> str:
    """Compact Markdown: one row per backbone x method (x parameters) x shots, metrics in %
    as mean ± std over seeds, then the 95 % t-intervals over seeds (– for a single seed)."""
    multi_bank = summary.groupby("backbone")["bank"].nunique().max() > 1
    multi_params = summary.groupby("method")["params"].nunique().max() > 1
    head = ["backbone"] + (["bank"] if multi_bank else []) + ["method"] + \
        (["params"] if multi_params else []) + ["shots"] + \
        [LABELS[m] for m in SUMMARY_METRICS] + ["seeds"] + \
        [f"{LABELS[m]} seed 95 % t" for m in SUMMARY_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [r["backbone"]] + ([str(r["bank"])] if multi_bank else []) + [r["method"]] + \
            ([params_label(r["params"])] if multi_params else []) + [str(r["shots"])]
        for m in SUMMARY_METRICS:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            if pd.isna(mean):
                cells.append("–")
            elif r["n_seeds"] > 1:
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            else:
                cells.append(f"{100 * mean:.1f}")
        cells.append(str(int(r["n_seeds"])))
        for m in SUMMARY_METRICS:
            lo, hi = r[f"{m}_t_lo"], r[f"{m}_t_hi"]
            cells.append("–" if pd.isna(lo) else f"[{100 * lo:.1f}, {100 * hi:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def params_label(params: str) -> str:
    """``{"k": "1", "metric": "cosine"}`` (JSON) -> ``k=1 metric=cosine``."""
    try:
        return " ".join(f"{k}={v}" for k, v in json.loads(params).items()) or "defaults"
    except (TypeError, ValueError):
        return str(params)


def _label(df: pd.DataFrame) -> pd.Series:
    """Row label of a figure: method (with backbone / parameters when they vary)."""
    label = df["method"].astype(str)
    if df["backbone"].nunique() > 1:
        label = df["backbone"].astype(str).str.replace("efficientnet_", "") + " " + label
    if df.groupby("method")["params"].nunique().max() > 1:
        label = label + " " + df["params"].map(params_label)
    return label


def heatmap_figure(table: pd.DataFrame, path: Path) -> Path:
    """Method x category heatmaps of the summary metrics at the largest shots, mean over
    seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = table[table["error"].isna()].copy()
    top = shots_order(ok["shots"].astype(str))[-1]
    ok = ok[ok["shots"].astype(str) == top].assign(label=lambda d: _label(d))
    metrics = [m for m in SUMMARY_METRICS if ok[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(1.2 + 2.2 * len(metrics) * max(1, ok["category"].nunique()
                                                                     ) ** 0.5,
                                      1.2 + 0.45 * ok["label"].nunique()))
    for ax, metric in zip(axes[0], metrics, strict=True):
        grid = ok.pivot_table(index="label", columns="category", values=metric,
                              aggfunc="mean") * 100
        im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto",
                       vmin=np.nanmin(grid.to_numpy(dtype=float)), vmax=100)
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right")
        ax.set_yticks(range(grid.shape[0]), grid.index if ax is axes[0][0] else [""] *
                      grid.shape[0])
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < np.nanmean(grid.to_numpy(dtype=float)) else "k")
        ax.set_title(f"{LABELS[metric]} (shots={top})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def shots_figure(table: pd.DataFrame, path: Path) -> Path:
    """Metric vs shots, one line per (backbone,) method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = table[table["error"].isna()].copy()
    ok["label"] = _label(ok)
    order = shots_order(ok["shots"].astype(str))
    per_seed = ok.groupby(["label", "shots", "seed"])[list(SUMMARY_METRICS)].mean()
    stats = per_seed.groupby(level=["label", "shots"]).agg(["mean", "std"])
    metrics = [m for m in SUMMARY_METRICS if ok[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(4.2 * len(metrics), 3.6))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label in sorted(ok["label"].unique()):
            sub = stats.loc[label].reindex(order)
            x = np.arange(len(order))
            ax.errorbar(x, 100 * sub[(metric, "mean")], yerr=100 * sub[(metric, "std")].fillna(0),
                        marker="o", capsize=3, label=label,
                        linestyle="--" if " lite2 " in f" {label} " else "-")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlabel("shots (training images)")
        ax.set_ylabel(f"{LABELS[metric]} (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean over categories; error bars: std over seeds", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_summary(table: pd.DataFrame, out_dir: Path, name: str,
                  figures: bool = True) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and (when there are metrics) the two figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"csv": out_dir / f"{name}.csv"}
    with atomic_path(written["csv"]) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    ok = table[table["error"].isna()] if not table.empty else table
    if ok.empty or ok["image_auroc"].isna().all():
        return written
    summary = seed_summary(table)
    written["seeds"] = out_dir / f"{name}_seeds.csv"
    with atomic_path(written["seeds"]) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    written["md"] = atomic_write_text(out_dir / f"{name}.md", summary_markdown(summary))
    if figures:
        written["heatmap"] = heatmap_figure(table, out_dir / f"{name}_heatmap.png")
        written["shots"] = shots_figure(table, out_dir / f"{name}_shots.png")
    return written
