"""Prediction speed: single-image latency (with a per-step breakdown) and batch throughput
against the extract stage on the same images (behind ``scripts/bench_predict.py``)."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchbank.data.mvtec import load_image
from patchbank.evaluation.heatmap import place_map
from patchbank.inference.model import RunModel
from patchbank.inference.predict import features, predict

log = logging.getLogger(__name__)


def _best(times: Sequence[float]) -> dict[str, float]:
    return {"best": min(times), "median": statistics.median(times)}


def latency(model: RunModel, image: Path, repeats: int = 10, maps: bool = True,
            pixel_threshold: str | float | None = None,
            threshold: str | float = "auto") -> dict[str, Any]:
    """Seconds for one image, decode -> score -> heatmap (-> mask), as ``predict`` runs it
    (no worker process), best and median of ``repeats`` after one warm-up; and the same steps
    timed one by one (decode, resize, normalise + forward, scorer, heatmap)."""
    if pixel_threshold is not None and maps:
        model.pixel_threshold(pixel_threshold)  # computed once, not part of the latency
    kwargs = {"maps": maps, "pixel_threshold": pixel_threshold, "num_workers": 0,
              "threshold": threshold}
    predict(model, [image], **kwargs)
    total = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(model, [image], **kwargs)
        total.append(time.perf_counter() - t0)
    steps: dict[str, list[float]] = {k: [] for k in ("decode", "resize", "forward", "score",
                                                     "heatmap")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        img = load_image(Path(image))
        t1 = time.perf_counter()
        pixels = model.preprocess.resize(img)[None]
        t2 = time.perf_counter()
        taps = features(model, pixels)
        t3 = time.perf_counter()
        _, grid = model.scorer.score(taps)
        t4 = time.perf_counter()
        if grid is not None and maps:
            place_map(grid[0], model.info.geometry, img.height, img.width)
        t5 = time.perf_counter()
        for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            steps[key].append(dt)
    return {"total": _best(total), "steps": {k: _best(v) for k, v in steps.items()},
            "size": [img.height, img.width], "threads": torch.get_num_threads()}


class _NullScorer:
    """Stands in for a scorer to time the feature path alone."""

    def __init__(self, scorer: Any) -> None:
        self.layers_ = scorer.layers_

    def score(self, taps: dict[int, np.ndarray]) -> tuple[np.ndarray, None]:
        return np.zeros(len(next(iter(taps.values())))), None


def throughput(model: RunModel, data_root: Path, category: str, n_images: int = 64,
               batch_size: int = 16, repeats: int = 3,
               threshold: str | float = "auto") -> dict[str, Any]:
    """Images/s over the first ``n_images`` train images of ``category``: the extract stage
    (cold: decoding the files in its DataLoader workers, no image cache, writing a bank to a
    temporary folder) with the run's extraction settings, ``predict`` (scores, decode in
    workers), and ``predict``'s feature path alone (the scorer replaced by a no-op).
    The three are interleaved ``repeats`` times; best of each."""
    from patchbank.data.mvtec import discover
    from patchbank.features.spec import ExtractSpec
    from patchbank.stages.extract import ExtractConfig, Extractor, fingerprint
    from patchbank.store.banks import BankPaths
    from patchbank.store.records import BankFingerprint

    samples = discover(data_root, category, "train")[:n_images]
    paths = [s.path for s in samples]
    fp = BankFingerprint.from_json(model.train_fingerprint, model.folder / "run.json")
    spec_d = dict(fp.spec or {})
    spec = ExtractSpec(fp.backbone, weights=spec_d.get("weights", "hub"),
                       layers=tuple(fp.layers), image_size=fp.image_size,
                       crop=fp.crop, normalize=spec_d.get("normalize"))
    extractor = Extractor(ExtractConfig(spec, batch_size=batch_size, device=str(model.device),
                                        image_cache=False))
    bank_fp = fingerprint(extractor.spec, extractor.info, extractor.preprocess, samples,
                          data_root, category, "train")
    times: dict[str, list[float]] = {"extract": [], "predict": [], "features": []}
    kwargs = {"batch_size": batch_size, "threshold": threshold}
    predict(model, paths[:batch_size], **kwargs)  # warm-up
    scorer = model.scorer
    with tempfile.TemporaryDirectory(prefix="patchbank-bench-") as tmp:
        for r in range(repeats):
            bank = BankPaths.of(Path(tmp) / f"banks{r}", spec.backbone, spec.tag(), category,
                                "train")
            t0 = time.perf_counter()
            extractor._extract(samples, bank, bank_fp, f"{category}/train")
            times["extract"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            predict(model, paths, **kwargs)
            times["predict"].append(time.perf_counter() - t0)
            try:
                model.scorer = _NullScorer(scorer)  # type: ignore[assignment]
                t0 = time.perf_counter()
                predict(model, paths, **kwargs)
                times["features"].append(time.perf_counter() - t0)
            finally:
                model.scorer = scorer
    n = len(paths)
    ips = {k: n / min(v) for k, v in times.items()}
    return {"n_images": n, "batch_size": batch_size, "extract_ips": ips["extract"],
            "predict_ips": ips["predict"], "features_ips": ips["features"],
            "predict_ratio": ips["predict"] / ips["extract"],
            "features_ratio": ips["features"] / ips["extract"],
            "threads": torch.get_num_threads()}
