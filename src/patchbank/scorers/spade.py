"""SPADE (Cohen & Hoshen 2020): image k-NN on pooled features, then patch k-NN within the K
nearest training images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from patchbank.scorers.base import Params, Scorer, choice, pooled
from patchbank.scorers.image_score import grid_max
from patchbank.scorers.neighbors import FlatIndex


class SPADEScorer(Scorer):
    """Image score = mean L2 distance of the pooled embedding to its ``k_images`` nearest
    training images (``image_score``: or the map's maximum); map = mean distance of each patch
    to its ``k`` nearest patches among those images' patches."""

    name: ClassVar[str] = "spade"
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Params(Params):
        k_images: int = 50
        k: int = 1
        #: "pooled_knn" (the paper's image-level k-NN), "max_grid" or "max_map" of the map.
        image_score: str = choice("pooled_knn", ("pooled_knn", "max_grid", "max_map"))

        def check(self) -> None:
            self.require(self.k_images >= 1, "k_images", ">= 1")
            self.require(self.k >= 1, "k", ">= 1")

    def _state(self) -> dict[str, np.ndarray]:
        return {"train": self._train}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._train = arrays["train"]
        self._image_index = FlatIndex(pooled(self._train), "l2", self.device)

    def _fit(self, train: np.ndarray) -> None:
        # patches are gathered per test image at score time (no copy)
        self._set_state({"train": train})
        k_img = min(self.p.k_images, len(train))
        patches = k_img * train.shape[1] * train.shape[2]
        if self.p.k > patches:
            raise ValueError(f"spade: parameter 'k'={self.params['k']} exceeds the {patches} "
                             "patches of the nearest training images")

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, h, w, c = test.shape
        k_img = min(self.p.k_images, len(self._train))
        dist, nearest = self._image_index.search(pooled(test), k_img)
        scores = dist.mean(axis=1, dtype=np.float64)
        maps = np.empty((n, h, w), dtype=np.float32)
        for i in tqdm(range(n), desc="spade maps", unit="image", disable=n < 8, leave=False):
            gallery = self._train[np.sort(nearest[i])].reshape(-1, c)
            d, _ = FlatIndex(gallery, "l2", self.device).search(test[i], self.p.k)
            maps[i] = d.mean(axis=1).reshape(h, w)
        return (scores if self.p.image_score == "pooled_knn" else grid_max(maps)), maps
