"""PatchCore (Roth et al. 2022), as amazon-science/patchcore-inspection computes it.

Default steps (``aggregation="official"``), checked against the official code:

1. each tapped layer (the stride-8 and stride-16 ones by default) at its **own** resolution is
   cut into 3x3 neighbourhoods with zero padding at the borders (``Unfold(3, padding=1)``), each
   patch flattened channel-major to C*9 values;
2. coarser taps are aligned to the finest tap's grid by bilinear interpolation
   (``align_corners=False``);
3. per tap, adaptive average pooling of the C*9 values to ``pretrain_dim`` (1024), then of the
   taps stacked side by side to ``target_dim`` (1024);
4. greedy k-center coreset (:mod:`patchbank.scorers.coreset`) of ``int(coreset * patches)``
   rows, selected on a seeded bias-free random projection to ``proj_dim`` (128) dims, from
   initial distances = mean distance to ``n_starts`` (10) random anchor rows, as the official
   ``ApproximateGreedyCoresetSampler``; the greedy itself is exact;
5. Faiss 1-NN against the coreset; the map is the NN distance **squared** (Faiss' L2, as the
   official scorer reports it; ``squared=false`` for plain distances) and the image score is
   the map's maximum on the grid (``image_score="max_grid"``; ``"max_map"``: the maximum of the
   upsampled, smoothed map). The official code does not re-weight; the paper's eq. 7 re-weighting is
   ``n_reweight=b`` (b >= 2; computed on plain distances, as the paper defines it).
   ``search="ivf"`` is a named approximation for CPU throughput: candidates come from the
   ``nprobe`` nearest of ``nlist`` k-means cells in a PCA projection of the memory bank, the
   best few measured exactly (cells and projection are saved with the model); each image's
   maximum is then re-searched exactly until certified, so image scores stay exact.

Steps 2 and 3 are linear maps on different axes, so pooling each tap at its own resolution and
then interpolating gives the official result (to float rounding, tested) for less work.
``aggregation="avgpool"`` (3x3 mean with zero padding per tap, as anomalib) and
``"avgpool_valid"`` (3x3 mean over valid cells only, after aligning: patchbank <= 0.1) are kept
as named alternatives.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchbank.scorers.base import Params, Scorer, align_taps, batches, choice
from patchbank.scorers.coreset import PROJECTIONS, coreset_indices
from patchbank.scorers.neighbors import (
    FlatIndex,
    IVFIndex,
    PrunedIndex,
    kmeans_centroids,
    pca_basis,
)

log = logging.getLogger(__name__)

#: input bytes per batch of images in the aggregation step.
AGG_BYTES = 64 << 20
AGGREGATIONS = ("official", "avgpool", "avgpool_valid")
SEARCHES = ("exact", "ivf")


def _channel_pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the last axis of (..., L) to ``dim`` values."""
    shape = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), dim).reshape(*shape, dim)


@functools.cache
def _pool_terms(widths: tuple[int, ...], pretrain_dim: int, target_dim: int
                ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
    """The official pooling (each tap's C*9 values to ``pretrain_dim``, taps stacked, pooled to
    ``target_dim``) as one sparse linear map per tap: ``(rows, idx, weight)`` such that output
    ``rows[r]`` gets ``sum_k weight[k, r] * input[idx[k, r]]`` of that tap's values.

    Both poolings are linear, so the map is read off by pooling the identity; each output
    averages only a few inputs, so K gathers cost far less than pooling 1024-long vectors."""
    terms = []
    n = len(widths)
    for t, width in enumerate(widths):
        stacked = torch.zeros(width, n * pretrain_dim, dtype=torch.float64)
        stacked[:, t * pretrain_dim:(t + 1) * pretrain_dim] = _channel_pool(
            torch.eye(width, dtype=torch.float64), pretrain_dim)
        dense = _channel_pool(stacked, target_dim).T  # (target_dim, width)
        rows = torch.nonzero(dense.any(dim=1)).ravel()
        dense = dense[rows]
        k = int((dense != 0).sum(dim=1).max())
        idx = torch.topk((dense != 0).double(), k, dim=1).indices  # each row's nonzeros
        weight = torch.gather(dense, 1, idx)  # 0 where a row has fewer than k
        terms.append((rows, idx.T.contiguous(), weight.T.float().contiguous()))
    return tuple(terms)


def _official(taps: Sequence[torch.Tensor], pretrain_dim: int, target_dim: int,
              out: torch.Tensor) -> None:
    """Writes into ``out`` (B, h0, w0, target_dim) the official order's result for (B, C_i,
    h_i, w_i) taps, finest first: each tap unfolded (3x3, zero padding, channel-major), pooled
    at its own resolution, bilinearly aligned to the finest grid (linear maps on different axes
    commute)."""
    b, h, w, _ = out.shape
    terms = _pool_terms(tuple(9 * t.shape[1] for t in taps), pretrain_dim, target_dim)
    ranges = [(int(r[0]), int(r[-1]) + 1) for r, _, _ in terms]
    # with two taps (or any count dividing the stack evenly) each output row has one tap
    disjoint = (all(hi - lo == len(r) for (lo, hi), (r, _, _) in zip(ranges, terms, strict=True))
                and sum(len(r) for r, _, _ in terms) == target_dim)
    if not disjoint:
        out.zero_()
    for x, (rows, idx, weight), (lo, hi) in zip(taps, terms, ranges, strict=True):
        u = F.unfold(x, kernel_size=3, padding=1)  # (B, C*9, h_i*w_i)
        y = torch.index_select(u, 1, idx[0]).mul_(weight[0][:, None])
        for i, wk in zip(idx[1:], weight[1:], strict=True):
            y.addcmul_(torch.index_select(u, 1, i), wk[:, None])
        y = y.reshape(b, len(rows), *x.shape[-2:])
        if y.shape[-2:] != (h, w):  # channels-last makes CPU bilinear ~15x faster
            y = F.interpolate(y.contiguous(memory_format=torch.channels_last), size=(h, w),
                              mode="bilinear", align_corners=False)
        y = y.permute(0, 2, 3, 1)
        if disjoint:
            out[..., lo:hi] = y
        else:
            out.index_add_(3, rows, y)


def aggregate(taps: Sequence[np.ndarray] | np.ndarray, target_dim: int = 1024,
              pretrain_dim: int = 1024, mode: str = "official") -> np.ndarray:
    """Aggregated patch features (N*h0*w0, D) float32 of taps [(N, h_i, w_i, C_i)], finest first.

    See the module docstring for the modes. A single 4-D array is one tap.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    taps = [taps] if isinstance(taps, np.ndarray) else list(taps)
    if mode == "avgpool_valid":
        taps = [align_taps(taps, "bilinear")]
    n, h, w, _ = taps[0].shape
    total = sum(t.shape[-1] for t in taps)
    if mode == "official":
        dim = target_dim
    else:
        dim = total if total <= target_dim else target_dim
    out = np.empty((n * h * w, dim), dtype=np.float32)
    step = max(1, AGG_BYTES // max(1, 4 * 9 * h * w * max(t.shape[-1] for t in taps)))
    for lo, hi in batches(n, step):
        xs = [torch.from_numpy(np.asarray(t[lo:hi], dtype=np.float32)).permute(0, 3, 1, 2)
              for t in taps]
        if mode == "official":
            dst = torch.from_numpy(out[lo * h * w:hi * h * w]).view(hi - lo, h, w, dim)
            _official(xs, pretrain_dim, target_dim, dst)
        else:
            parts = []
            for x in xs:
                x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=mode == "avgpool")
                if x.shape[-2:] != (h, w):
                    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                parts.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
            x = torch.cat(parts, dim=1)
            if x.shape[1] != dim:
                x = _channel_pool(x, dim)
            out[lo * h * w:hi * h * w] = x.numpy()
    return out


def _exact_maxima(index: FlatIndex | PrunedIndex, feats: np.ndarray, dist: np.ndarray,
                  nn: np.ndarray, first: int = 8) -> None:
    """Makes each image's largest patch distance exact, in place in ``dist``/``nn`` (n, h*w).

    ``dist`` holds an approximate search's distances, upper bounds of the true ones. Patches
    get an exact search from each image's largest bound down (``first``, then twice as many per
    round) until the image's largest exact distance is at least every remaining bound: then no
    other patch can be farther, and the image score (the map's maximum) is the exact one."""
    n, hw = dist.shape
    checked = np.zeros((n, hw), dtype=bool)
    todo, step = np.arange(n), first
    while len(todo):
        rows, cols = [], []
        for i in todo:
            cand = np.flatnonzero(~checked[i])
            top = cand[np.argsort(-dist[i, cand], kind="stable")[:step]]
            rows.append(np.full(len(top), i))
            cols.append(top)
        r, c = np.concatenate(rows), np.concatenate(cols)
        d, j = index.search(feats[r * hw + c], 1)
        dist[r, c], nn[r, c], checked[r, c] = d[:, 0], j[:, 0], True
        bound = np.where(checked[todo], -np.inf, dist[todo]).max(axis=1)
        best = np.where(checked[todo], dist[todo], -np.inf).max(axis=1)
        todo, step = todo[best < bound], step * 2


def reweight(s_star: float, support_dists: np.ndarray) -> float:
    """Paper eq. 7: ``(1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||)) * s*``.

    ``support_dists`` are the distances from the test patch m_test* to the b memory-bank entries
    N_b(m*) (m* itself included); computed as a softmax, stably, in float64.
    """
    d = np.asarray(support_dists, dtype=np.float64).ravel()
    lse = d.max() + math.log(np.exp(d - d.max()).sum())
    return float((1.0 - math.exp(s_star - lse)) * s_star)


class PatchCoreScorer(Scorer):
    """PatchCore: aggregated patches of the stride-8/16 taps, greedy coreset memory bank, 1-NN;
    image score = max patch score (optionally the paper's eq. 7 re-weighting)."""

    name: ClassVar[str] = "patchcore"
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True
    multi_tap: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Params(Params):
        #: memory-bank fraction kept by the greedy coreset.
        coreset: float = 0.1
        #: dimension of the random projection the coreset is selected on.
        proj_dim: int = 128
        #: "uniform" (the official bias-free Linear layer's init) or "gaussian".
        projection: str = choice("uniform", PROJECTIONS)
        #: random anchor rows giving the greedy its initial distances (official: 10); 0 = a
        #: random first centre.
        n_starts: int = 10
        #: 1: the exact greedy (official); k > 1: an approximate sampler, the exact greedy on
        #: k seeded random parts with their share of the centres each (about k times faster).
        partitions: int = 1
        pretrain_dim: int = 1024
        target_dim: int = 1024
        aggregation: str = choice("official", AGGREGATIONS)
        squared: bool = True
        #: b of the paper's eq. 7 re-weighting; 0 = off (the official code's default).
        n_reweight: int = 0
        #: "max_grid" (official: the patch-score grid's maximum, eq. 7 re-weighted when
        #: ``n_reweight``) or "max_map" (see ``scorers.image_score``).
        image_score: str = choice("max_grid", ("max_grid", "max_map"))
        #: "exact" 1-NN (official; on the CPU a pruned search with the same neighbours) or
        #: "ivf": approximate maps, exact image scores (see :class:`IVFIndex`): candidates
        #: from the ``nprobe`` nearest of ``nlist`` k-means cells in the memory bank's top
        #: ``ivf_dims`` principal directions, the best ``rerank`` of them measured exactly.
        search: str = choice("exact", SEARCHES)
        #: IVF cells; 0 = the square root of the memory-bank size.
        nlist: int = 0
        nprobe: int = 2
        #: 0 = cells in the full dimension (no projection, no re-ranking).
        ivf_dims: int = 64
        rerank: int = 4
        seed: int = 0
        chunk: int = 4096

        def check(self) -> None:
            self.require(0 < self.coreset <= 1, "coreset", "in (0, 1]")
            for key in ("proj_dim", "pretrain_dim", "target_dim", "chunk"):
                self.require(getattr(self, key) >= 1, key, ">= 1")
            self.require(self.n_reweight >= 0, "n_reweight", ">= 0")
            self.require(self.n_reweight == 0 or self.image_score == "max_grid", "image_score",
                         "max_grid when n_reweight > 0 (eq. 7 re-weights the maximum patch)")
            self.require(self.n_starts >= 0, "n_starts", ">= 0")
            self.require(self.partitions >= 1, "partitions", ">= 1")
            self.require(self.nlist >= 0, "nlist", ">= 0")
            self.require(self.nprobe >= 1, "nprobe", ">= 1")
            self.require(self.ivf_dims >= 0, "ivf_dims", ">= 0")
            self.require(self.rerank >= 1, "rerank", ">= 1")

    def _features(self, taps: list[np.ndarray]) -> np.ndarray:
        return aggregate(taps, self.p.target_dim, self.p.pretrain_dim,
                         self.p.aggregation)

    def _fit(self, train: list[np.ndarray]) -> None:
        feats = self._features(train)
        n = max(1, int(self.p.coreset * len(feats)))
        log.info("patchcore: coreset of %d / %d patches (dim %d)", n, len(feats), feats.shape[1])
        idx = coreset_indices(feats, n, self.p.proj_dim, self.p.seed, self.device,
                              n_starts=self.p.n_starts, projection=self.p.projection,
                              partitions=self.p.partitions)
        memory = feats[idx]
        del feats
        state = {"memory_bank": memory, "coreset_idx": idx}
        if self.p.search == "ivf":
            low = memory
            if 0 < self.p.ivf_dims < memory.shape[1]:
                state["ivf_mean"], state["ivf_proj"] = pca_basis(memory, self.p.ivf_dims)
                low = (memory - state["ivf_mean"]) @ state["ivf_proj"]
            cells = self.p.nlist or round(math.sqrt(len(memory)))
            state["ivf_centroids"] = kmeans_centroids(low, cells, self.p.seed)
        self._set_state(state)

    def _state(self) -> dict[str, np.ndarray]:
        state = {"memory_bank": self.memory_bank_, "coreset_idx": self.coreset_idx_}
        state.update({k: v for k, v in self.ivf_.items() if v is not None})
        return state

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.memory_bank_ = np.asarray(arrays["memory_bank"], dtype=np.float32)
        self.coreset_idx_ = np.asarray(arrays["coreset_idx"])
        self.ivf_ = {k: arrays.get(k) for k in ("ivf_centroids", "ivf_proj", "ivf_mean")}
        bank = self.memory_bank_
        # exact either way; the bounds pay off for wide features on the CPU
        pruned = self.device == "cpu" and bank.shape[1] >= 512 and len(bank) >= 4096
        self._exact = PrunedIndex(bank) if pruned else FlatIndex(bank, "l2", self.device)
        self._index = self._exact
        if self.p.search == "ivf":
            ivf = self.ivf_
            if ivf["ivf_centroids"] is None or (ivf["ivf_proj"] is None) != (
                    ivf["ivf_mean"] is None):
                raise ValueError("search=ivf: the saved state lacks ivf_centroids or one of "
                                 "ivf_proj/ivf_mean")
            self._index = IVFIndex(bank, ivf["ivf_centroids"], self.p.nprobe, self.device,
                                   ivf["ivf_proj"], ivf["ivf_mean"], self.p.rerank)

    def _score(self, test: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores in batches of images, so memory stays bounded however large the test set."""
        n, h, w, _ = test[0].shape
        per = max(1, self.p.chunk // (h * w))
        scores, maps = np.empty(n), np.empty((n, h, w), dtype=np.float32)
        for lo, hi in tqdm(batches(n, per), desc="patchcore search", unit="batch", leave=False,
                           total=math.ceil(n / per)):
            scores[lo:hi], maps[lo:hi] = self._score_batch([t[lo:hi] for t in test])
        return scores, maps

    def _score_batch(self, test: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n, h, w, _ = test[0].shape
        feats = self._features(test)
        dist, nn = self._index.search(feats, 1, self.p.chunk)
        if self._index is not self._exact:
            _exact_maxima(self._exact, feats, dist.reshape(n, h * w), nn.reshape(n, h * w))
        power = 2 if self.p.squared else 1
        maps = (dist[:, 0] ** power).reshape(n, h, w)
        flat = maps.reshape(n, -1)
        worst = flat.argmax(axis=1)
        s_star = flat[np.arange(n), worst].astype(np.float64)
        b = min(self.p.n_reweight, len(self._index))
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
            scores[i] = reweight(s, d)  # eq. 7 is defined on plain distances
        return scores, maps
