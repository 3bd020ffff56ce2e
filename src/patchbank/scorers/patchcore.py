"""PatchCore (Roth et al. 2022): locally aggregated patches, greedy k-center coreset, 1-NN.

Steps: 3x3 neighbourhood average pooling (stride 1, padding 1; border patches average their valid
neighbours), adaptive average pooling over channels to ``target_dim`` (as the official code
does; kept when C <= target_dim), greedy k-center coreset selected on a seeded random
projection to ``proj_dim``, Faiss 1-NN against the coreset. Map = per-patch NN distance; image
score = the max patch distance, re-weighted as in the paper's eq. 7.
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
from patchbank.scorers.coreset import coreset_indices
from patchbank.scorers.neighbors import FlatIndex

log = logging.getLogger(__name__)

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
