"""Choose a configuration without real defects: rank backbone x method x setting by their metrics
on a synthetic validation set (:mod:`patchbank.synth.dataset`), and check the choice against
real test metrics when they exist.

Reads evaluated runs only: every ``<scores_dir>/<backbone>/<run>/<category>/metrics.json`` with
its ``run.json`` (written by the evaluate and score stages). A configuration is
``<backbone>/<run>``: the run name hashes the method, its parameters, the bank tag (the
extraction spec), the hold-out and the seed, so the same settings evaluated on the synthetic and
on the real dataset share it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from patchbank.core.errors import ScoresError

log = logging.getLogger(__name__)

#: Metrics a selection can rank by (higher is better).
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro", "overall_score")


def collect(scores_dir: Path, categories: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per evaluated (configuration, category): ``config, backbone, run, method,
    params, bank, category`` and every metric in :data:`METRICS` (NaN when absent)."""
    scores_dir = Path(scores_dir)
    rows = []
    for metrics_json in sorted(scores_dir.glob("*/*/*/metrics.json")):
        folder = metrics_json.parent
        category, run, backbone = folder.name, folder.parent.name, folder.parent.parent.name
        if categories is not None and category not in categories:
            continue
        try:
            metrics = json.loads(metrics_json.read_text())
            info = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s), left out", folder, err)
            continue
        values = metrics.get("metrics", metrics) if isinstance(metrics, dict) else {}
        row = {"config": f"{backbone}/{run}", "backbone": backbone, "run": run,
               "method": info.get("method", run.split("-")[0]),
               "params": json.dumps(info.get("params", {}), sort_keys=True),
               "bank": info.get("bank", ""), "category": category}
        for m in METRICS:
            v = values.get(m) if isinstance(values, dict) else None
            row[m] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) \
                else math.nan
        rows.append(row)
    if not rows:
        raise ScoresError(f"{scores_dir}: no evaluated runs (*/*/*/metrics.json); run "
                          "scripts/run.py (or score + evaluate) on the dataset first")
    return pd.DataFrame(rows)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ScoresError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")


def rank(table: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """``table`` sorted per category by ``metric`` (best first) with a 1-based ``rank``;
    ties are broken by the other metrics' mean, then by the config name (deterministic)."""
    _check_metric(metric)
    t = table.copy()
    t["_tie"] = t[[m for m in METRICS if m != metric]].mean(axis=1, skipna=True).fillna(-1)
    t = t.sort_values(["category", metric, "_tie", "config"],
                      ascending=[True, False, False, True], na_position="last")
    t["rank"] = t.groupby("category").cumcount() + 1
    return t.drop(columns="_tie").reset_index(drop=True)


def pick(table: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """The best configuration per category (one row each)."""
    ranked = rank(table, metric)
    return ranked[ranked["rank"] == 1].reset_index(drop=True)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN below 3 pairs or without
    variation."""
    x, y = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    ok = x.notna() & y.notna()
    x, y = x[ok].rank(), y[ok].rank()
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _matches(config: str, default: str) -> bool:
    """``default`` = ``backbone/method`` (or a config name): does ``config`` match it?"""
    backbone, _, method = default.partition("/")
    cfg_backbone, _, run = config.partition("/")
    return config == default or (cfg_backbone == backbone and run.split("-")[0] == method)


def compare(synthetic: pd.DataFrame, real: pd.DataFrame, metric: str = "image_auroc",
            default: str = "efficientnet_lite0/patchcore") -> pd.DataFrame:
    """Per category (plus a mean row): the synthetic pick, its real ``metric``, the oracle
    (best real) configuration and value, the default configuration's real value, the pick's
    real rank, and the Spearman correlation of synthetic vs real ``metric`` over the
    configurations evaluated on both."""
    _check_metric(metric)
    out = []
    for category in sorted(set(synthetic["category"]) & set(real["category"])):
        s = synthetic[synthetic["category"] == category].set_index("config")
        r = real[real["category"] == category].set_index("config")
        common = sorted(set(s.index) & set(r.index))
        if not common:
            continue
        s, r = s.loc[common], r.loc[common]
        chosen = pick(s.reset_index(), metric).iloc[0]["config"]
        oracle = pick(r.reset_index(), metric).iloc[0]["config"]
        real_rank = rank(r.reset_index(), metric).set_index("config")["rank"]
        defaults = [c for c in common if _matches(c, default)]
        out.append({
            "category": category, "n_configs": len(common),
            "pick": chosen, "pick_synthetic": s.loc[chosen, metric],
            "pick_real": r.loc[chosen, metric], "pick_real_rank": int(real_rank[chosen]),
            "oracle": oracle, "oracle_real": r.loc[oracle, metric],
            "default": defaults[0] if defaults else "",
            "default_real": r.loc[defaults[0], metric] if defaults else math.nan,
            "spearman": spearman(s[metric].to_numpy(), r[metric].to_numpy()),
        })
    if not out:
        raise ScoresError("no configuration was evaluated on both the synthetic and the real "
                          "dataset with the same settings (same backbone/run names)")
    table = pd.DataFrame(out)
    mean = {"category": "mean", "n_configs": int(table["n_configs"].min())}
    for col in ("pick_synthetic", "pick_real", "pick_real_rank", "oracle_real", "default_real",
                "spearman"):
        mean[col] = table[col].mean()
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def _short(config: str) -> str:
    """``efficientnet_lite0/patchcore-s224-...-hash`` -> ``efficientnet_lite0 patchcore``."""
    if not isinstance(config, str) or not config:
        return ""
    backbone, _, run = config.partition("/")
    return f"{backbone} {run.split('-')[0]}"


def markdown(table: pd.DataFrame, metric: str) -> str:
    """A comparison table (:func:`compare`) as markdown, metric values in percent."""
    def pct(v: float) -> str:
        return "" if pd.isna(v) else f"{100 * v:.1f}"

    head = (f"| category | configs | synthetic pick | pick: synthetic {metric} | pick: real "
            f"{metric} (real rank) | oracle (best real) | oracle real {metric} | default | "
            f"default real {metric} | Spearman synthetic vs real |")
    lines = [head, "|" + "---|" * 10]
    for _, row in table.iterrows():
        rank_txt = "" if pd.isna(row["pick_real_rank"]) else (
            f" ({row['pick_real_rank']:.0f})" if row["category"] != "mean"
            else f" (mean {row['pick_real_rank']:.1f})")
        rho = "" if pd.isna(row["spearman"]) else f"{row['spearman']:+.2f}"
        lines.append(
            f"| {row['category']} | {row['n_configs']} | {_short(row.get('pick'))} | "
            f"{pct(row['pick_synthetic'])} | {pct(row['pick_real'])}{rank_txt} | "
            f"{_short(row.get('oracle'))} | {pct(row['oracle_real'])} | "
            f"{_short(row.get('default'))} | {pct(row['default_real'])} | {rho} |")
    return "\n".join(lines) + "\n"


def ranking_markdown(table: pd.DataFrame, metric: str, top: int = 5) -> str:
    """The ``top`` configurations per category on the (synthetic) set, as markdown."""
    ranked = rank(table, metric)
    lines = [f"| category | rank | backbone | method | {metric} | pixel_auroc |", "|---" * 6 + "|"]
    for _, row in ranked[ranked["rank"] <= top].iterrows():
        px = "" if pd.isna(row["pixel_auroc"]) else f"{100 * row['pixel_auroc']:.1f}"
        lines.append(f"| {row['category']} | {row['rank']} | {row['backbone']} | "
                     f"{row['method']} | {100 * row[metric]:.1f} | {px} |")
    return "\n".join(lines) + "\n"


__all__ = ["METRICS", "collect", "compare", "markdown", "pick", "rank", "ranking_markdown",
           "spearman"]
