"""Feature-bank file format: the contract between the extract and score stages.

A bank for one backbone, category and split lives in ``<banks_dir>/<backbone>/<category>/``:

- ``<split>.npz`` — key ``features``: (N, h, w, C) float16 patch embeddings, one grid per image;
- ``<split>.csv`` — one row per image in the same order, columns :data:`META_COLUMNS`;
- ``<split>.json`` — the fingerprint: everything that changes the bank's content.

The JSON is written last, so a bank is complete exactly when all three files exist and the
JSON parses; each file is written to a temporary name and renamed, so a killed run never leaves
a half-written bank that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbank.core.errors import BankError

log = logging.getLogger(__name__)

BANK_FORMAT = 1
SPLITS = ("train", "test")
META_COLUMNS = ["path", "category", "split", "defect_type", "label", "mask_path", "height", "width"]
#: Fingerprint keys that differ between the train and test bank of one configuration.
PER_SPLIT_KEYS = ("split", "files_hash", "n_images")


@dataclass
class Bank:
    """A loaded bank: features (N, h, w, C), per-image metadata, and the fingerprint."""

    features: np.ndarray
    meta: pd.DataFrame
    fingerprint: dict[str, Any]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])


@dataclass(frozen=True)
class BankPaths:
    """The three files of one bank."""

    npz: Path
    csv: Path
    json: Path

    @classmethod
    def of(cls, banks_dir: Path, backbone: str, category: str, split: str) -> BankPaths:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = Path(banks_dir) / backbone / category
        return cls(folder / f"{split}.npz", folder / f"{split}.csv", folder / f"{split}.json")

    def exists(self) -> bool:
        return self.npz.is_file() and self.csv.is_file() and self.json.is_file()


def config_of(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint shared by the train and test banks of one configuration."""
    return {k: v for k, v in fingerprint.items() if k not in PER_SPLIT_KEYS}


def fingerprint_diff(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable ``key: found != expected`` for every key whose value differs."""
    keys = sorted(set(found) | set(expected))
    return [
        f"{k}: {found.get(k)!r} != {expected.get(k)!r}"
        for k in keys
        if _jsonable(found.get(k)) != _jsonable(expected.get(k))
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def read_fingerprint(paths: BankPaths) -> dict[str, Any] | None:
    """The stored fingerprint, or None when the bank is absent or incomplete."""
    if not paths.exists():
        return None
    try:
        return json.loads(paths.json.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bank_status(paths: BankPaths, fingerprint: Mapping[str, Any]) -> str:
    """``"missing"``, ``"stale"`` (complete, other fingerprint) or ``"complete"``."""
    found = read_fingerprint(paths)
    if found is None:
        return "missing"
    return "complete" if not fingerprint_diff(found, fingerprint) else "stale"


def sweep_temporaries(folder: Path, pattern: str) -> None:
    """Remove temporary files ``<folder>/<pattern>`` left by killed runs.

    The pattern's ``*`` is the writer's process id; files of processes still running are kept.
    """
    for leftover in Path(folder).glob(pattern):
        pid = leftover.name.split(".")[pattern.split(".").index("*")]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            leftover.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


class BankWriter:
    """Stream features into a bank without holding the dataset in memory.

    Features go straight into the ``features.npy`` member of a temporary ``.npz`` (stored, not
    compressed: float16 features hardly compress), in row order; batches that arrive early wait
    in memory for the rows before them. :meth:`commit` writes the CSV and the fingerprint, each
    through a temporary file and an atomic rename. If the writer is closed without commit (an
    exception, a kill), the temporary files are removed and any previous bank at that place is
    left as it was.
    """

    def __init__(self, paths: BankPaths, n: int, grid: tuple[int, int], channels: int) -> None:
        self.paths = paths
        paths.npz.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(paths.npz.parent, f".{paths.npz.stem}.*.npz")
        self._tmp_npz = paths.npz.with_name(f".{paths.npz.stem}.{os.getpid()}.npz")
        self._shape = (n, *grid, channels)
        self._zip = zipfile.ZipFile(self._tmp_npz, "w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self._stream = self._zip.open("features.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(
            self._stream, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                           "shape": self._shape})
        self._next = 0  # rows before this one are written
        self._early: dict[int, np.ndarray] = {}  # first row -> batch waiting for earlier rows

    def write(self, indices: np.ndarray, features: np.ndarray) -> None:
        """Store (B, h, w, C) features for the images at ``indices`` (consecutive rows)."""
        indices = np.asarray(indices)
        if len(indices) == 0:
            return
        start = int(indices[0])
        if not np.array_equal(indices, np.arange(start, start + len(indices))) or \
                features.shape != (len(indices), *self._shape[1:]):
            raise ValueError(f"expected features {self._shape[1:]} for consecutive rows, got "
                             f"{features.shape} for rows {indices.tolist()}")
        self._early[start] = np.ascontiguousarray(features, dtype=np.float16)
        while self._next in self._early:
            batch = self._early.pop(self._next)
            self._stream.write(batch.data)
            self._next += len(batch)

    def commit(self, meta: pd.DataFrame, fingerprint: Mapping[str, Any]) -> None:
        """Finish the bank: every image must have been written."""
        n = self._shape[0]
        if self._next != n or self._early:
            missing = n - self._next - sum(len(b) for b in self._early.values())
            raise BankError(f"{self.paths.npz}: {missing} images were never written; re-run")
        if list(meta.columns) != META_COLUMNS or len(meta) != n:
            raise ValueError(f"meta must have columns {META_COLUMNS} and {n} rows")
        self._stream.close()
        self._zip.close()
        p = self.paths
        tmp_csv, tmp_json = (x.with_name(f".{x.name}.tmp") for x in (p.csv, p.json))
        meta.to_csv(tmp_csv, index=False)
        tmp_json.write_text(json.dumps(dict(fingerprint), indent=2, sort_keys=True))
        # The old fingerprint goes first: from here until the new one lands the bank reads as
        # incomplete, never as a complete bank with mismatched parts.
        p.json.unlink(missing_ok=True)
        os.replace(self._tmp_npz, p.npz)
        os.replace(tmp_csv, p.csv)
        os.replace(tmp_json, p.json)
        self.close()

    def close(self) -> None:
        """Drop temporary files (safe to call twice)."""
        self._early.clear()
        try:
            self._stream.close()
            self._zip.close()
        except (OSError, ValueError):
            pass  # already closed, or the disk failed: the file is removed anyway
        self._tmp_npz.unlink(missing_ok=True)
        for x in (self.paths.csv, self.paths.json):
            x.with_name(f".{x.name}.tmp").unlink(missing_ok=True)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_bank(
    banks_dir: Path,
    backbone: str,
    category: str,
    split: str,
    expect: Mapping[str, Any] | None = None,
) -> Bank:
    """Load one bank; with ``expect``, refuse it unless those fingerprint entries match."""
    paths = BankPaths.of(banks_dir, backbone, category, split)
    fingerprint = read_fingerprint(paths)
    if fingerprint is None:
        raise BankError(
            f"{paths.npz}: no complete {split} bank for {backbone}/{category}; run "
            f"`python scripts/extract.py --backbone {backbone} --category {category}` first"
        )
    if expect is not None:
        diff = fingerprint_diff({k: fingerprint.get(k) for k in expect}, expect)
        if diff:
            raise BankError(
                f"{paths.json}: bank was built with another configuration ({'; '.join(diff)}); "
                "re-extract it with the expected settings or point --banks-dir elsewhere"
            )
    try:
        with np.load(paths.npz) as npz:
            features = npz["features"]
        meta = pd.read_csv(paths.csv, keep_default_na=False, dtype={"mask_path": str})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise BankError(
            f"{paths.npz}: unreadable bank ({err}); re-run extract with --overwrite"
        ) from None
    if list(meta.columns) != META_COLUMNS or len(meta) != len(features):
        raise BankError(
            f"{paths.csv}: does not match {paths.npz.name} ({len(meta)} rows vs "
            f"{len(features)} grids); re-run extract with --overwrite"
        )
    return Bank(features=features, meta=meta, fingerprint=fingerprint)


def load_pair(banks_dir: Path, backbone: str, category: str) -> tuple[Bank, Bank]:
    """Train and test banks of one category, refused unless built with one configuration."""
    train = load_bank(banks_dir, backbone, category, "train")
    test = load_bank(banks_dir, backbone, category, "test")
    diff = fingerprint_diff(config_of(test.fingerprint), config_of(train.fingerprint))
    if diff:
        raise BankError(
            f"{BankPaths.of(banks_dir, backbone, category, 'test').json}: test bank was built "
            f"differently from the train bank ({'; '.join(diff)}); re-extract both"
        )
    return train, test
