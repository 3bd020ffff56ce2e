"""k-NN scoring: distance of test patches (or pooled images) to the nearest training ones."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from patchbank.scorers.base import Params, Scorer, choice, pooled
from patchbank.scorers.neighbors import METRICS, FlatIndex

#: ``image_score`` rules of the patch-level k-NN and the autoencoders; ``reduce``, its old name.
GRID_RULES = ("max_grid", "topk_mean", "max_map")
REDUCE_RENAMED = types.MappingProxyType(
    {"reduce": ("image_score", {"max": "max_grid", "topk": "topk_mean"})})


def reduce_patches(patch_scores: np.ndarray, reduce: str, topk_frac: float) -> np.ndarray:
    """Image scores (N,) from patch scores (N, P): the max ("max_grid", also for "max_map",
    which the scorer base replaces), or ("topk_mean") the mean of the top ceil(frac*P)."""
    s = np.asarray(patch_scores, dtype=np.float64).reshape(len(patch_scores), -1)
    if reduce != "topk_mean":
        return s.max(axis=1)
    n = min(s.shape[1], max(1, math.ceil(topk_frac * s.shape[1])))
    return np.partition(s, s.shape[1] - n, axis=1)[:, -n:].mean(axis=1)


def top_sigma_channels(z: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the ``n`` channels of pooled features ``z`` (N, C) with the highest
    standard deviation over the N images (ties: lower index first); all channels if n >= C."""
    std = np.asarray(z, dtype=np.float64).std(axis=0)
    return np.sort(np.argsort(-std, kind="stable")[: min(int(n), len(std))])


class KNNScorer(Scorer):
    """Patch level: memory bank = every training patch, map = mean distance to the k nearest,
    image score = max of the map (``image_score``: or its top-fraction mean, or the max of the
    upsampled, smoothed map). Image level: pooled embeddings, image
    score = mean distance to the k nearest training images, no maps; ``top_sigma`` N > 0 keeps
    only the N pooled channels with the highest standard deviation over the train images (the
    seeds' variant: N = 500, k = 50)."""

    name: ClassVar[str] = "knn"
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Params(Params):
        level: str = choice("patch", ("patch", "image"))
        k: int = 1
        metric: str = choice("l2", METRICS)
        #: patch level: "max_grid", "topk_mean" (of the top ``topk_frac``) or "max_map".
        image_score: str = choice("max_grid", GRID_RULES)
        topk_frac: float = 0.01
        top_sigma: int = 0
        renamed = REDUCE_RENAMED

        def check(self) -> None:
            self.require(self.k >= 1, "k", ">= 1")
            self.require(0 < self.topk_frac <= 1, "topk_frac", "in (0, 1]")
            self.require(self.top_sigma >= 0, "top_sigma", ">= 0 (0 = all channels)")
            self.require(self.top_sigma == 0 or self.level == "image", "top_sigma",
                         "0 unless level=image")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        # instance attribute: image-level k-NN produces no maps
        self.pixel_level = self.p.level == "patch"  # type: ignore[misc]

    def _fit(self, train: np.ndarray) -> None:
        vectors = train.reshape(-1, train.shape[-1]) if self.pixel_level else pooled(train)
        channels = np.arange(vectors.shape[-1])
        if self.p.top_sigma:
            channels = top_sigma_channels(vectors, self.p.top_sigma)
            vectors = vectors[:, channels]
        self._check_k(len(vectors))
        self._set_state({"vectors": vectors, "channels": channels})

    def _state(self) -> dict[str, np.ndarray]:
        return {"vectors": self._vectors, "channels": self._channels}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._vectors = arrays["vectors"]
        self._channels = np.asarray(arrays.get("channels", np.arange(self._vectors.shape[-1])),
                                    dtype=np.int64)
        self._index = FlatIndex(self._vectors, self.p.metric, self.device)

    def _check_k(self, n: int) -> None:
        if self.p.k > n:
            raise ValueError(f"knn: parameter 'k'={self.params['k']} exceeds the {n} training "
                             f"{'patches' if self.pixel_level else 'images'}")

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        k = self.p.k
        if not self.pixel_level:
            dist, _ = self._index.search(pooled(test)[:, self._channels], k)
            return dist.mean(axis=1, dtype=np.float64), None
        dist, _ = self._index.search(test, k, desc="knn patches")
        maps = dist.mean(axis=1).reshape(test.shape[:3]).astype(np.float32)
        return reduce_patches(maps, self.p.image_score, self.p.topk_frac), maps
