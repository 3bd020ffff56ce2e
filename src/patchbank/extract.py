"""Extract stage: images -> cached feature banks (see :mod:`patchbank.banks` for the format)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from patchbank import __version__
from patchbank.backbones import ExtractorInfo, FeatureExtractor, build_extractor
from patchbank.banks import (
    BANK_FORMAT,
    META_COLUMNS,
    SPLITS,
    BankPaths,
    BankWriter,
    bank_status,
    fingerprint_diff,
    read_fingerprint,
)
from patchbank.data import (
    ImageDataset,
    Sample,
    discover,
    files_hash,
    header_size,
    make_transform,
)
from patchbank.device import resolve_device
from patchbank.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything the user chooses about extraction (the backbone half of the fingerprint)."""

    backbone: str
    weights: str = "hub"
    layers: tuple[int, ...] | None = None
    image_size: int | None = None
    crop: int | None = None
    normalize: str | None = None
    batch_size: int = 16
    num_workers: int | None = None
    device: str = "auto"


def fingerprint(info: ExtractorInfo, crop: int | None, samples: Sequence[Sample], root: Path,
                category: str, split: str) -> dict[str, Any]:
    """Everything that changes a bank's content; stored beside it and compared on re-runs."""
    return {
        "format": BANK_FORMAT,
        "patchbank_version": __version__,
        "backbone": info.backbone,
        "model_id": info.model_id,
        "weights": info.weights_id,
        "layers": list(info.layers),
        "image_size": info.image_size,
        "crop": crop,
        "mean": [round(float(m), 6) for m in info.mean],
        "std": [round(float(s), 6) for s in info.std],
        "grid": list(info.grid),
        "channels": info.channels,
        "dtype": "float16",
        "category": category,
        "split": split,
        "files_hash": files_hash(samples, root),
        "n_images": len(samples),
    }


def metadata(samples: Sequence[Sample]) -> pd.DataFrame:
    """The bank's CSV: one row per image, original sizes read from image headers."""
    rows = []
    for s in samples:
        width, height = header_size(s.path)
        rows.append([str(s.path), s.category, s.split, s.defect_type, s.label,
                     str(s.mask_path) if s.mask_path else "", height, width])
    return pd.DataFrame(rows, columns=META_COLUMNS)


def _features(model: FeatureExtractor, batches: Iterator, device: torch.device,
              writer: BankWriter) -> None:
    amp = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext())
    with torch.inference_mode():
        while True:
            try:
                images, idx = next(batches)
            except StopIteration:
                break
            except DatasetError as err:
                # Re-raised from a DataLoader worker with its traceback appended: keep the line
                # that names the file.
                raise DatasetError(str(err).strip().splitlines()[-1]) from None
            with amp:
                feats = model(images.to(device, non_blocking=True))
            # (B, C, h, w) -> (B, h, w, C); cast on the device so only float16 crosses to the host.
            writer.write(idx.numpy(), feats.permute(0, 2, 3, 1).half().cpu().numpy())


def default_workers() -> int:
    """DataLoader workers: decode overlaps the forward pass, one core kept for the model."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Extractor:
    """Builds the backbone once and extracts banks for any number of categories."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model, self.info = build_extractor(
            config.backbone, weights=config.weights, layers=config.layers,
            image_size=config.image_size, device=str(self.device), normalize=config.normalize,
        )
        self.transform = make_transform(self.info.image_size, self.info.mean, self.info.std,
                                        crop=config.crop)
        log.info("%s: weights %s, layers %s, %d px -> grid %s x %d channels", self.info.backbone,
                 self.info.weights_id, self.info.layers, self.info.image_size, self.info.grid,
                 self.info.channels)

    def run(self, data_root: Path, category: str, banks_dir: Path,
            overwrite: bool = False) -> dict[str, str]:
        """Extract train and test banks of one category; returns split -> what happened."""
        done = {}
        for split in SPLITS:
            samples = discover(data_root, category, split)
            fp = fingerprint(self.info, self.config.crop, samples, data_root, category, split)
            paths = BankPaths.of(banks_dir, self.config.backbone, category, split)
            status = bank_status(paths, fp)
            if status == "complete" and not overwrite:
                log.info("%s: up to date, skipped", paths.npz)
                done[split] = "skipped"
                continue
            if status == "stale":
                diff = fingerprint_diff(read_fingerprint(paths) or {}, fp)
                log.warning("%s: stale (%s), rebuilding", paths.npz, "; ".join(diff))
            self._extract(samples, paths, fp, f"{category}/{split}")
            done[split] = {"stale": "rebuilt", "complete": "overwritten"}.get(status, "built")
        return done

    def _extract(self, samples: Sequence[Sample], paths: BankPaths, fp: dict[str, Any],
                 desc: str) -> None:
        workers = self.config.num_workers if self.config.num_workers is not None else \
            default_workers()
        loader = DataLoader(
            ImageDataset(samples, self.transform), batch_size=self.config.batch_size,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        threads = torch.get_num_threads()
        try:
            # Fork the workers while torch's OpenMP pool is single-threaded: forking a process
            # whose pool has several threads can deadlock the workers (GNU OpenMP).
            torch.set_num_threads(1)
            batches = iter(tqdm(loader, desc=desc, unit="batch", leave=False))
            torch.set_num_threads(threads)
            with BankWriter(paths, len(samples), self.info.grid, self.info.channels) as writer:
                _features(self.model, batches, self.device, writer)
                writer.commit(metadata(samples), fp)
        finally:
            torch.set_num_threads(threads)
        log.info("%s: wrote %d grids %s x %d", paths.npz, len(samples), self.info.grid,
                 self.info.channels)


def extract(data_root: Path, categories: Sequence[str], config: ExtractConfig, banks_dir: Path,
            overwrite: bool = False) -> dict[str, dict[str, str]]:
    """Extract banks for every category with one backbone build."""
    extractor = Extractor(config)
    return {c: extractor.run(data_root, c, banks_dir, overwrite) for c in categories}

