"""Settings benchmark: choose each method's defaults on real data, with intervals and paired tests.

For every dataset, extract setting (image size, crop, normalisation) and method variant (taps,
aggregation) one run is fitted through the real stages; each alternative image-score rule is
then *derived* from that run (:func:`derive_image_score_run`: the same fitted model and maps,
the image scores recomputed by the rule, exactly what fitting with ``--param image_score=``
gives). Every run is evaluated with bootstrap intervals, then compared with the method's
reference (its paper's setting) by the compare stage over the real datasets together
(DeLong for image AUROC, paired bootstrap for pixel AUROC and PRO, Holm over the
alternatives). :func:`decide` applies the README's rule.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from patchbank.features.spec import ExtractSpec
from patchbank.scorers import load_scorer
from patchbank.scorers.image_score import grid_max, smoothed_max
from patchbank.stages.compare import compare_runs
from patchbank.stages.evaluate import evaluate
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.score import score_category
from patchbank.store.records import RunInfo
from patchbank.store.runs import RunPaths, load_run, write_run

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "pro")


@dataclass(frozen=True)
class Setting:
    """One extract setting: a label, the image size, an optional centre crop, normalisation."""

    label: str
    image_size: int
    crop: int | None
    normalize: str


#: the papers' protocol (resize 256, centre crop 224, ImageNet statistics) first.
SETTINGS = (
    Setting("256c224-imagenet", 256, 224, "imagenet"),
    Setting("224-imagenet", 224, None, "imagenet"),
    Setting("256-imagenet", 256, None, "imagenet"),
    Setting("224-half", 224, None, "half"),
    Setting("256-half", 256, None, "half"),
)


@dataclass(frozen=True)
class Arm:
    """A method variant: label (in run names), method, parameters, the image-score rules to
    derive, and whether it runs at every setting or only at the reference one."""

    label: str
    method: str
    params: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[str, ...] = ()
    everywhere: bool = True


#: per method, the first arm at the first setting with its first rule is the reference.
ARMS = (
    Arm("paper", "padim", {}, ("max_map", "max_grid")),
    Arm("taps23", "padim", {"layers": "2,3"}, ("max_map",), everywhere=False),
    Arm("paper", "patchcore", {}, ("max_grid", "max_map")),
    Arm("avgpool", "patchcore", {"aggregation": "avgpool"}, ("max_grid",), everywhere=False),
)


def derive_image_score_run(scores_dir: Path, backbone: str, run: str, category: str,
                           rule: str, name: str) -> None:
    """Copy run ``run`` of ``category`` to ``name`` with image scores by ``rule`` (from its
    saved grid maps, as ``Scorer.score`` computes them) and the rule in its parameters and
    model header. The copy is replaced when it exists."""
    src = load_run(RunPaths.of(scores_dir, backbone, run, category))
    info = RunInfo.from_json(src.info, "run.json")
    if src.maps is None:
        raise ValueError(f"{run}: an image-level run has no maps to derive image scores from")
    scores = (smoothed_max(src.maps, info.input_size, float(info.map_sigma or 0.0))
              if rule == "max_map" else grid_max(src.maps))
    dst = RunPaths.of(scores_dir, backbone, name, category)
    shutil.rmtree(dst.folder, ignore_errors=True)
    dst.folder.mkdir(parents=True)
    scorer = load_scorer(RunPaths.of(scores_dir, backbone, run, category).model, device="cpu")
    scorer.p = dataclasses.replace(scorer.p, image_score=rule)
    info.params = scorer.params
    info.run = name
    info.model = {"file": dst.model.name, "bytes": scorer.save(dst.model)}
    table = src.scores.assign(score=np.asarray(scores, dtype=np.float64))
    write_run(dst, table, src.maps, None, info)


def run_name(arm: Arm, setting: Setting, rule: str) -> str:
    """The run folder of one (arm, setting, rule): readable, the same for every dataset."""
    return f"{arm.method}-{setting.label}-{arm.label}-{rule}"


def run_settings(datasets: Sequence[tuple[str, Path, str]], backbone: str, banks_dir: Path,
                 scores_dir: Path, *, weights: str = "hub", settings: Sequence[Setting] = SETTINGS,
                 arms: Sequence[Arm] = ARMS, extra: Mapping[str, Mapping[str, str]] | None = None,
                 n_boot: int = 1000) -> pd.DataFrame:
    """Fit, derive and evaluate every (dataset, setting, arm, rule); one row per run with
    ``<metric>`` and ``<metric>_lo/_hi``. ``extra`` adds PatchCore parameters per dataset
    (``{"magnetic_tile": {"partitions": "8"}}``)."""
    rows = []
    for name, root, category in datasets:
        for k, setting in enumerate(settings):
            spec = ExtractSpec(backbone, weights, image_size=setting.image_size,
                               normalize=setting.normalize, crop=setting.crop)
            extract(root, [category], ExtractConfig(spec), banks_dir)
            for arm in arms:
                if k and not arm.everywhere:
                    continue
                params = dict(arm.params)
                if arm.method == "patchcore":
                    params.update((extra or {}).get(name, {}))
                fitted = run_name(arm, setting, arm.rules[0])
                score_category(banks_dir, scores_dir, backbone, arm.method, category,
                               {**params, "image_score": arm.rules[0]}, bank=spec.tag(),
                               name=fitted, holdout=0.0)
                for rule in arm.rules:
                    run = run_name(arm, setting, rule)
                    if rule != arm.rules[0]:
                        derive_image_score_run(scores_dir, backbone, fitted, category, rule, run)
                    table = evaluate(scores_dir, backbone, run, [category], data_root=root,
                                     figures=False, bootstrap=n_boot)
                    m = table[table["category"] == category].iloc[0]
                    row = {"dataset": name, "method": arm.method, "setting": setting.label,
                           "arm": arm.label, "image_score": rule, "run": run}
                    for metric in METRICS:
                        for suffix in ("", "_lo", "_hi"):
                            row[metric + suffix] = m.get(metric + suffix, np.nan)
                    row["fit_s"] = m.get("fit_s", np.nan)
                    rows.append(row)
                    log.info("%s %s: image %.4f pixel %.4f pro %.4f", name, run,
                             row["image_auroc"], row["pixel_auroc"], row["pro"])
    return pd.DataFrame(rows)


def paired(table: pd.DataFrame, scores_dir: Path, backbone: str, datasets: Sequence[str],
           n_boot: int = 1000, out: Path | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """Per method: the compare stage over ``datasets`` (their categories), the reference run
    against every alternative; rows of compare.csv (``run_a`` = the reference) plus ``level``,
    the intervals' confidence level: ``1 - alpha / m`` for m alternatives (Bonferroni), so
    every interval of a method holds at once with probability ``1 - alpha``."""
    parts = []
    sub = table[table["dataset"].isin(datasets)]
    for method, group in sub.groupby("method", sort=False):
        runs = list(dict.fromkeys(group["run"]))
        level = 1.0 - alpha / max(1, len(runs) - 1)
        target = None if out is None else Path(out, method)
        result = compare_runs(scores_dir, backbone, runs, sorted(set(group["dataset"])),
                              n_boot=n_boot, out=target, ci=level)
        parts.append(result[result["run_a"] == runs[0]].assign(method=method, level=level))
    return pd.concat(parts, ignore_index=True)


def decide(pairs: pd.DataFrame, primary: str = "image_auroc", alpha: float = 0.05
           ) -> dict[str, tuple[str, str]]:
    """Per method (run name, why): among the alternatives whose simultaneous interval of the
    mean gain in ``primary`` over the real datasets lies above 0 and that are significantly
    worse (Holm-adjusted p < ``alpha``) on no real dataset in any metric, the one with the
    largest mean gain; otherwise the reference (the paper's setting)."""
    out = {}
    for method, g in pairs.groupby("method", sort=False):
        best, why = g["run_a"].iloc[0], "no alternative is significantly better"
        mean = g[(g["category"] == "mean") & (g["metric"] == primary)].sort_values("diff")
        for _, r in mean.iterrows():  # diff = reference - alternative: most negative first
            rows = g[(g["run_b"] == r["run_b"]) & (g["category"] != "mean")
                     & g["metric"].isin(METRICS)]
            worse = rows[(rows["diff"] > 0) & (rows["p"] < alpha)]
            if r["hi"] < 0 and worse.empty:
                best = r["run_b"]
                why = (f"{primary} {-100 * r['diff']:+.2f} [{-100 * r['hi']:.2f}, "
                       f"{-100 * r['lo']:.2f}] over the real datasets")
                break
        out[method] = (best, why)
    return out


def _cell(row: pd.Series, metric: str) -> str:
    v, lo, hi = (100 * row[metric + s] for s in ("", "_lo", "_hi"))
    return "–" if pd.isna(v) else f"{v:.1f} [{lo:.1f}, {hi:.1f}]"


def markdown(table: pd.DataFrame, pairs: pd.DataFrame, decision: Mapping[str, tuple[str, str]],
             real: Sequence[str]) -> str:
    """Per method: a table (run x dataset, image AUROC / pixel AUROC / PRO with 95 % CIs, real
    datasets first), the paired differences against the reference over the real datasets, and
    the decision."""
    lines = []
    for method, g in table.groupby("method", sort=False):
        sets = list(dict.fromkeys([*[d for d in real if d in set(g["dataset"])],
                                   *g["dataset"]]))
        lines += [f"### {method}", "", "| run | " + " | ".join(
            f"{d}{'' if d in real else ' (reported)'}" for d in sets) + " |",
            "|---|" + "---|" * len(sets)]
        for run, r in g.groupby("run", sort=False):
            by = {row["dataset"]: row for _, row in r.iterrows()}
            cells = [" / ".join(_cell(by[d], m) for m in METRICS) if d in by else "–"
                     for d in sets]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        p = pairs[(pairs["method"] == method) & (pairs["category"] == "mean")]
        if len(p):
            lines += ["", f"Paired, alternative minus `{p['run_a'].iloc[0]}`, mean over "
                      f"{', '.join(real)}: difference [{100 * p['level'].iloc[0]:.2f} % "
                      "interval, Bonferroni over the alternatives], Wilcoxon p over the "
                      "datasets:", "",
                      "| alternative | " + " | ".join(METRICS) + " |", "|---|" + "---|" * 3]
            for alt, q in p.groupby("run_b", sort=False):
                by = {row["metric"]: row for _, row in q.iterrows()}
                cells = [f"{-100 * by[m]['diff']:+.2f} [{-100 * by[m]['hi']:.2f}, "
                         f"{-100 * by[m]['lo']:.2f}], p {by[m]['p']:.2g}" if m in by else "–"
                         for m in METRICS]
                lines.append(f"| {alt} | " + " | ".join(cells) + " |")
        best, why = decision.get(method, ("", ""))
        lines += ["", f"**Decision:** `{best}` ({why}).", ""]
    return "\n".join(lines) + "\n"
