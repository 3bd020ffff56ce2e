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
   the map's maximum. The official code does not re-weight; the paper's eq. 7 re-weighting is
   ``n_reweight=b`` (b >= 2; computed on plain distances, as the paper defines it).

Steps 2 and 3 are linear maps on different axes, so pooling each tap at its own resolution and
then interpolating gives the official result (to float rounding, tested) for less work.
``aggregation="avgpool"`` (3x3 mean with zero padding per tap, as anomalib) and
``"avgpool_valid"`` (3x3 mean over valid cells only, after aligning: patchbank <= 0.1) are kept
as named alternatives.
"""

from __future__ import annotations

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
from patchbank.scorers.neighbors import FlatIndex, PrunedIndex

log = logging.getLogger(__name__)

#: input bytes per batch of images in the aggregation step.
AGG_BYTES = 64 << 20
AGGREGATIONS = ("official", "avgpool", "avgpool_valid")


def _channel_pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the last axis of (..., L) to ``dim`` values."""
    shape = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), dim).reshape(*shape, dim)


def _unfold_pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, dim, h, w): zero-padded 3x3 neighbourhoods flattened channel-major
    (C*9 values, as ``torch.nn.Unfold``) and average-pooled to ``dim``."""
    b, c, h, w = x.shape
    u = F.unfold(x, kernel_size=3, padding=1)  # (B, C*9, h*w), channel-major
    return _channel_pool(u.transpose(1, 2), dim).transpose(1, 2).reshape(b, dim, h, w)


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
        parts = []
        for t in taps:
            x = torch.from_numpy(np.asarray(t[lo:hi], dtype=np.float32)).permute(0, 3, 1, 2)
            if mode == "official":
                x = _unfold_pool(x, pretrain_dim)
            else:
                x = F.avg_pool2d(x, 3, stride=1, padding=1,
                                 count_include_pad=mode == "avgpool")
            if x.shape[-2:] != (h, w):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            parts.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        x = torch.cat(parts, dim=1)
        if x.shape[1] != dim:
            x = _channel_pool(x, dim)
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
        seed: int = 0
        chunk: int = 4096

        def check(self) -> None:
            self.require(0 < self.coreset <= 1, "coreset", "in (0, 1]")
            for key in ("proj_dim", "pretrain_dim", "target_dim", "chunk"):
                self.require(getattr(self, key) >= 1, key, ">= 1")
            self.require(self.n_reweight >= 0, "n_reweight", ">= 0")
            self.require(self.n_starts >= 0, "n_starts", ">= 0")
            self.require(self.partitions >= 1, "partitions", ">= 1")

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
        self.coreset_idx_ = idx
        memory = feats[idx]
        del feats
        self._set_state({"memory_bank": memory, "coreset_idx": idx})

    def _state(self) -> dict[str, np.ndarray]:
        return {"memory_bank": self.memory_bank_, "coreset_idx": self.coreset_idx_}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.memory_bank_ = np.asarray(arrays["memory_bank"], dtype=np.float32)
        self.coreset_idx_ = np.asarray(arrays["coreset_idx"])
        bank = self.memory_bank_
        # exact either way; the bounds pay off for wide features on the CPU
        pruned = self.device == "cpu" and bank.shape[1] >= 512 and len(bank) >= 4096
        self._index = (PrunedIndex(bank) if pruned else FlatIndex(bank, "l2", self.device))

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
