"""Quality benchmark: method x setting over several datasets, to choose defaults on evidence.

Each row is one (dataset, backbone, image size, normalisation, method, parameters) run through
the real stages (extract -> score -> evaluate, hold-out off, no figures); banks and runs are
cached, so an extended or interrupted benchmark resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from patchbank.features.spec import ExtractSpec
from patchbank.stages.evaluate import evaluate
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.score import score_category

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One method setting: a label, the method, its parameters."""

    label: str
    method: str
    params: Mapping[str, str] = field(default_factory=dict)


#: The default grid: PatchCore aggregations, PaDiM taps, and the k-NN family at defaults.
VARIANTS = (
    Variant("patchcore official", "patchcore"),
    Variant("patchcore avgpool (anomalib)", "patchcore", {"aggregation": "avgpool"}),
    Variant("patchcore avgpool_valid (<=0.1)", "patchcore",
            {"aggregation": "avgpool_valid", "squared": "false", "n_reweight": "3"}),
    Variant("patchcore partitions=8 (approximate coreset)", "patchcore", {"partitions": "8"}),
    Variant("patchcore search=ivf (approximate maps)", "patchcore", {"search": "ivf"}),
    Variant("patchcore search=ivf nprobe=1 (approximate maps)", "patchcore",
            {"search": "ivf", "nprobe": "1"}),
    Variant("padim taps 1,2,3", "padim"),
    Variant("padim taps 2,3", "padim", {"layers": "2,3"}),
    Variant("knn", "knn"),
    Variant("spade", "spade"),
)


def run_quality(datasets: Sequence[tuple[str, Path, str]], backbones: Sequence[str],
                sizes: Sequence[int], norms: Sequence[str], variants: Iterable[Variant],
                banks_dir: Path, scores_dir: Path, weights: str = "hub",
                extra: Mapping[str, Mapping[str, str]] | None = None) -> pd.DataFrame:
    """All combinations; ``extra`` adds parameters per dataset name (e.g. a smaller coreset)."""
    rows = []
    variants = list(variants)
    for name, root, category in datasets:
        for backbone in backbones:
            for size in sizes:
                for norm in norms:
                    spec = ExtractSpec(backbone, weights, image_size=size, normalize=norm)
                    t0 = time.perf_counter()
                    extract(root, [category], ExtractConfig(spec), banks_dir)
                    extract_s = time.perf_counter() - t0
                    for v in variants:
                        params = {**v.params, **(extra or {}).get(name, {})}
                        if v.method != "patchcore":
                            params.pop("coreset", None)
                        run, _ = score_category(banks_dir, scores_dir, backbone, v.method,
                                                category, params, bank=spec.tag(), holdout=0.0)
                        table = evaluate(scores_dir, backbone, run, [category], data_root=root,
                                         figures=False)
                        m = table[table["category"] == category].iloc[0]
                        rows.append({
                            "dataset": name, "backbone": backbone, "image_size": size,
                            "normalize": norm, "variant": v.label,
                            "params": ",".join(f"{k}={x}" for k, x in sorted(params.items())),
                            "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                            "pro": m["pro"], "best_dice": m["best_dice"], "fit_s": m["fit_s"],
                            "score_s": m["score_s"], "extract_s": round(extract_s, 1),
                        })
                        log.info("%s %s %d %s %s: image %.4f pixel %.4f pro %.4f", name,
                                 backbone, size, norm, v.label, m["image_auroc"],
                                 m["pixel_auroc"], m["pro"])
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> str:
    """Markdown: one row per (backbone, size, normalisation, variant), image AUROC / pixel
    AUROC / PRO in % per dataset, plus the mean over datasets."""
    cells = table.assign(cell=lambda d: d.apply(
        lambda r: "/".join("–" if pd.isna(r[k]) else f"{100 * r[k]:.1f}"
                           for k in ("image_auroc", "pixel_auroc", "pro")), axis=1))
    keys = ["backbone", "image_size", "normalize", "variant"]
    wide = cells.pivot_table(index=keys, columns="dataset", values="cell", aggfunc="first")
    means = table.groupby(keys)[["image_auroc", "pixel_auroc", "pro"]].mean()
    wide["mean"] = means.apply(lambda r: "/".join(f"{100 * v:.1f}" for v in r), axis=1)
    wide = wide.reset_index()
    cols = list(wide.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in wide.iterrows()]
    return "\n".join(lines) + "\n"
