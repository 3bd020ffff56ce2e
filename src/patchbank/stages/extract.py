"""Extract stage: images -> cached feature banks (format: :mod:`patchbank.store.banks`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from patchbank import __version__
from patchbank.core.atomic import file_lock, sweep_stale_temporaries
from patchbank.core.device import resolve_device
from patchbank.core.errors import ITEM_ERRORS, DatasetError, PartialFailure
from patchbank.data.mvtec import (
    ImageDataset,
    Sample,
    discover,
    files_hash,
    header_size,
)
from patchbank.features.augment import AUGMENT_COLUMNS, Augmenter
from patchbank.features.extractors import ExtractorInfo, FeatureExtractor, build_extractor
from patchbank.features.preprocess import Preprocess
from patchbank.features.spec import ExtractSpec
from patchbank.store.banks import (
    BANK_FORMAT,
    META_COLUMNS,
    SPLITS,
    BankPaths,
    BankWriter,
    bank_status,
)
from patchbank.store.imagecache import CacheWriter, ImageCache
from patchbank.store.records import BankFingerprint

log = logging.getLogger(__name__)

#: Folder under the banks directory that holds the decoded-image cache.
IMAGE_CACHE_DIR = "_imagecache"


@dataclass(frozen=True)
class ExtractConfig:
    """How to run an extraction: the :class:`ExtractSpec` (what the banks hold) plus run-time
    options that do not change a bank's content."""

    spec: ExtractSpec
    batch_size: int = 16
    num_workers: int | None = None
    device: str = "auto"
    image_cache: bool = True


def fingerprint(spec: ExtractSpec, info: ExtractorInfo, preprocess: Preprocess,
                samples: Sequence[Sample], root: Path, category: str,
                split: str) -> dict[str, Any]:
    """Everything that changes a bank's content; stored beside it and compared on re-runs
    (a :class:`~patchbank.store.records.BankFingerprint` as its JSON object)."""
    return BankFingerprint(
        format=BANK_FORMAT,
        patchbank_version=__version__,
        tag=spec.tag(),
        spec=spec.canonical(),
        backbone=info.backbone,
        model_id=info.model_id,
        weights=info.weights_id,
        layers=list(info.layers),
        image_size=preprocess.image_size,
        crop=preprocess.crop,
        mean=[round(float(m), 6) for m in preprocess.mean],
        std=[round(float(s), 6) for s in preprocess.std],
        taps=[{"layer": layer, "shape": list(shape)}
              for layer, shape in zip(info.layers, info.tap_shapes, strict=True)],
        dtype="float16",
        category=category,
        split=split,
        files_hash=files_hash(samples, root),
        # an augmented train bank also holds spec.augment copies of every image
        n_images=len(samples) * (1 + (spec.augment if split == "train" else 0)),
    ).to_json()


def metadata(samples: Sequence[Sample], augmenter: Augmenter | None = None) -> pd.DataFrame:
    """The bank's CSV: one row per image, original sizes read from image headers. With
    ``augmenter``, each image's row is followed by one row per augmented copy (same path) and
    the columns ``augment`` (0 for the image, k for its k-th copy) and ``augment_of`` (the row
    of the image it was made from) are added."""
    rows = []
    for s in samples:
        width, height = header_size(s.path)
        row = [str(s.path), s.category, s.split, s.defect_type, s.label,
               str(s.mask_path) if s.mask_path else "", height, width]
        rows.extend([row] * (1 + (augmenter.n if augmenter is not None else 0)))
    meta = pd.DataFrame(rows, columns=META_COLUMNS)
    if augmenter is not None:
        for column, values in augmenter.meta_columns(len(samples)).items():
            meta[column] = values
        meta = meta[META_COLUMNS + AUGMENT_COLUMNS]
    return meta


def _features(model: FeatureExtractor, preprocess: Preprocess, batches: Iterator,
              device: torch.device, writer: BankWriter, cache: CacheWriter | None,
              augmenter: Augmenter | None = None) -> None:
    """Run the model over ``batches`` of (uint8 pixels, indices) and stream the grids to disk.

    Saving runs on one background thread while the next batch goes through the model (large
    banks are disk-bound: resnet18's 56x56x448 grids are 2.8 MB per image); at most one batch
    waits, so memory does not grow with the dataset. With ``augmenter`` each batch is expanded
    to the images and their copies (bank rows interleaved, see :class:`Augmenter`) and run
    through the model in chunks of the batch size; the cache gets the originals only.
    """
    amp = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext())

    def save(idx: np.ndarray, pixels: np.ndarray, rows: np.ndarray,
             feats: list[np.ndarray]) -> None:
        if cache is not None:
            cache.write(idx, pixels)
        writer.write(rows, feats)

    saving: Future | None = None
    with torch.inference_mode(), ThreadPoolExecutor(1, "patchbank-save") as pool:
        while True:
            try:
                pixels, idx = next(batches)
            except StopIteration:
                break
            except DatasetError as err:
                # Re-raised from a DataLoader worker with its traceback appended: keep the line
                # that names the file, without the "patchbank.core.errors.DatasetError: " the
                # traceback puts before it.
                raise DatasetError(worker_message(str(err))) from None
            rows, model_pixels = idx.numpy(), pixels
            if augmenter is not None:
                expanded, rows = augmenter.expand(pixels.numpy(), idx.numpy())
                model_pixels = torch.from_numpy(expanded)
            chunks = []
            for start in range(0, len(model_pixels), max(len(pixels), 1)):
                chunk = model_pixels[start:start + max(len(pixels), 1)]
                # uint8 crosses to the device; crop and normalisation happen there.
                images = preprocess.batch(chunk.to(device, non_blocking=True))
                with amp:
                    out = model.grids(images)
                # each tap (B, C, h, w) -> (B, h, w, C) float16 on the device: only the bank's
                # bytes cross.
                chunks.append([t.half().permute(0, 2, 3, 1).contiguous().cpu().numpy()
                               for t in out])
            feats = chunks[0] if len(chunks) == 1 else \
                [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
            if saving is not None:
                saving.result()
            saving = pool.submit(save, idx.numpy(), pixels.numpy(), rows, feats)
        if saving is not None:
            saving.result()


_CLASS_PREFIX = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): ")


def worker_message(text: str) -> str:
    """The one-line message of an error re-raised from a DataLoader worker (the last line of the
    worker's traceback, without its ``module.ClassName: `` prefix)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else text.strip()
    return _CLASS_PREFIX.sub("", last, count=1)


def _cached_batches(pixels: np.ndarray, batch_size: int) -> Iterator:
    """Batches of (uint8 pixels, indices) read from a memory-mapped image cache."""
    for start in range(0, len(pixels), batch_size):
        stop = min(start + batch_size, len(pixels))
        yield torch.from_numpy(np.array(pixels[start:stop])), torch.arange(start, stop)


def default_workers() -> int:
    """DataLoader workers: decode overlaps the forward pass, one core kept for the model."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Extractor:
    """Builds the backbone once and extracts banks for any number of categories."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self.spec = spec = config.spec.resolved()
        self.device = resolve_device(config.device)
        size = spec.image_size
        # Images are resized to ``size``, then centre-cropped: the model sees ``crop`` pixels.
        self.model, self.info = build_extractor(
            spec.backbone, weights=spec.weights, layers=spec.layers,
            image_size=spec.crop or size, device=str(self.device),
            normalize=None if spec.normalize == "model" else spec.normalize,
        )
        self.preprocess = Preprocess(size, self.info.mean, self.info.std, crop=spec.crop)
        self.augmenter = Augmenter(spec.augment, spec.augment_ops) if spec.augment else None
        log.info("%s: weights %s, layers %s, %d px (crop %s) -> taps %s", self.info.backbone,
                 self.info.weights_id, self.info.layers, size, spec.crop, self.info.tap_shapes)

    def run(self, data_root: Path, category: str, banks_dir: Path,
            overwrite: bool = False) -> dict[str, str]:
        """Extract train and test banks of one category; returns split -> what happened."""
        data_root, banks_dir = Path(data_root), Path(banks_dir)
        done = {}
        for split in SPLITS:
            samples = discover(data_root, category, split)
            fp = fingerprint(self.spec, self.info, self.preprocess, samples, data_root,
                             category, split)
            paths = BankPaths.of(banks_dir, self.spec.backbone, self.spec.tag(), category, split)
            # One writer per bank: a second extraction of it waits, then finds it complete.
            with file_lock(paths.lock, on_wait=lambda p=paths: log.info(
                    "%s: another extraction is writing this bank; waiting", p.describe())):
                sweep_stale_temporaries(paths.folder)  # left by killed extractions
                done[split] = self._run_split(samples, paths, fp, data_root, banks_dir,
                                              f"{category}/{split}", overwrite)
        return done

    def _run_split(self, samples: Sequence[Sample], paths: BankPaths, fp: dict[str, Any],
                   data_root: Path, banks_dir: Path, desc: str, overwrite: bool) -> str:
        status, reasons = bank_status(paths, fp)
        if status == "complete" and not overwrite:
            log.info("%s: up to date, skipped", paths.describe())
            return "skipped"
        if status in ("stale", "broken"):
            log.warning("%s: %s (%s), rebuilding", paths.describe(), status, "; ".join(reasons))
        cache = (ImageCache.of(banks_dir / IMAGE_CACHE_DIR, data_root, samples,
                               self.preprocess.image_size) if self.config.image_cache else None)
        self._extract(samples, paths, fp, desc, cache)
        return {"stale": "rebuilt", "broken": "rebuilt",
                "complete": "overwritten"}.get(status, "built")

    def _extract(self, samples: Sequence[Sample], paths: BankPaths, fp: dict[str, Any],
                 desc: str, cache: ImageCache | None = None) -> None:
        """Write one bank; pixels come from ``cache`` when it holds them, else from the images
        (decoded in DataLoader workers), filling ``cache`` on the way."""
        pixels = cache.load() if cache is not None else None
        augmenter = self.augmenter if paths.split == "train" else None
        n_rows = augmenter.rows(len(samples)) if augmenter is not None else len(samples)
        if augmenter is not None:
            log.info("%s: adding %s per image", desc, augmenter.describe())
        threads = torch.get_num_threads()
        with ExitStack() as stack:
            stack.callback(torch.set_num_threads, threads)
            filling = None
            if pixels is not None:
                log.info("%s: resized images read from the cache %s", desc, cache.npy)
                batches = _cached_batches(pixels, self.config.batch_size)
                total = -(-len(samples) // self.config.batch_size)
            else:
                if cache is not None:
                    try:
                        filling = stack.enter_context(cache.writer())
                    except OSError as err:  # the cache only saves time
                        log.warning("%s: cannot write the image cache (%s); extracting without "
                                    "it", cache.npy, err)
                workers = self.config.num_workers if self.config.num_workers is not None else \
                    default_workers()
                loader = DataLoader(
                    ImageDataset(samples, self.preprocess.resize),
                    batch_size=self.config.batch_size, num_workers=workers,
                    pin_memory=self.device.type == "cuda", persistent_workers=False,
                    prefetch_factor=4 if workers else None,
                )
                total = len(loader)
                # Fork the workers while torch's OpenMP pool is single-threaded: forking a
                # process whose pool has several threads can deadlock the workers (GNU OpenMP).
                torch.set_num_threads(1)
                batches = iter(loader)
                torch.set_num_threads(threads)
            writer = stack.enter_context(
                BankWriter(paths, n_rows, self.info.layers, self.info.tap_shapes))
            _features(self.model, self.preprocess,
                      iter(tqdm(batches, total=total, desc=desc, unit="batch", leave=False)),
                      self.device, writer, filling, augmenter)
            if filling is not None:
                filling.commit()
            writer.commit(metadata(samples, augmenter), fp)
        log.info("%s: wrote %d images, taps %s", paths.describe(), n_rows,
                 self.info.tap_shapes)


def extract(data_root: Path, categories: Sequence[str], config: ExtractConfig, banks_dir: Path,
            overwrite: bool = False, *, fail_fast: bool = True) -> dict[str, dict[str, str]]:
    """Extract banks for every category with one backbone build.

    ``fail_fast=False`` goes on past a category that fails (a bad image, a full disk, memory)
    and then raises :class:`PartialFailure` with every failure, its ``result`` holding what
    the finished categories did.
    """
    extractor = Extractor(config)
    done: dict[str, dict[str, str]] = {}
    failures: list[tuple[str, BaseException]] = []
    for category in categories:
        try:
            done[category] = extractor.run(data_root, category, banks_dir, overwrite)
        except ITEM_ERRORS as err:
            if fail_fast:
                raise
            if len(categories) > 1:
                log.error("%s: extraction failed, going on with the other categories", category)
            failures.append((category, err))
    if failures:
        raise PartialFailure(failures, result=done, total=len(categories))
    return done

