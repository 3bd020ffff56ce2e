"""PatchCore (Roth et al. 2022): locally aggregated patches, greedy k-center coreset, 1-NN.

Steps: 3x3 neighbourhood average pooling (stride 1, padding 1; border patches average their valid
neighbours), adaptive average pooling over channels to ``target_dim`` (as the official code
does; kept when C <= target_dim), greedy k-center coreset selected on a seeded random
projection to ``proj_dim``, Faiss 1-NN against the coreset. Map = per-patch NN distance; image
score = the max patch distance, re-weighted as in the paper's eq. 7.

The coreset selection is the exact greedy (each step adds the point farthest from the chosen
centres) made fast on the CPU by lazy block updates: points are split into blocks, each with
an upper bound on its max min-distance (its exact max when last updated; min-distances only
shrink). Each step updates only the block with the largest bound, with all centres added since
its last update (one small matrix product), until the top block is up to date; its exact max is
then the global max. On a GPU a dense update per step is used instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchbank.scorers.base import Scorer, batches
from patchbank.scorers.neighbors import FlatIndex

log = logging.getLogger(__name__)

#: points per lazy block in the CPU coreset selection (tuned on 163,856 x 128 points).
BLOCK = 1024
#: input bytes per batch of images in the aggregation step.
AGG_BYTES = 64 << 20


def aggregate(bank: np.ndarray, target_dim: int = 1024) -> np.ndarray:
    """Aggregated patch features (N*h*w, D) float32 of a bank (N, h, w, C).

    3x3 average pooling per channel (stride 1, padding 1, padded cells not counted), then
    adaptive average pooling over the channel axis to ``target_dim`` when C > target_dim.
    """
    n, h, w, c = bank.shape
    dim = c if c <= target_dim else target_dim
    out = np.empty((n * h * w, dim), dtype=np.float32)
    step = max(1, AGG_BYTES // max(1, 4 * h * w * c))
    for lo, hi in batches(n, step):
        x = torch.from_numpy(np.array(bank[lo:hi], dtype=np.float32)).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x.permute(0, 2, 3, 1).reshape(-1, c)
        if dim < c:
            x = F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0, :]
        out[lo * h * w:hi * h * w] = x.numpy()
    return out


def reweight(s_star: float, support_dists: np.ndarray) -> float:
    """Paper eq. 7: ``(1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||)) * s*``.

    ``support_dists`` are the distances from the test patch m_test* to the b memory-bank entries
    N_b(m*) (m* itself included); computed as a softmax, stably, in float64.
    """
    d = np.asarray(support_dists, dtype=np.float64).ravel()
    lse = d.max() + math.log(np.exp(d - d.max()).sum())
    return float((1.0 - math.exp(s_star - lse)) * s_star)


def greedy_kcenter(points: np.ndarray, n: int, start: int, device: str = "cpu",
                   method: str = "auto", block: int = BLOCK, progress: bool = True,
                   dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Exact greedy k-center: ``n`` indices, the first ``start``, each next the point with the
    largest Euclidean distance to its nearest chosen centre (first index on ties).

    ``method`` "lazy" (lazy block updates, see module doc; the CPU default) or "dense" (one
    matrix-vector product per step, no host synchronisation; the CUDA default). Distances are
    computed in ``dtype`` (float64: near-ties are resolved like a float64 reference would).
    """
    if method not in ("auto", "lazy", "dense"):
        raise ValueError(f"method must be 'auto', 'lazy' or 'dense', got {method!r}")
    x = torch.tensor(np.asarray(points), dtype=dtype, device=device)  # own copy, centred below
    m = len(x)
    if not 1 <= n <= m or not 0 <= start < m:
        raise ValueError(f"need 1 <= n <= {m} and 0 <= start < {m}, got n={n}, start={start}")
    if method == "auto":
        method = "lazy" if device == "cpu" else "dense"
    x -= x.mean(dim=0)  # smaller norms, less rounding in |x|^2 + |c|^2 - 2 x.c
    sq = x.square().sum(dim=1)
    bar = tqdm(total=n, desc="coreset", unit="centre", disable=not progress, mininterval=0.5,
               leave=False)
    try:
        if method == "lazy":
            return _greedy_lazy(x.cpu(), sq.cpu(), n, start, block, bar)
        return _greedy_dense(x, sq, n, start, bar)
    finally:
        bar.close()


def _greedy_dense(x: torch.Tensor, sq: torch.Tensor, n: int, start: int, bar: Any) -> np.ndarray:
    """One matrix-vector product per step; no host synchronisation (for GPUs)."""
    mind = torch.full_like(sq, math.inf)
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


def _greedy_lazy(x: torch.Tensor, sq: torch.Tensor, n: int, start: int, block: int,
                 bar: Any) -> np.ndarray:
    """Exact greedy with lazily updated blocks of points (CPU)."""
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


def coreset_indices(features: np.ndarray, n: int, proj_dim: int = 128, seed: int = 0,
                    device: str = "cpu") -> np.ndarray:
    """Greedy k-center coreset of ``n`` rows of ``features`` (M, D), selected on a seeded random
    Gaussian projection to ``proj_dim`` (skipped when D <= proj_dim) from a seeded start."""
    m, dim = features.shape
    rng = np.random.default_rng(seed)
    start = int(rng.integers(m))
    if n >= m:
        return np.arange(m)
    z = np.ascontiguousarray(features, dtype=np.float32)
    if dim > proj_dim:
        w = rng.standard_normal((dim, proj_dim)).astype(np.float32) / np.float32(
            math.sqrt(proj_dim))
        z = (torch.from_numpy(z) @ torch.from_numpy(w)).numpy()
    return greedy_kcenter(z, n, start, device=device)


class PatchCoreScorer(Scorer):
    """PatchCore with a greedy coreset memory bank and the paper's image-score re-weighting."""

    name: ClassVar[str] = "patchcore"
    defaults: ClassVar[dict[str, Any]] = {
        "coreset": 0.1, "proj_dim": 128, "target_dim": 1024, "n_reweight": 3, "seed": 0,
        "chunk": 4096,
    }
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True

    def _check_params(self) -> None:
        self._require(0 < self.params["coreset"] <= 1, "coreset", "in (0, 1]")
        for key in ("proj_dim", "target_dim", "chunk"):
            self._require(self.params[key] >= 1, key, ">= 1")
        self._require(self.params["n_reweight"] >= 0, "n_reweight", ">= 0")

    def _fit(self, train: np.ndarray) -> None:
        feats = aggregate(train, self.params["target_dim"])
        n = max(1, round(self.params["coreset"] * len(feats)))
        log.info("patchcore: coreset of %d / %d patches (dim %d)", n, len(feats), feats.shape[1])
        idx = coreset_indices(feats, n, self.params["proj_dim"], self.params["seed"],
                              self.device)
        self.coreset_idx_ = idx
        self.memory_bank_ = feats[idx]
        del feats
        self._index = FlatIndex(self.memory_bank_, "l2", self.device)

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores in batches of images, so memory stays bounded however large the test set."""
        n, h, w, _ = test.shape
        per = max(1, self.params["chunk"] // (h * w))
        scores, maps = np.empty(n), np.empty((n, h, w), dtype=np.float32)
        for lo, hi in tqdm(batches(n, per), desc="patchcore search", unit="batch", leave=False,
                           total=math.ceil(n / per)):
            scores[lo:hi], maps[lo:hi] = self._score_batch(test[lo:hi])
        return scores, maps

    def _score_batch(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, h, w, _ = test.shape
        feats = aggregate(test, self.params["target_dim"])
        dist, nn = self._index.search(feats, 1, self.params["chunk"])
        maps = dist[:, 0].reshape(n, h, w)
        flat = maps.reshape(n, -1)
        worst = flat.argmax(axis=1)
        s_star = flat[np.arange(n), worst].astype(np.float64)
        b = min(self.params["n_reweight"], len(self._index))
        if b <= 1:
            return s_star, maps
        rows = np.arange(n) * h * w + worst
        m_star = nn[rows, 0]
        _, support = self._index.search(self.memory_bank_[m_star], b)
        scores = np.empty(n)
        for i in range(n):
            q = feats[rows[i]].astype(np.float64)
            d = np.linalg.norm(self.memory_bank_[support[i]].astype(np.float64) - q, axis=1)
            s = float(np.linalg.norm(self.memory_bank_[m_star[i]].astype(np.float64) - q))
            scores[i] = reweight(s, d)
        return scores, maps
