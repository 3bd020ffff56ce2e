"""Evaluate stage: score runs + ground-truth masks -> metrics.csv, leaderboard, figures.

Pixel metrics are computed at the original mask resolution by default: each map is upsampled
bilinearly to its image's size and smoothed with the method's sigma scaled to that size
(``eval_size`` evaluates at a reduced resolution instead, and the output says so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from patchbank.core.errors import ScoresError
from patchbank.data.mvtec import load_mask
from patchbank.evaluation import metrics
from patchbank.evaluation.geometry import eval_sigma, upsample_map
from patchbank.store.runs import RunPaths, ScoreRun, load_run

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "category", "image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pro",
    "best_dice", "image_score", "pixel_score", "overall_score", "fit_s", "score_s",
]
EXTRA_COLUMNS = [
    "f1_threshold", "f1_precision", "f1_recall", "unsup_threshold", "unsup_precision",
    "unsup_recall", "unsup_f1", "eval_resolution", "n_test",
]


def reroot(path: str, data_root: Path | None, category: str) -> Path:
    """``path`` as stored, or moved under ``data_root`` when the dataset now lives there."""
    p = Path(path)
    if data_root is None or p.exists():
        return p
    parts = p.parts
    if category in parts:
        i = len(parts) - 1 - parts[::-1].index(category)
        return Path(data_root, *parts[i:])
    return p


def crop_box(height: int, width: int, image_size: int, crop: int | None) -> tuple[slice, slice]:
    """Region of the original image that a centre crop of the resized input covers."""
    if not crop:
        return slice(0, height), slice(0, width)
    fy, fx = crop / image_size * height, crop / image_size * width
    y0, x0 = int(round((height - fy) / 2)), int(round((width - fx) / 2))
    return slice(y0, y0 + int(round(fy))), slice(x0, x0 + int(round(fx)))


def eval_shape(height: int, width: int, eval_size: int | None) -> tuple[int, int]:
    """Evaluation (H, W): original, or scaled so the longer side is ``eval_size``."""
    if not eval_size or max(height, width) <= eval_size:
        return height, width
    f = eval_size / max(height, width)
    return max(1, round(height * f)), max(1, round(width * f))


def masks_and_maps(run: ScoreRun, category: str, data_root: Path | None = None,
                   eval_size: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ground-truth masks and full-resolution smoothed maps, one pair per test image."""
    info, df = run.info, run.scores
    masks, maps = [], []
    for i, row in enumerate(tqdm(df.itertuples(), total=len(df), desc=f"{category} maps",
                                 leave=False)):
        h, w = int(row.height), int(row.width)
        if row.mask_path:
            mask = load_mask(reroot(row.mask_path, data_root, category), size=(w, h))
        else:
            mask = np.zeros((h, w), dtype=bool)
        ys, xs = crop_box(h, w, int(info["image_size"]), info.get("crop"))
        mask = mask[ys, xs]
        eh, ew = eval_shape(*mask.shape, eval_size)
        if (eh, ew) != mask.shape:
            mask = upsample_map(mask.astype(np.float32), (eh, ew)) >= 0.5
        sigma = eval_sigma(info["map_sigma"], eh, int(info["input_size"]))
        maps.append(upsample_map(run.maps[i], (eh, ew), sigma))
        masks.append(mask)
    return masks, maps


def evaluate_run(run: ScoreRun, category: str, data_root: Path | None = None,
                 eval_size: int | None = None) -> dict[str, Any]:
    """All metrics of one category's run (NaN for pixel metrics of image-level runs)."""
    df = run.scores
    labels, scores = df["label"].to_numpy(int), df["score"].to_numpy(float)
    row: dict[str, Any] = {"category": category, "n_test": len(df)}
    if len(np.unique(labels)) < 2:
        raise ScoresError(f"{category}: test set needs good and defective images for AUROC")
    row["image_auroc"] = metrics.image_auroc(labels, scores)
    row["image_ap"] = metrics.image_ap(labels, scores)
    f1, thr, prec, rec = metrics.best_f1(labels, scores)
    row.update(image_f1=f1, f1_threshold=thr, f1_precision=prec, f1_recall=rec)
    if run.train_scores is not None and len(run.train_scores) >= 2:
        unsup = metrics.unsupervised_threshold(run.train_scores)
        m = metrics.threshold_metrics(labels, scores, unsup)
        row.update(unsup_threshold=unsup, unsup_precision=m["precision"],
                   unsup_recall=m["recall"], unsup_f1=m["f1"])
    pixel = dict.fromkeys(("pixel_auroc", "pixel_ap", "pro", "best_dice"), float("nan"))
    has_masks = bool((df["mask_path"] != "").any())
    if run.maps is not None and has_masks:
        masks, maps = masks_and_maps(run, category, data_root, eval_size)
        pixel = metrics.pixel_metrics(masks, maps)
        row["eval_resolution"] = f"{eval_size}px" if eval_size else "original"
    row.update(pixel)
    row.update(metrics.composite_scores(row["image_auroc"], row["image_ap"],
                                        row["pixel_auroc"], row["best_dice"]))
    row.update(fit_s=run.info.get("fit_s"), score_s=run.info.get("score_s"))
    return row


def evaluate(scores_dir: Path, backbone: str, method: str, categories: Sequence[str],
             data_root: Path | None = None, eval_size: int | None = None,
             figures: bool = True) -> pd.DataFrame:
    """Evaluate one (backbone, method) over categories; writes ``metrics.csv`` and figures."""
    rows = []
    for category in categories:
        run = load_run(RunPaths.of(scores_dir, backbone, method, category))
        row = evaluate_run(run, category, data_root, eval_size)
        log.info("%s/%s/%s: image AUROC %.4f, pixel AUROC %.4f, PRO %.4f", backbone, method,
                 category, row["image_auroc"], row["pixel_auroc"], row["pro"])
        rows.append(row)
        if figures:
            from patchbank.evaluation.figures import write_category_figures

            write_category_figures(run, category, Path(scores_dir, backbone, method, "figures"),
                                   data_root=data_root)
    out = Path(scores_dir, backbone, method, "metrics.csv")
    table = merge_metrics(out, pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS + EXTRA_COLUMNS))
    table.to_csv(out, index=False, float_format="%.6g")
    log.info("wrote %s (%d categories)", out, len(table) - 1)
    return table


def merge_metrics(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """New category rows plus earlier rows of other categories in ``path``, then a fresh mean.

    Evaluating one category never drops what was measured for the others.
    """
    if path.is_file():
        old = pd.read_csv(path, keep_default_na=True)
        keep = old[(old["category"] != "mean") & ~old["category"].isin(new["category"])]
        if len(keep):
            log.info("%s: keeping earlier rows for %s", path, ", ".join(keep["category"]))
            new = pd.concat([keep.reindex(columns=new.columns), new], ignore_index=True)
    table = new.sort_values("category", kind="stable").reset_index(drop=True)
    mean = table.drop(columns=["category", "eval_resolution"]).mean(numeric_only=True).to_dict()
    mean.update(category="mean", eval_resolution=table["eval_resolution"].iloc[0])
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)[table.columns]


def leaderboard(scores_dir: Path) -> pd.DataFrame:
    """Every evaluated backbone x method: mean metrics and times, best first; writes csv + md."""
    rows = []
    for path in sorted(Path(scores_dir).glob("*/*/metrics.csv")):
        table = pd.read_csv(path)
        mean = table[table["category"] == "mean"]
        if mean.empty:
            continue
        row = mean.iloc[0].to_dict()
        row.pop("category")
        n = int((table["category"] != "mean").sum())
        cats = ",".join(table.loc[table["category"] != "mean", "category"].astype(str))
        rows.append({"backbone": path.parts[-3], "method": path.parts[-2], "n_categories": n,
                     "categories": cats, **row})
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board["_rank"] = board["overall_score"].fillna(board["image_score"] / 2)
    board = board.sort_values(["_rank", "image_auroc"], ascending=False).drop(columns="_rank")
    board = board.reset_index(drop=True)
    board.to_csv(Path(scores_dir, "leaderboard.csv"), index=False, float_format="%.6g")
    Path(scores_dir, "leaderboard.md").write_text(leaderboard_markdown(board))
    return board


def leaderboard_markdown(board: pd.DataFrame) -> str:
    """A Markdown table of the leaderboard's main columns (metrics in percent)."""
    cols = ["backbone", "method", "categories", "image_auroc", "image_ap", "image_f1",
            "pixel_auroc", "pro", "best_dice", "overall_score", "fit_s", "score_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in board.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            if c.endswith("_s"):
                cells.append("" if pd.isna(v) else f"{float(v):.1f}")
            elif isinstance(v, float | np.floating):
                cells.append("–" if np.isnan(v) else f"{100 * v:.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
