"""Exact k-nearest-neighbour search with Faiss flat indexes, shared by every k-NN method; an
exact pruned 1-NN (:class:`PrunedIndex`) and an approximate inverted file (:class:`IVFIndex`).

Distances come back as true distances: L2 (the square root of Faiss's squared L2) or cosine
distance ``1 - cos`` (inner product of L2-normalised vectors). Queries are searched in chunks so
peak memory stays bounded; the index is cloned to a GPU when faiss-gpu sees one.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from patchbank.scorers.base import batches, resolve_device

log = logging.getLogger(__name__)

METRICS = ("l2", "cosine")
#: query vectors per search call (bounds the (chunk, k) result and Faiss's work buffers).
DEFAULT_CHUNK = 16384
_GPU_RESOURCES: Any = None


@functools.cache
def _faiss() -> ModuleType:
    """Import Faiss on first use, without its loader's INFO lines about CPU-feature builds."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def as_float32(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 2-D view/copy of ``x`` (last axis = vector dimension), as Faiss needs."""
    x = np.asarray(x)
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def faiss_gpu_available() -> bool:
    """True when this Faiss build has GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_resources() -> Any:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = _faiss().StandardGpuResources()
    return _GPU_RESOURCES


def _on_device(index: Any, device: str) -> Any:
    """``index`` cloned to the GPU ``device`` names when faiss-gpu sees one, else itself."""
    dev = resolve_device(device)
    if dev.startswith("cuda") and faiss_gpu_available():
        gpu_id = int(dev.split(":")[1]) if ":" in dev else 0
        return _faiss().index_cpu_to_gpu(_gpu_resources(), gpu_id, index)
    return index


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    x = np.array(x.reshape(-1, x.shape[-1]), dtype=np.float32, order="C", copy=True)
    _faiss().normalize_L2(x)  # in place, on our own copy
    return x


class FlatIndex:
    """Exact k-NN over a fixed database of vectors (M, D) with metric ``"l2"`` or ``"cosine"``."""

    def __init__(self, vectors: np.ndarray, metric: str = "l2", device: str = "auto") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        base = _normalized(vectors) if metric == "cosine" else as_float32(vectors)
        if len(base) == 0:
            raise ValueError("cannot build a k-NN index over zero vectors")
        faiss = _faiss()
        self.metric = metric
        self.dim = int(base.shape[1])
        cpu_index = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(
            self.dim)
        cpu_index.add(base)
        self.index: Any = _on_device(cpu_index, device)
        self.on_gpu = self.index is not cpu_index
        log.debug("flat %s index: %d x %d%s", metric, len(base), self.dim,
                  " on GPU" if self.on_gpu else "")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 1, chunk: int = DEFAULT_CHUNK,
               desc: str = "k-NN search") -> tuple[np.ndarray, np.ndarray]:
        """Distances (M, k) float32, ascending, and database indices (M, k) int64 of ``queries``.

        ``queries`` is any array whose last axis is the vector dimension (e.g. a test bank
        (N, h, w, C)); it is converted to float32 one chunk of ``chunk`` vectors at a time.
        """
        q = np.asarray(queries)
        if q.shape[-1] != self.dim:
            raise ValueError(f"query dimension {q.shape[-1]} != index dimension {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the {len(self)} indexed vectors")
        q = q.reshape(-1, self.dim)
        m = len(q)
        dist = np.empty((m, k), dtype=np.float32)
        idx = np.empty((m, k), dtype=np.int64)
        spans = list(batches(m, chunk))
        for lo, hi in tqdm(spans, desc=desc, unit="chunk", disable=len(spans) <= 1, leave=False):
            part = _normalized(q[lo:hi]) if self.metric == "cosine" else as_float32(q[lo:hi])
            d, i = self.index.search(part, k)
            if self.metric == "cosine":
                np.clip(np.subtract(1.0, d, out=d), 0.0, 2.0, out=d)
            else:
                np.sqrt(np.maximum(d, 0.0, out=d), out=d)
            dist[lo:hi], idx[lo:hi] = d, i
        return dist, idx


def knn(database: np.ndarray, queries: np.ndarray, k: int = 1, metric: str = "l2",
        chunk: int = DEFAULT_CHUNK, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One-shot exact k-NN: (distances (M, k) float32, indices (M, k) int64)."""
    return FlatIndex(database, metric, device).search(queries, k, chunk)


def pca_basis(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), projection (D, dims)) float32: the mean and top principal directions of
    ``vectors``, estimated on at most ~4096 evenly spaced rows."""
    base = as_float32(vectors)
    mean = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    sample = base[:: max(1, len(base) // 4096)] - mean
    _, vec = np.linalg.eigh((sample.T @ sample).astype(np.float64))
    return mean, np.ascontiguousarray(vec[:, ::-1][:, :min(dims, base.shape[1])],
                                      dtype=np.float32)


class PrunedIndex:
    """Exact L2 nearest neighbour (k = 1) with lower bounds from a PCA contraction (CPU).

    The database is split, around its mean, into its coordinates along the top ``dims``
    principal directions and the norm of the rest; ``|a - b|^2 >= |la - lb|^2 + (ra - rb)^2``
    for any two vectors (la, ra their parts). One small product gives that bound for every
    (query, entry) pair; the entry with the smallest bound gives an upper bound of the query's
    nearest distance; only entries whose bound (less a margin far above float32 rounding) is
    below it get an exact distance. On bottle's PatchCore memory bank (16,385 x 1024), 256
    directions leave ~9 candidates per test patch and take 0.43x the CPU time of the flat
    search. ``k`` > 1 uses a flat index, built on first use (it holds another copy).
    """

    def __init__(self, vectors: np.ndarray, dims: int = 256) -> None:
        base = as_float32(vectors)
        if len(base) == 0:
            raise ValueError("cannot build a k-NN index over zero vectors")
        self.base = base
        self.dim = int(base.shape[1])
        self._flat: FlatIndex | None = None
        self.mean, self.proj = pca_basis(base, dims)
        self.low = self._contract(base - self.mean)
        self.low_sq = np.einsum("ij,ij->i", self.low, self.low)
        #: margin of the bound test: float32 rounding of |a|^2 + |b|^2 - 2 a.b is far below it.
        self.slack = 1e-4 * float(self.low_sq.max())

    def __len__(self) -> int:
        return len(self.base)

    def _contract(self, centred: np.ndarray) -> np.ndarray:
        low = centred @ self.proj
        rest = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", low, low)
        return np.concatenate([low, np.sqrt(np.maximum(rest, 0.0))[:, None]], axis=1)

    def search(self, queries: np.ndarray, k: int = 1, chunk: int = 1024,
               desc: str = "k-NN search") -> tuple[np.ndarray, np.ndarray]:
        if k != 1:
            if self._flat is None:  # built on first use only: it holds another copy
                self._flat = FlatIndex(self.base, "l2", "cpu")
            return self._flat.search(queries, k, desc=desc)
        q = np.asarray(queries)
        if q.shape[-1] != self.dim:
            raise ValueError(f"query dimension {q.shape[-1]} != index dimension {self.dim}")
        q = q.reshape(-1, self.dim)
        dist = np.empty((len(q), 1), dtype=np.float32)
        idx = np.empty((len(q), 1), dtype=np.int64)
        for lo, hi in batches(len(q), min(chunk, 1024)):  # a (chunk, entries) bound matrix
            part = as_float32(q[lo:hi])
            low = self._contract(part - self.mean)
            bound = self.low_sq[None] - 2.0 * (low @ self.low.T)
            bound += np.einsum("ij,ij->i", low, low)[:, None]
            first = bound.argmin(axis=1)
            best = np.einsum("ij,ij->i", part - self.base[first], part - self.base[first])
            cand = bound <= (best + self.slack)[:, None]
            for i in range(hi - lo):
                cols = np.flatnonzero(cand[i])
                diff = self.base[cols] - part[i]
                d = np.einsum("ij,ij->i", diff, diff)
                j = int(d.argmin())
                dist[lo + i, 0], idx[lo + i, 0] = d[j], cols[j]
        np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
        return dist, idx


def kmeans_centroids(vectors: np.ndarray, n: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """(n, D) float32 k-means centroids of ``vectors`` (Faiss, seeded)."""
    base = as_float32(vectors)
    n = max(1, min(int(n), len(base)))
    km = _faiss().Kmeans(base.shape[1], n, niter=iters, seed=int(seed), verbose=False,
                         max_points_per_centroid=256)
    km.train(base)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


class IVFIndex:
    """Approximate L2 k-NN: an inverted file over given k-means ``centroids`` (Faiss
    ``IndexIVFFlat``); a query is compared with the entries of its ``nprobe`` nearest cells
    only, so a neighbour outside them is missed and its distance comes out larger.

    With ``proj`` (D, d) and ``mean``, cells and search live in that d-dimensional projection
    (``centroids`` are in it too) and the ``rerank`` best candidates there get their exact
    D-dimensional distance. Returned distances are always exact distances to the entries
    returned. The centroids and projection are part of a fitted state, so a reloaded model
    searches the same cells."""

    def __init__(self, vectors: np.ndarray, centroids: np.ndarray, nprobe: int = 1,
                 device: str = "auto", proj: np.ndarray | None = None,
                 mean: np.ndarray | None = None, rerank: int = 4) -> None:
        base = as_float32(vectors)
        cells = as_float32(centroids)
        if len(base) == 0 or len(cells) == 0:
            raise ValueError("cannot build an IVF index over zero vectors or zero cells")
        self.base, self.dim = base, int(base.shape[1])
        self.proj = None if proj is None else as_float32(proj)
        self.mean = np.zeros(self.dim, np.float32) if mean is None else as_float32(mean)[0]
        self.rerank = max(1, int(rerank))
        low = base if self.proj is None else self._project(base)
        if cells.shape[1] != low.shape[1]:
            raise ValueError(f"centroid dimension {cells.shape[1]} != search dimension "
                             f"{low.shape[1]}")
        index = self._build(low, cells)
        sizes = np.array([index.invlists.list_size(i) for i in range(len(cells))])
        if not sizes.all():  # a cell nobody falls in would leave its queries no neighbour
            index = self._build(low, cells[sizes > 0])
        index.nprobe = max(1, min(int(nprobe), index.nlist))
        self.index: Any = _on_device(index, device)
        log.debug("IVF index: %d x %d in %d cells, nprobe %d", len(base), low.shape[1],
                  index.nlist, index.nprobe)

    def _project(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.proj)

    def _build(self, low: np.ndarray, cells: np.ndarray) -> Any:
        faiss = _faiss()
        self._quantizer = faiss.IndexFlatL2(low.shape[1])  # the IVF index only borrows it
        self._quantizer.add(cells)
        index = faiss.IndexIVFFlat(self._quantizer, low.shape[1], len(cells), faiss.METRIC_L2)
        index.is_trained = True
        index.add(low)
        return index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 1, chunk: int = DEFAULT_CHUNK,
               desc: str = "k-NN search") -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`FlatIndex.search` (L2 distances); a query whose cells hold fewer than
        ``k`` entries gets index -1 and distance inf for the missing ones."""
        q = np.asarray(queries)
        if q.shape[-1] != self.dim:
            raise ValueError(f"query dimension {q.shape[-1]} != index dimension {self.dim}")
        q = q.reshape(-1, self.dim)
        dist = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for lo, hi in batches(len(q), chunk):
            part = as_float32(q[lo:hi])
            if self.proj is None:
                d, i = self.index.search(part, k)
            else:
                d, i = self._reranked(part, k)
            d[i < 0] = np.inf
            np.sqrt(np.maximum(d, 0.0, out=d), out=d)
            dist[lo:hi], idx[lo:hi] = d, i
        return dist, idx

    def _reranked(self, part: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared exact distances of the best ``max(k, rerank)`` candidates of the projected
        search, the ``k`` smallest first."""
        _, cand = self.index.search(self._project(part), max(k, self.rerank))
        faiss = _faiss()
        d = np.empty(cand.shape, dtype=np.float32)
        ids = np.ascontiguousarray(np.maximum(cand, 0), dtype=np.int64)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(d), faiss.swig_ptr(part),
                                faiss.swig_ptr(self.base), faiss.swig_ptr(ids), self.dim,
                                len(part), cand.shape[1])  # no gathered copy of the rows
        d[cand < 0] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)
