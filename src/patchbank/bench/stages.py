"""Benchmarks behind ``scripts/bench_*.py`` (kept in the package so the scripts stay thin)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchbank.data.mvtec import discover
from patchbank.features.spec import ExtractSpec
from patchbank.stages.extract import ExtractConfig, Extractor, default_workers, fingerprint
from patchbank.store.banks import BankPaths
from patchbank.store.imagecache import ImageCache

log = logging.getLogger(__name__)


def bench_extract(data_root: Path, category: str, backbone: str, n_images: int = 64,
                  batch_size: int = 16, weights: str = "random",
                  repeats: int = 3) -> dict[str, float]:
    """Images/s of the whole extract stage, cold and warm, and of the bare forward.

    Cold: images decoded from disk in DataLoader workers (this also fills the image cache).
    Warm: the resized pixels read from that cache, as for every backbone after the first.
    Both write a new bank. The bare forward gets the same batches already decoded, resized and
    normalised, with the same torch thread count; nothing else is timed there. The three are
    interleaved ``repeats`` times and the best of each reported (timings here are noisy).
    """
    samples = discover(data_root, category, "train")[:n_images]
    ext = Extractor(ExtractConfig(ExtractSpec(backbone, weights=weights), batch_size=batch_size))
    fp = fingerprint(ext.spec, ext.info, ext.preprocess, samples, data_root, category, "train")
    tag = ext.spec.tag()
    times: dict[str, list[float]] = {"cold": [], "warm": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm_up = BankPaths.of(Path(tmp), "warm-up", tag, category, "train")
        ext._extract(samples[:batch_size], warm_up, fp, "warm-up")
        for r in range(repeats):
            cache = ImageCache.of(Path(tmp, f"cache{r}"), data_root, samples,
                                  ext.preprocess.image_size)
            for run in ("cold", "warm"):
                paths = BankPaths.of(Path(tmp, f"{run}{r}"), backbone, tag, category, "train")
                t0 = time.perf_counter()
                ext._extract(samples, paths, fp, f"{backbone} {run}", cache)
                times[run].append(time.perf_counter() - t0)
            pixels = torch.from_numpy(np.array(cache.load()))
            batches = [ext.preprocess.batch(pixels[s:s + batch_size])
                       for s in range(0, len(pixels), batch_size)]
            with torch.inference_mode():
                t0 = time.perf_counter()
                for x in batches:
                    ext.model.grids(x)
                times["bare"].append(time.perf_counter() - t0)
    n = len(samples)
    cold, warm, bare = (min(times[k]) for k in ("cold", "warm", "bare"))
    return {"backbone": backbone, "images": n, "cold_ips": n / cold, "warm_ips": n / warm,
            "bare_ips": n / bare, "cold_ratio": bare / cold, "warm_ratio": bare / warm,
            "workers": default_workers(), "threads": torch.get_num_threads()}


def bench_score(banks_dir: Path, backbone: str, category: str,
                methods: list[str]) -> list[dict[str, float]]:
    """Fit and score seconds of each method on one category's banks (one fit, no hold-out)."""
    from patchbank.scorers import make_scorer
    from patchbank.stages.score import resolve_tag
    from patchbank.store.banks import load_pair

    train, test = load_pair(banks_dir, backbone, resolve_tag(banks_dir, backbone, category),
                            category)
    rows = []
    for method in methods:
        scorer = make_scorer(method)
        t0 = time.perf_counter()
        scorer.fit(train.taps)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer.score(test.taps)
        rows.append({"method": method, "fit_s": fit, "score_s": time.perf_counter() - t0,
                     "n_train": len(train), "n_test": len(test)})
        log.info("%s: fit %.2f s, score %.2f s", method, fit, rows[-1]["score_s"])
    return rows


def fit_peak_memory(banks_dir: Path, backbone: str, category: str, method: str,
                    copies: int) -> dict[str, float]:
    """Peak traced memory (MiB) of one fit on the train bank repeated ``copies`` times.

    tracemalloc sees numpy's allocations (PaDiM's accumulators and batches); the repeated bank
    itself is allocated before tracing starts, so the number is the fit's own working memory.
    """
    import tracemalloc

    from patchbank.scorers import make_scorer
    from patchbank.stages.score import resolve_tag
    from patchbank.store.banks import load_bank

    tag = resolve_tag(banks_dir, backbone, category)
    train = load_bank(banks_dir, backbone, tag, category, "train").taps
    bank = {k: np.concatenate([v] * copies) for k, v in train.items()}
    scorer = make_scorer(method, device="cpu")
    tracemalloc.start()
    t0 = time.perf_counter()
    scorer.fit(bank)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"method": method, "n_train": len(next(iter(bank.values()))),
            "bank_mib": sum(v.nbytes for v in bank.values()) / 2**20,
            "fit_peak_mib": peak / 2**20, "fit_s": seconds}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_maps(category_root: Path, seed: int = 0) -> tuple[list, list, list]:
    """(masks, maps, labels) for a category's test images: maps are blurred noisy masks."""
    from scipy import ndimage

    from patchbank.data.mvtec import load_mask

    rng = np.random.default_rng(seed)
    masks, maps, labels = [], [], []
    for s in discover(category_root.parent, category_root.name, "test"):
        if s.mask_path is None:
            from PIL import Image

            with Image.open(s.path) as im:
                mask = np.zeros(im.size[::-1], dtype=bool)
        else:
            mask = load_mask(s.mask_path)
        noisy = mask.astype(np.float32) + rng.normal(0, 2.0, mask.shape).astype(np.float32)
        masks.append(mask)
        maps.append(ndimage.gaussian_filter(noisy, sigma=3))
        labels.append(s.label)
    return masks, maps, labels


def bench_metrics(category_root: Path, copies: int = 1, seed: int = 0) -> dict[str, float]:
    """Seconds and peak memory of all image and pixel metrics on synthetic full-size maps."""

    from patchbank.evaluation import metrics

    masks, maps, labels = synthetic_maps(category_root, seed)
    scores = np.array([m.max() for m in maps])
    masks, maps = masks * copies, maps * copies
    before = peak_rss_mib()
    t0 = time.perf_counter()
    pixel = metrics.pixel_metrics(masks, maps, progress=False)
    t_pixel = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.image_auroc(labels, scores), metrics.image_ap(labels, scores)
    metrics.best_f1(labels, scores)
    t_image = time.perf_counter() - t0
    return {"images": len(maps), "pixels": sum(m.size for m in maps), "pixel_s": t_pixel,
            "image_s": t_image, "extra_rss_mib": peak_rss_mib() - before, **pixel}


def bench_evaluate(scores_dir: Path, backbone: str, method: str, category: str,
                   data_root: Path | None = None) -> dict[str, float]:
    """The evaluate stage on a real run: masks + map upsampling/smoothing, then metrics."""
    from patchbank.evaluation import metrics
    from patchbank.stages.evaluate import masks_and_maps
    from patchbank.store.runs import RunPaths, load_run

    run = load_run(RunPaths.of(scores_dir, backbone, method, category))
    before = peak_rss_mib()
    t0 = time.perf_counter()
    masks, maps = masks_and_maps(run, category, data_root)
    t_maps = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixel = metrics.pixel_metrics(masks, maps, progress=False)
    return {"method": method, "images": len(maps), "pixels": sum(m.size for m in maps),
            "maps_s": t_maps, "metrics_s": time.perf_counter() - t0,
            "extra_rss_mib": peak_rss_mib() - before, **pixel}


def bench_bootstrap_arrays(masks: list, maps: list, labels: np.ndarray, scores: np.ndarray,
                           defect_types: list[str] | None = None, n_boot: int = 1000,
                           seed: int = 0) -> dict[str, float]:
    """Seconds of the point metrics vs the bootstrap intervals (image level alone, the pixel
    histograms, the pixel replicates) and of the per-defect table, on given masks and maps."""
    from patchbank.evaluation import bootstrap as bs
    from patchbank.evaluation import metrics
    from patchbank.evaluation.by_defect import metrics_by_defect

    t0 = time.perf_counter()
    point = {"image_auroc": metrics.image_auroc(labels, scores),
             "image_ap": metrics.image_ap(labels, scores),
             "image_f1": metrics.best_f1(labels, scores)[0],
             **metrics.pixel_metrics(masks, maps, progress=False)}
    t_point = time.perf_counter() - t0
    t0 = time.perf_counter()
    image_cis = bs.bootstrap_cis(labels, scores, None, n_boot, seed=seed)
    t_image = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = bs.PixelStats(masks, maps)
    t_hist = time.perf_counter() - t0
    t0 = time.perf_counter()
    cis = bs.bootstrap_cis(labels, scores, stats, n_boot, seed=seed, pixel_points=point)
    t_all = time.perf_counter() - t0
    row: dict[str, float] = {"images": len(maps), "pixels": sum(np.size(m) for m in maps),
                             "n_bins": stats.n_bins, "point_s": t_point,
                             "image_ci_s": t_image, "hist_s": t_hist, "all_ci_s": t_all}
    if defect_types is not None:
        t0 = time.perf_counter()
        metrics_by_defect("bench", labels, scores, defect_types, masks, maps,
                          pixel_stats=stats, n_boot=n_boot, seed=seed)
        row["by_defect_s"] = time.perf_counter() - t0
    row["ci_over_point"] = (t_point + t_hist + t_all) / t_point
    for k in bs.CI_METRICS:
        row[k], (row[f"{k}_lo"], row[f"{k}_hi"]) = point[k], cis[k]
    assert image_cis["image_auroc"] == cis["image_auroc"]
    return row


def bench_bootstrap(scores_dir: Path, backbone: str, method: str, category: str,
                    data_root: Path | None = None, n_boot: int = 1000) -> dict[str, float]:
    """:func:`bench_bootstrap_arrays` on a real score run's masks and maps (at full mask
    resolution, as the evaluate stage), plus the seconds to build those maps."""
    from patchbank.stages.evaluate import masks_and_maps
    from patchbank.store.runs import RunPaths, load_run

    run = load_run(RunPaths.of(scores_dir, backbone, method, category))
    t0 = time.perf_counter()
    masks, maps = masks_and_maps(run, category, data_root)
    t_maps = time.perf_counter() - t0
    df = run.scores
    row = bench_bootstrap_arrays(masks, maps, df["label"].to_numpy(int),
                                 df["score"].to_numpy(float),
                                 df["defect_type"].astype(str).tolist(), n_boot)
    return {"method": method, "maps_s": t_maps, **row}


def coreset_points(banks_dir: Path, backbone: str, category: str, tag: str | None = None,
                   proj_dim: int = 128, seed: int = 0) -> np.ndarray:
    """PatchCore's coreset input for one train bank: its aggregated patch features, projected
    to ``proj_dim`` dims as the coreset selection does (float32, (patches, proj_dim))."""
    from patchbank.scorers import make_scorer
    from patchbank.scorers.coreset import project
    from patchbank.store.banks import load_bank

    if tag is None:
        tags = sorted(p.name for p in Path(banks_dir, backbone).iterdir()
                      if Path(p, category).is_dir())
        if len(tags) != 1:
            raise ValueError(f"{banks_dir}/{backbone}: {len(tags)} tags with {category}, "
                             "give one")
        tag = tags[0]
    bank = load_bank(banks_dir, backbone, tag, category, "train")
    scorer = make_scorer("patchcore", device="cpu")
    feats = scorer._features(scorer._taps(bank.taps, "train"))
    return project(feats, proj_dim, "uniform", np.random.default_rng(seed))


def bench_coreset(points: np.ndarray, sizes: list[int], methods: list[str],
                  fraction: float = 0.1, seed: int = 0,
                  partitions: int = 1) -> list[dict[str, float]]:
    """Seconds (wall and process CPU) of PatchCore's coreset selection, ``int(fraction * size)``
    centres with the default initialisation, on seeded random subsets of ``points`` (already
    projected: no projection is timed), per size and greedy method; ``partitions`` > 1 times
    the approximate partitioned sampler instead."""
    from patchbank.scorers.coreset import coreset_indices

    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        size = min(size, len(points))
        sub = np.ascontiguousarray(points[np.sort(rng.choice(len(points), size, replace=False))],
                                   dtype=np.float32)
        n = int(fraction * size)
        for method in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            coreset_indices(sub, n, proj_dim=sub.shape[1], seed=seed, method=method,
                            partitions=partitions)
            rows.append({"patches": size, "centres": n, "method": method,
                         "partitions": partitions,
                         "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
            log.info("coreset %s: %d -> %d in %.1f s", method, size, n, rows[-1]["wall_s"])
    return rows
