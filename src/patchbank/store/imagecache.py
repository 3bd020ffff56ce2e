"""Decoded-image cache: resized 8-bit pixels shared by every backbone that uses one image size.

Decoding a 900x900 PNG costs more CPU than a light CNN's forward pass, so the extract stage
stores the resized pixels of each split once and later extractions (another backbone, other
layers, another normalisation) read them instead of the PNGs:

- ``<cache_dir>/<category>/<split>-<size>px.npy`` — (N, S, S, 3) uint8 RGB, bilinear antialiased
  resize of each image without crop, in the bank's row order;
- ``<cache_dir>/<category>/<split>-<size>px.json`` — the key: image size, resize method, format,
  the images' relative paths in order and a hash of their sizes and mtimes.

The JSON is written last and both files go through a temporary name and a rename
(:mod:`patchbank.core.atomic`), so a killed run leaves no cache that looks complete; a cache whose
key differs is rebuilt, never reused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from patchbank.core.atomic import AtomicFile, preallocate, sweep_stale_temporaries
from patchbank.data.mvtec import Sample, files_hash, relative_path
from patchbank.store.banks import fingerprint_diff

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
RESIZE = "PIL bilinear antialias, no crop"


def cache_key(samples: Sequence[Sample], root: Path, image_size: int) -> dict[str, Any]:
    """Everything that changes the cached pixels of one split."""
    return {
        "format": CACHE_FORMAT,
        "image_size": int(image_size),
        "resize": RESIZE,
        "paths": [relative_path(s.path, root) for s in samples],
        "files_hash": files_hash(samples, root, masks=False),
    }


@dataclass(frozen=True)
class ImageCache:
    """The cached pixels of one split at one image size, and the key they must match."""

    npy: Path
    json: Path
    key: Mapping[str, Any]

    @classmethod
    def of(cls, cache_dir: Path, root: Path, samples: Sequence[Sample], image_size: int
           ) -> ImageCache:
        """The cache for ``samples`` (one category and split, in bank order) under ``cache_dir``."""
        first = samples[0]
        stem = Path(cache_dir) / first.category / f"{first.split}-{int(image_size)}px"
        return cls(stem.with_suffix(".npy"), stem.with_suffix(".json"),
                   cache_key(samples, root, image_size))

    def load(self) -> np.ndarray | None:
        """The pixels (memory-mapped) if a complete cache with this key exists, else None."""
        key = self.key
        if not self.json.is_file():
            return None
        try:
            found = json.loads(self.json.read_text())
            pixels = np.load(self.npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            log.warning("%s: unreadable image cache (%s), rebuilding", self.npy, err)
            return None
        size = int(key["image_size"])
        if not isinstance(found, dict) or fingerprint_diff(found, key):
            log.info("%s: image cache is stale (dataset or settings changed), rebuilding",
                     self.npy)
            return None
        if pixels.dtype != np.uint8 or pixels.shape != (len(key["paths"]), size, size, 3):
            log.warning("%s: image cache has shape %s, rebuilding", self.npy, pixels.shape)
            return None
        return pixels

    def writer(self) -> CacheWriter:
        """A writer that fills this cache; see :class:`CacheWriter`."""
        return CacheWriter(self)


class CacheWriter:
    """Fill a cache batch by batch through a temporary ``.npy``; see :meth:`commit`.

    The file is written with ordinary buffered writes (header, then rows at their offsets),
    never through a memory map: on a full disk a memory-mapped write kills the process with
    SIGBUS, a buffered one raises ``OSError(ENOSPC)``. The whole file is reserved up front
    (:func:`~patchbank.core.atomic.preallocate`). The cache only saves time, so a failing disk
    never fails the extraction: the writer logs a warning, drops its temporary and ignores the
    remaining batches (the bank, written next, reports a full disk itself).
    """

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        n, image_size = len(cache.key["paths"]), int(cache.key["image_size"])
        self._shape = (image_size, image_size, 3)
        self._row = image_size * image_size * 3
        self._filled = np.zeros(n, dtype=bool)
        self.failed = False
        self._f: IO[bytes] | None = None
        cache.npy.parent.mkdir(parents=True, exist_ok=True)
        # temporaries of dead writers, and of writers before patchbank.core.atomic (by age)
        sweep_stale_temporaries(cache.npy.parent, extra_patterns=[f".{cache.npy.stem}.*.npy"])
        self._npy = AtomicFile(cache.npy)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                     "shape": (n, *self._shape)})
        self._offset = len(header.getvalue())
        try:
            self._f = open(self._npy.tmp, "wb")
            preallocate(self._f, self._offset + n * self._row, cache.npy)
            self._f.write(header.getvalue())
        except OSError as err:
            self._fail(err)
        except BaseException:
            self.close()
            raise

    def _fail(self, err: OSError) -> None:
        log.warning("%s: cannot write the image cache (%s); extracting without it",
                    self.cache.npy, err.strerror or err)
        self.failed = True
        self.close()

    def write(self, indices: np.ndarray, pixels: np.ndarray) -> None:
        """Store (B, S, S, 3) uint8 pixels of the images at ``indices``."""
        if self.failed:
            return
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.shape != (len(indices), *self._shape):
            raise ValueError(f"expected pixels ({len(indices)}, {self._shape}), got "
                             f"{pixels.shape}")
        if len(indices) == 0:
            return
        try:
            start = int(indices[0])
            if np.array_equal(indices, np.arange(start, start + len(indices))):
                self._f.seek(self._offset + start * self._row)
                self._f.write(pixels.data)
            else:
                for i, row in zip(indices, pixels, strict=True):
                    self._f.seek(self._offset + int(i) * self._row)
                    self._f.write(row.data)
        except OSError as err:
            self._fail(err)
            return
        self._filled[indices] = True

    def commit(self) -> None:
        """Publish the cache (pixels first, key last); incomplete writers publish nothing."""
        if self.failed or not self._filled.all():
            self.close()
            return
        try:
            self._f.close()
            with AtomicFile(self.cache.json) as key:
                key.tmp.write_text(json.dumps(dict(self.cache.key)))
                self.cache.json.unlink(missing_ok=True)
                self._npy.commit()
                key.commit()
        except OSError as err:  # the cache only saves time: never fail the extraction over it
            self._fail(err)
            return
        log.info("%s: cached %d resized images", self.cache.npy, len(self._filled))

    def close(self) -> None:
        """Drop the temporary file (safe to call twice; a no-op after commit)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
        self._npy.discard()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
