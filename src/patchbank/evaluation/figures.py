"""Evaluate-stage pictures: heatmap triplets, ROC/PR curves and score histograms.

Every function writes one PNG (atomically: :mod:`patchbank.core.atomic`) and returns its path.
Figures are built on
:class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``: nothing is
registered in pyplot's global figure list (so memory does not grow over many categories, and
each figure is cleared after saving) and the caller's backend — e.g. a notebook's inline
backend — is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from patchbank.core.atomic import atomic_open
from patchbank.core.errors import DatasetError
from patchbank.data.mvtec import load_image, load_mask
from patchbank.evaluation import metrics
from patchbank.evaluation.geometry import reroot, resize_mask, run_map
from patchbank.store.runs import ScoreRun

log = logging.getLogger(__name__)

HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.5
CLASS_COLORS = {"good": "tab:blue", "defective": "tab:red"}
DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG (folders created, atomically) and release its artists."""
    path = Path(path)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return path


# --------------------------------------------------------------------------- heatmaps


def heatmap_triplet(
    image: np.ndarray,
    heatmap: np.ndarray,
    mask: np.ndarray | None,
    path: Path,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Three panels: image | heatmap over the image (with colour bar) | ground-truth mask.

    ``image`` is (H, W, 3) uint8, ``heatmap`` (H, W) and ``mask`` (H, W) bool or None (drawn
    black: a good image). Pass the same ``vmin``/``vmax`` for every image of a category so the
    colours are comparable; by default the heatmap's own range is used.
    """
    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if heatmap.shape != image.shape[:2]:
        raise ValueError(f"heatmap {heatmap.shape} must match the image {image.shape[:2]}")
    if mask is None:
        mask = np.zeros(image.shape[:2], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} must match the image {image.shape[:2]}")
    finite = heatmap[np.isfinite(heatmap)]
    lo = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    hi = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 1.0
    if hi <= lo:
        hi = lo + 1e-6

    h, w = image.shape[:2]
    panel = 4.0
    fig = _new_figure(3 * panel * w / max(h, w) + 1.0, panel * h / max(h, w) + 0.6)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    im = axes[1].imshow(heatmap, cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=lo, vmax=hi)
    axes[1].set_title("anomaly map")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title("ground truth")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def pick_examples(scores: pd.DataFrame, n_random: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """Positions (``iloc``) of the images worth a picture.

    ``"best"``: the defective image scored highest. ``"worst"``: the defective image scored
    lowest, then the good image scored highest (the worst false alarm). ``"random"``:
    ``n_random`` others, drawn with ``seed``. Without defective images ``"best"`` is the good
    image scored lowest and ``"worst"`` the good image scored highest. Non-finite scores are
    never picked as best/worst.
    """
    labels = scores["label"].to_numpy(int)
    values = scores["score"].to_numpy(float)
    finite = np.isfinite(values)
    bad = np.flatnonzero((labels != 0) & finite)
    good = np.flatnonzero((labels == 0) & finite)

    def top(idx: np.ndarray, highest: bool) -> list[int]:
        if not idx.size:
            return []
        pick = np.argmax(values[idx]) if highest else np.argmin(values[idx])
        return [int(idx[pick])]

    if bad.size:
        best = top(bad, highest=True)
        worst = top(bad, highest=False) + top(good, highest=True)
    else:
        best = top(good, highest=False)
        worst = top(good, highest=True)
    worst = [i for i in dict.fromkeys(worst) if i not in best]
    taken = set(best) | set(worst)
    rest = np.array([i for i in range(len(scores)) if i not in taken], dtype=int)
    n = min(max(int(n_random), 0), rest.size)
    rng = np.random.default_rng(seed)
    random = sorted(int(i) for i in rng.choice(rest, size=n, replace=False)) if n else []
    return {"best": best, "worst": worst, "random": random}


# --------------------------------------------------------------------------- image level


def _binary(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel() != 0
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def roc_pr_curves(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, path: Path,
                  title: str = "") -> Path:
    """ROC (left) and precision-recall (right) curves, AUROC and AP in the legends.

    With only one class present the curves are undefined: the panels say so instead.
    """
    y, s = _binary(labels, scores)
    fig = _new_figure(10.0, 4.4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, s)
        auroc = float(roc_auc_score(y, s))
        ax_roc.plot(fpr, tpr, color="tab:red", lw=2, label=f"AUROC = {auroc:.3f}")
        precision, recall, _ = precision_recall_curve(y, s)
        ap = float(average_precision_score(y, s))
        ax_pr.step(recall, precision, where="post", color="tab:red", lw=2, label=f"AP = {ap:.3f}")
        ax_pr.axhline(y.mean(), color="grey", ls="--", lw=1, label=f"chance = {y.mean():.3f}")
    else:
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "undefined: needs good and\ndefective images", ha="center",
                    va="center", transform=ax.transAxes)
    ax_roc.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall",
              xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    for ax, where in ((ax_roc, "lower right"), (ax_pr, "lower left")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def score_histogram(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, path: Path,
                    title: str = "", thresholds: Mapping[str, float] | None = None) -> Path:
    """Histogram of image scores, good vs defective, with a vertical line per threshold."""
    y, s = _binary(labels, scores)
    data = pd.DataFrame({"score": s, "class": np.where(y, "defective", "good")})
    data = data[np.isfinite(data["score"])]
    order = [c for c in ("good", "defective") if (data["class"] == c).any()]
    fig = _new_figure(7.0, 4.4)
    ax = fig.subplots()
    handles: list = []
    if order:
        sns.histplot(data=data, x="score", hue="class", hue_order=order, palette=CLASS_COLORS,
                     bins=min(30, max(5, len(data) // 3)), element="step", common_bins=True,
                     legend=False, ax=ax)
        counts = data["class"].value_counts()
        handles += [Patch(color=CLASS_COLORS[c], alpha=0.5, label=f"{c} (n={counts[c]})")
                    for c in order]
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, value) in enumerate((thresholds or {}).items()):
        if value is None or not np.isfinite(value):
            continue
        ax.axvline(value, color="black", ls=styles[i % len(styles)], lw=1.5)
        handles.append(Line2D([], [], color="black", ls=styles[i % len(styles)],
                              label=f"{name} = {value:.4g}"))
    if handles:
        ax.legend(handles=handles)
    ax.set(xlabel="image anomaly score", ylabel="images")
    if title:
        ax.set_title(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- per category


def map_range(run: ScoreRun) -> tuple[float, float]:
    """(vmin, vmax) over all of a run's maps: one colour scale per category.

    Upsampling and smoothing are averages, so every displayed map stays inside this range.
    """
    if run.maps is None or not run.maps.size:
        raise ValueError("run has no anomaly maps (image-level method)")
    finite = run.maps[np.isfinite(run.maps)]
    if not finite.size:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def load_example(run: ScoreRun, index: int, category: str, max_side: int = 512,
                 data_root: Path | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image uint8, heatmap, mask or None) of test image ``index``, ready to draw.

    The image is cropped like the model input (``--crop``) and downscaled so its longer side is
    at most ``max_side``; the map is placed on it by :func:`patchbank.evaluation.geometry.run_map`
    (the same geometry as the metrics). Raises :class:`DatasetError` when the image cannot be
    read; a missing or mismatched mask is logged and drawn as None.
    """
    if run.maps is None:
        raise ValueError("run has no anomaly maps (image-level method)")
    row = run.scores.iloc[index]
    image = np.asarray(load_image(reroot(row["path"], data_root, category)))
    h, w = image.shape[:2]
    mask = None
    if row["mask_path"]:
        mask_path = reroot(row["mask_path"], data_root, category)
        try:
            mask = load_mask(mask_path, size=(w, h))
        except DatasetError as err:
            log.warning("%s; drawing no ground truth", err)
    heatmap, (ys, xs) = run_map(run, index, h, w, max_side)
    image = image[ys, xs]
    dh, dw = heatmap.shape
    if (dh, dw) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((dw, dh), Image.Resampling.BILINEAR,
                                                         reducing_gap=2.0))
    if mask is not None:
        mask = resize_mask(mask[ys, xs], (dh, dw))
    return image, heatmap, mask


def write_category_figures(run: ScoreRun, category: str, out_dir: Path, max_side: int = 512,
                           n_random: int = 3, seed: int = 0,
                           data_root: Path | None = None) -> list[Path]:
    """All pictures of one category's run; returns the files written.

    ``<category>_roc_pr.png``, ``<category>_hist.png`` (with the unsupervised mean + 3 sigma
    threshold of the held-out train scores when present, and the oracle best-F1 threshold) and,
    for pixel-level runs, ``<category>_<kind>_<idx>_<stem>.png`` triplets for the examples of
    :func:`pick_examples`. Image paths are re-rooted under ``data_root`` when the dataset moved;
    an image that cannot be read is skipped with a warning.
    """
    out_dir = Path(out_dir)
    df = run.scores
    labels, scores = df["label"].to_numpy(int), df["score"].to_numpy(float)
    method = run.info.get("method", "")
    backbone = run.info.get("backbone", "")
    name = " / ".join(x for x in (backbone, method, category) if x)
    written = [roc_pr_curves(labels, scores, out_dir / f"{category}_roc_pr.png", title=name)]

    thresholds: dict[str, float] = {}
    train = run.train_scores
    if train is not None and np.isfinite(train).sum() >= 2:
        thresholds["mean + 3σ (held-out train)"] = metrics.unsupervised_threshold(
            train[np.isfinite(train)])
    if 0 < (labels != 0).sum() < len(labels):
        thresholds["best F1 (oracle)"] = metrics.best_f1(labels, scores)[1]
    written.append(score_histogram(labels, scores, out_dir / f"{category}_hist.png",
                                   title=name, thresholds=thresholds))

    if run.maps is None:
        return written
    vmin, vmax = map_range(run)
    picks = pick_examples(df, n_random=n_random, seed=seed)
    for kind, indices in picks.items():
        for idx in indices:
            row = df.iloc[idx]
            try:
                image, heatmap, mask = load_example(run, idx, category, max_side, data_root)
            except DatasetError as err:
                log.warning("%s; heatmap triplet skipped", err)
                continue
            stem = Path(row["path"]).stem
            title = (f"{name} — {kind}: {row['defect_type']}/{stem}, "
                     f"score {float(row['score']):.4g}")
            path = out_dir / f"{category}_{kind}_{idx}_{stem}.png"
            written.append(heatmap_triplet(image, heatmap, mask, path, title=title, vmin=vmin,
                                           vmax=vmax))
    log.info("%s: wrote %d figures to %s", category, len(written), out_dir)
    return written


# --------------------------------------------------------------------------- per defect type


def defect_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """Defect type (rows: ``category/defect_type``) x run (``backbone/method``) heatmap of
    image AUROC in percent, with a second panel of pixel AUROC when any run has it.

    ``table``: rows with columns ``backbone, method, category, defect_type, image_auroc,
    pixel_auroc`` (:func:`patchbank.stages.evaluate.leaderboard_by_defect`).
    """
    t = table.assign(row=table["category"].astype(str) + "/" + table["defect_type"].astype(str),
                     run=table["backbone"].astype(str) + "/" + table["method"].astype(str))
    panels = [c for c in ("image_auroc", "pixel_auroc")
              if c in t and pd.to_numeric(t[c], errors="coerce").notna().any()]
    if not panels:
        panels = ["image_auroc"]
    n_rows, n_runs = t["row"].nunique(), t["run"].nunique()
    width = (2.5 + 0.9 * n_runs) * len(panels)
    fig = _new_figure(max(4.0, width), max(2.5, 0.35 * n_rows + 1.5))
    for i, col in enumerate(panels):
        grid = t.pivot_table(index="row", columns="run", values=col, aggfunc="first",
                             dropna=False).astype(float) * 100
        ax = fig.add_subplot(1, len(panels), i + 1)
        sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", vmin=50, vmax=100, cmap="viridis",
                    cbar=i == len(panels) - 1, annot_kws={"size": 7})
        ax.set_title(col.replace("_", " "))
        ax.set_xlabel("")
        ax.set_ylabel("defect type" if i == 0 else "")
        if i:
            ax.set_yticklabels([])
    return _save(fig, path)
