"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

The selection is the exact greedy: each step adds the point farthest from its nearest chosen
centre (first index on ties), from an optional initial distance per point. Methods:

* "pruned" (the CPU default): points live in blocks of at most ``LEAF`` points, the leaves of
  a k-d tree on a PCA contraction of the points (top ``PCA_DIMS`` principal coordinates plus
  the norm of the rest: a 1-Lipschitz map, so contracted distances are lower bounds). Each
  block keeps an upper bound of its max min-distance and is updated lazily, only when it holds
  the largest bound, with the centres added since its last update; centres whose lower bound
  to the block's box (or to a point) cannot beat the current min-distance are skipped, the
  rest get exact float64 distances. Bounds are compared with a margin far above float32
  rounding, so the picks are exactly the float64 greedy's.
* "lazy": the same lazy block updates on consecutive blocks, no pruning (the reference the
  tests compare "pruned" with; about 2x slower).
* "dense": one matrix-vector product per step, no host synchronisation (the CUDA default).

On bottle (163,856 x 128 projected points, 16,385 centres) "pruned" takes 11 s on one core
here, "lazy" 22 s (2 threads); see the README's coreset benchmark for 50k-600k points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

#: points per block of method "lazy".
BLOCK = 1024
METHODS = ("auto", "pruned", "lazy", "dense")
PROJECTIONS = ("uniform", "gaussian")

#: relative and (times the largest squared norm) absolute slack of the pruning test: far above
#: float64 rounding of the distances, far below anything that changes which blocks are pruned.
_REL_SLACK = 1e-9
_ABS_SLACK = 1e-12


def greedy_kcenter(points: np.ndarray, n: int, start: int | None = None, device: str = "cpu",
                   method: str = "auto", block: int | None = None, progress: bool = True,
                   dtype: torch.dtype = torch.float64,
                   init: np.ndarray | None = None) -> np.ndarray:
    """Exact greedy k-center: ``n`` indices, each the point with the largest Euclidean distance
    to its nearest chosen centre (first index on ties).

    ``init`` (M,) optional initial distances (e.g. PatchCore's mean distance to random anchor
    points, which are not centres): a point's distance is ``min(init, distance to the centres)``.
    The first index is ``start`` if given, else the argmax of ``init`` (one of them is needed).

    ``method`` (see the module doc): "auto" is "pruned" on the CPU and "dense" on a GPU.
    Distances are computed in ``dtype`` (float64: near-ties are resolved like a float64
    reference would).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = torch.tensor(np.asarray(points), dtype=dtype, device=device)  # own copy, centred below
    m = len(x)
    if start is None and init is None:
        raise ValueError("need a start index or initial distances")
    if not 1 <= n <= m or not (start is None or 0 <= start < m):
        raise ValueError(f"need 1 <= n <= {m} and 0 <= start < {m}, got n={n}, start={start}")
    mind0 = None
    if init is not None:
        init64 = np.asarray(init, dtype=np.float64)
        if init64.shape != (m,):
            raise ValueError(f"init must have shape ({m},), got {init64.shape}")
        if start is None:
            start = int(np.argmax(init64))
        mind0 = torch.tensor(init64, dtype=dtype, device=device).square_()
    if method == "auto":
        method = "pruned" if device == "cpu" else "dense"
    x -= x.mean(dim=0)  # smaller norms, less rounding in |x|^2 + |c|^2 - 2 x.c
    sq = x.square().sum(dim=1)
    bar = tqdm(total=n, desc="coreset", unit="centre", disable=not progress, mininterval=0.5,
               leave=False)
    try:
        if method == "pruned":
            with threadpool_limits(1, "blas"):  # small products: threads only add overhead
                return _greedy_pruned(x.cpu().numpy(), sq.cpu().numpy(), n, start,
                                      None if mind0 is None else mind0.cpu().numpy(),
                                      block or LEAF, bar)
        if method == "lazy":
            return _greedy_lazy(x.cpu(), sq.cpu(), n, start,
                                None if mind0 is None else mind0.cpu(), block or BLOCK, bar)
        return _greedy_dense(x, sq, n, start, mind0, bar)
    finally:
        bar.close()


def _greedy_dense(x: torch.Tensor, sq: torch.Tensor, n: int, start: int,
                  mind0: torch.Tensor | None, bar: Any) -> np.ndarray:
    """One matrix-vector product per step; no host synchronisation (for GPUs)."""
    mind = torch.full_like(sq, math.inf) if mind0 is None else mind0.clone()
    d = torch.empty_like(sq)
    sel = torch.empty(n, dtype=torch.long, device=x.device)
    s = torch.tensor(start, device=x.device)
    for t in range(n):
        sel[t] = s
        torch.addmv(sq, x, x[s], alpha=-2.0, out=d)
        d.add_(sq[s]).clamp_(min=0.0)
        torch.minimum(mind, d, out=mind)
        s = torch.argmax(mind)
        bar.update(1)
    return sel.cpu().numpy()


def _greedy_lazy(x: torch.Tensor, sq: torch.Tensor, n: int, start: int,
                 mind0: torch.Tensor | None, block: int, bar: Any) -> np.ndarray:
    """Exact greedy with lazily updated blocks of points (CPU, patchbank <= 0.2's default)."""
    m, dim = x.shape
    starts = np.arange(0, m, block)
    ends = np.minimum(starts + block, m)
    nb = len(starts)
    centres = torch.empty((n, dim), dtype=x.dtype)
    csq = torch.empty(n, dtype=x.dtype)
    sel = np.empty(n, dtype=np.int64)
    ub = np.empty(nb)  # upper bound of each block's max min-distance (exact when done == t)
    arg = np.empty(nb, dtype=np.int64)  # index of the block's max when last updated
    done = np.ones(nb, dtype=np.int64)  # number of centres the block has seen
    sel[0], centres[0], csq[0] = start, x[start], sq[start]
    mind = torch.addmv(sq, x, x[start], alpha=-2.0).add_(sq[start]).clamp_(min=0.0)
    if mind0 is not None:
        torch.minimum(mind, mind0, out=mind)
    for b in range(nb):
        v, i = mind[starts[b]:ends[b]].max(dim=0)
        ub[b], arg[b] = float(v), starts[b] + int(i)
    bar.update(1)
    for t in range(1, n):
        while True:
            b = int(ub.argmax())
            if done[b] == t:
                break
            lo, hi, p = starts[b], ends[b], done[b]
            d = torch.addmm(csq[p:t], x[lo:hi], centres[p:t].T, alpha=-2.0)
            dmin = d.amin(dim=1).add_(sq[lo:hi]).clamp_(min=0.0)
            mb = mind[lo:hi]
            torch.minimum(mb, dmin, out=mb)
            v, i = mb.max(dim=0)
            ub[b], arg[b], done[b] = float(v), lo + int(i), t
        s = int(arg[b])
        sel[t], centres[t], csq[t] = s, x[s], sq[s]
        bar.update(1)
    return sel


#: principal components of the lower bounds of method "pruned" (tuned on 596,624 x 128
#: magnetic_tile points): one bound, or two (a cheap one for all pairs, then a tight one for
#: the pairs the first passes).
PCA_DIMS: tuple[int, ...] = (64,)
#: points per k-d tree leaf (block) of method "pruned".
LEAF = 128


def contract(x: np.ndarray, dims: tuple[int, ...]) -> list[np.ndarray]:
    """For each k in ``dims``: (M, k+1) float32, the coordinates of the centred ``x`` along its
    top-k principal directions (largest first), then the norm of the rest. Each is a 1-Lipschitz
    map: distances between contracted rows are lower bounds of the distances between the rows
    (to float32 rounding), tighter as k grows."""
    m, dim = x.shape
    sample = x[:: max(1, m // 100_000)]
    _, vec = np.linalg.eigh(sample.T @ sample)
    top = min(max(dims), dim)
    low = x @ vec[:, ::-1][:, :top]
    tail = (x * x).sum(axis=1) - np.einsum("ij,ij->i", low, low)  # |rest beyond top|^2
    out = []
    for k in sorted(dims, reverse=True):
        k = min(k, dim)
        tail += np.einsum("ij,ij->i", low[:, k:top], low[:, k:top])
        top = k
        out.append(np.concatenate([low[:, :k], np.sqrt(np.maximum(tail, 0.0))[:, None]],
                                  axis=1).astype(np.float32))
    return [out[sorted(dims, reverse=True).index(k)] for k in dims]


def kd_blocks(xt: np.ndarray, leaf: int) -> list[np.ndarray]:
    """Split the rows of ``xt`` into blocks of at most ``leaf`` rows (whole leaves on each side
    of every split) by a k-d tree: each split at the quantile of the widest coordinate; each
    block's indices ascending."""
    out: list[np.ndarray] = []
    stack = [np.arange(len(xt))]
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            out.append(np.sort(idx))
            continue
        pts = xt[idx]
        dim = int(np.argmax(pts.max(axis=0) - pts.min(axis=0)))
        half = -(-len(idx) // leaf) // 2 * leaf
        order = np.argpartition(pts[:, dim], half - 1)
        stack += [idx[order[half:]], idx[order[:half]]]
    return out


def _greedy_pruned(x: np.ndarray, sq: np.ndarray, n: int, start: int,
                   mind0: np.ndarray | None, leaf: int, bar: Any,
                   dims: tuple[int, ...] = PCA_DIMS) -> np.ndarray:
    """Exact greedy with lazy updates of k-d tree blocks and float32 lower bounds (numpy: its
    per-call overhead is a fraction of torch's, and the calls here are many and small).

    Points live in blocks of at most ``leaf`` points, the leaves of a k-d tree on their
    :func:`contract`-ed coordinates, each block with its bounding box there and an upper bound
    of its max min-distance, updated lazily as in :func:`_greedy_lazy`. A block's update with
    the centres added since its last one

    1. skips the centres whose contracted distance to the box is at least the block's bound;
    2. computes the cheap lower bound (``dims[0]`` components) of all (point, centre) pairs
       (one small float32 product), then the tight one (``dims[1]``) of the points and
       centres with a pair below the point's current min-distance;
    3. computes the exact float64 distances of the pairs still below.

    Bounds are compared with a margin ``slack`` far above their float32 rounding, so the picks
    are those of the float64 greedy (the same as :func:`_greedy_lazy`'s).
    """
    return _PrunedGreedy(x, sq, n, leaf, dims).run(start, mind0, bar)


def _augment(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[z, 1] for points, and |z|^2, so that [z, 1] . [-2 c, |c|^2] + |z|^2 = |z - c|^2."""
    return (np.concatenate([z, np.ones((len(z), 1), np.float32)], axis=1),
            np.einsum("ij,ij->i", z, z))


class _PrunedGreedy:
    """The state of :func:`_greedy_pruned`: points permuted into k-d blocks (``perm``), their
    contracted and augmented coordinates, the centres picked so far and each block's bounds."""

    def __init__(self, x: np.ndarray, sq: np.ndarray, n: int, leaf: int,
                 dims: tuple[int, ...]) -> None:
        m, dim = x.shape
        x1, x2 = contract(x, dims) if len(dims) == 2 else (contract(x, dims)[0], None)
        groups = kd_blocks(x1, leaf)
        self.perm = perm = np.concatenate(groups)
        sizes = np.array([len(g) for g in groups])
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.nb = nb = len(groups)
        self.xp, self.sqp, self.x1 = x[perm], sq[perm], x1[perm]
        self.box_lo = np.minimum.reduceat(self.x1, self.starts, axis=0)
        self.box_hi = np.maximum.reduceat(self.x1, self.starts, axis=0)
        self.slack = slack = 1e-4 * float(sq.max()) + 1e-30
        # compared with |c|^2 - 2 x.c: mind - |x|^2 + slack
        self.xa1, self.xsq1 = _augment(self.x1)
        self.off1 = (slack - self.xsq1).astype(np.float32)
        self.xa2: np.ndarray | None = None
        self.ca2: np.ndarray | None = None
        if x2 is not None:
            self.xa2, self.xsq2 = _augment(x2[perm])
            self.off2 = slack - self.xsq2
            self.ca2 = np.empty((n, x2.shape[1] + 1), dtype=np.float32)
            del x2
        self.n = n
        self.centres = np.empty((n, dim), dtype=x.dtype)
        self.csq = np.empty(n, dtype=x.dtype)
        self.c1 = np.empty((n, self.x1.shape[1]), dtype=np.float32)
        self.ca1 = np.empty((n, self.x1.shape[1] + 1), dtype=np.float32)
        self.sel = np.empty(n, dtype=np.int64)
        # upper bound of each block's max min-distance (exact when done == t)
        self.ub = np.empty(nb)
        self.arg = np.empty(nb, dtype=np.int64)  # position of the block's max when last updated
        self.done = np.ones(nb, dtype=np.int64)  # number of centres the block has seen
        self.inv = np.empty(m, dtype=np.int64)
        self.inv[perm] = np.arange(m)
        self.mind = np.empty(0)

    def add(self, t: int, s: int) -> None:
        """Make original point ``s`` centre ``t``."""
        self.sel[t] = s
        i = self.inv[s]
        self.centres[t], self.csq[t], self.c1[t] = self.xp[i], self.sqp[i], self.x1[i]
        self.ca1[t, :-1], self.ca1[t, -1] = -2.0 * self.x1[i], self.xsq1[i]
        if self.ca2 is not None:
            assert self.xa2 is not None
            self.ca2[t, :-1], self.ca2[t, -1] = -2.0 * self.xa2[i, :-1], self.xsq2[i]

    def _candidates(self, b: int, t: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(block rows, centres) of the pairs that pass the box and lower-bound tests."""
        lo, hi, p = self.starts[b], self.ends[b], self.done[b]
        pend = self.c1[p:t]
        g = np.maximum(np.maximum(self.box_lo[b] - pend, pend - self.box_hi[b]), 0.0)
        rel = np.flatnonzero(np.einsum("ij,ij->i", g, g) < self.ub[b] + self.slack)
        if len(rel) == 0:
            return None
        rel += p
        mb = self.mind[lo:hi]
        near = self.xa1[lo:hi] @ self.ca1[rel].T < (mb.astype(np.float32)
                                                    + self.off1[lo:hi])[:, None]
        ri, cj = np.nonzero(near)
        if len(ri) == 0:
            return None
        cj = rel[cj]
        if self.xa2 is not None:  # the tight bound of these pairs
            assert self.ca2 is not None
            tight = (np.einsum("ij,ij->i", self.xa2[lo + ri], self.ca2[cj])
                     < mb[ri] + self.off2[lo + ri])
            ri, cj = ri[tight], cj[tight]
            if len(ri) == 0:
                return None
        return ri, cj

    def update(self, b: int, t: int) -> None:
        """Bring block ``b`` up to date with centres ``done[b]..t-1``."""
        pairs = self._candidates(b, t)
        self.done[b] = t
        if pairs is None:
            return
        ri, cj = pairs
        lo, hi = self.starts[b], self.ends[b]
        mb = self.mind[lo:hi]
        # exact float64 distances of the candidate pairs: |x|^2 - 2 x.c + |c|^2, min per point
        d = self.csq[cj] - 2.0 * np.einsum("ij,ij->i", self.xp[lo + ri], self.centres[cj])
        rows, first = np.unique(ri, return_index=True)
        dmin = np.minimum.reduceat(d, first)
        dmin += self.sqp[lo + rows]
        np.maximum(dmin, 0.0, out=dmin)
        mb[rows] = np.minimum(mb[rows], dmin)
        j = int(np.argmax(mb))
        self.ub[b], self.arg[b] = mb[j], lo + j

    def _first(self, start: int, mind0: np.ndarray | None) -> None:
        """Centre 0 and every point's exact min-distance to it (and to ``mind0``'s set)."""
        self.add(0, start)
        self.mind = mind = self.sqp - 2.0 * (self.xp @ self.centres[0])
        mind += self.csq[0]
        np.maximum(mind, 0.0, out=mind)
        if mind0 is not None:
            np.minimum(mind, mind0[self.perm], out=mind)
        for b in range(self.nb):
            j = int(np.argmax(mind[self.starts[b]:self.ends[b]]))
            self.ub[b], self.arg[b] = mind[self.starts[b] + j], self.starts[b] + j

    def _pick(self, t: int) -> int:
        """The block holding the farthest point once its bound is exact (first index on ties)."""
        ub, done = self.ub, self.done
        while True:
            b = int(ub.argmax())
            if done[b] != t:
                self.update(b, t)
                continue
            tied = np.flatnonzero(ub == ub[b])
            if len(tied) == 1:
                return b
            stale = tied[done[tied] != t]
            if len(stale):
                self.update(int(stale[0]), t)
                continue
            return int(tied[np.argmin(self.perm[self.arg[tied]])])  # first among equal maxima

    def run(self, start: int, mind0: np.ndarray | None, bar: Any) -> np.ndarray:
        """The ``n`` greedy picks from ``start`` (original indices)."""
        self._first(start, mind0)
        bar.update(1)
        for t in range(1, self.n):
            b = self._pick(t)
            self.add(t, int(self.perm[self.arg[b]]))
            bar.update(1)
        return self.sel


def project(features: np.ndarray, proj_dim: int, projection: str,
            rng: np.random.Generator) -> np.ndarray:
    """(M, D) float32 features times a random (D, proj_dim) matrix drawn from ``rng``:
    "uniform" in +-1/sqrt(D) (torch.nn.Linear's default init, as the official PatchCore's
    bias-free mapper) or "gaussian" N(0, 1/proj_dim); skipped (the features as float32) when
    D <= proj_dim."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    z = np.ascontiguousarray(features, dtype=np.float32)
    dim = z.shape[1]
    if dim <= proj_dim:
        return z
    if projection == "uniform":
        bound = 1.0 / math.sqrt(dim)
        w = rng.uniform(-bound, bound, size=(dim, proj_dim)).astype(np.float32)
    else:
        w = rng.standard_normal((dim, proj_dim)).astype(np.float32) / np.float32(
            math.sqrt(proj_dim))
    return (torch.from_numpy(z) @ torch.from_numpy(w)).numpy()


def anchor_distances(points: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance (float64) of each row of ``points`` to the rows ``anchors``."""
    x = torch.tensor(np.asarray(points), dtype=torch.float64)
    x -= x.mean(dim=0)
    sq = x.square().sum(dim=1)
    a = x[torch.as_tensor(anchors, dtype=torch.long)]
    d = torch.addmm(sq[:, None], x, a.T, alpha=-2.0).add_(a.square().sum(dim=1))
    return d.clamp_(min=0.0).sqrt_().mean(dim=1).numpy()


def coreset_indices(features: np.ndarray, n: int, proj_dim: int = 128, seed: int = 0,
                    device: str = "cpu", n_starts: int = 10, projection: str = "uniform",
                    method: str = "auto", partitions: int = 1) -> np.ndarray:
    """Greedy k-center coreset of ``n`` rows of ``features`` (M, D), selected on a seeded random
    projection to ``proj_dim`` (:func:`project`, skipped when D <= proj_dim).

    As the official PatchCore (``ApproximateGreedyCoresetSampler``) by default: ``n_starts``
    seeded random anchor rows (not centres) give each row an initial distance, its mean
    distance to them; the greedy then starts at the row farthest from them on average.
    ``n_starts=0``: one seeded random row is the first centre (patchbank <= 0.2).

    ``partitions`` > 1 is an approximate sampler (not the paper's): the rows are split into
    that many seeded random parts and each part gets its own exact greedy with its share of the
    ``n`` centres; the work falls roughly by the number of parts (the greedy is quadratic-ish).
    """
    if n_starts < 0 or partitions < 1:
        raise ValueError(f"need n_starts >= 0 and partitions >= 1, got {n_starts}, "
                         f"{partitions}")
    m = len(features)
    if n >= m:
        return np.arange(m)
    rng = np.random.default_rng(seed)
    if partitions == 1:  # draws in the order of patchbank <= 0.2: start/anchors, projection
        start, anchors = _draw_start(m, n_starts, rng)
        z = project(features, proj_dim, projection, rng)
        return _greedy_from(z, n, start, anchors, device, method)
    order = rng.permutation(m)
    z = project(features, proj_dim, projection, rng)
    parts = [np.sort(p) for p in np.array_split(order, partitions)]
    shares = np.floor(n * np.array([len(p) for p in parts]) / m).astype(int)
    shares[: n - shares.sum()] += 1  # the remainder, one each to the first parts
    picked = []
    for p, k in zip(parts, shares, strict=True):
        if k >= len(p):
            picked.append(p)
        elif k > 0:
            start, anchors = _draw_start(len(p), n_starts, rng)
            picked.append(p[_greedy_from(z[p], int(k), start, anchors, device, method)])
    return np.sort(np.concatenate(picked))


def _draw_start(m: int, n_starts: int, rng: np.random.Generator
                ) -> tuple[int | None, np.ndarray | None]:
    """The official initialisation's random draw: ``n_starts`` anchor rows, or (0) a start."""
    if n_starts == 0:
        return int(rng.integers(m)), None
    return None, rng.choice(m, size=min(n_starts, m), replace=False)


def _greedy_from(z: np.ndarray, n: int, start: int | None, anchors: np.ndarray | None,
                 device: str, method: str) -> np.ndarray:
    """The exact greedy on projected rows ``z`` from a start row or anchor distances."""
    init = None if anchors is None else anchor_distances(z, anchors)
    return greedy_kcenter(z, n, start, device=device, method=method, init=init)
