"""AnomalyDINO (Damm et al., WACV 2025, arXiv 2405.14529), as dammsi/AnomalyDINO computes it.

Default steps, checked against the official ``src/detection.py``, ``src/backbones.py`` and
``src/post_eval.py``:

1. the memory bank is every patch token of the reference (train) images, from the backbone's
   **last** tapped layer (DINOv2's last block; extract with the ``dinov2_vits14_ad`` spec for
   the paper's 448 px, final-norm tokens);
2. each test patch's distance is its cosine distance ``1 - cos`` to the nearest reference patch
   (official "L2_normalized": half the squared L2 of unit vectors; ``k`` > 1 averages);
3. optional zero-shot background masking of the test image (``masking=true``): the first
   principal component of the image's **own** patch tokens, thresholded at ``mask_threshold``
   (10, on DINOv2's feature scale); when the centre crop (``mask_border`` = 20 % margins) keeps
   at most 35 % of its patches the sign is flipped; then a 3x3 dilation and a 3x3 closing.
   Masked-out patches get distance 0. ``mask_reference=true`` masks the reference images too;
4. image score = mean of the top 1 % patch distances of the whole map (``int(0.01 * patches)``
   of them, the maximum when that is 0: the official ``mean_top1p``).

The paper's rotation augmentation of the reference images (0-315 degrees in 45-degree steps) is
a property of the train bank: extract it with ``--augment`` (see the README).
Deviations, each a parameter: ``metric="l2"`` (plain L2, averaged over k as distances, not
the root of the mean squared distance). The official maps are smoothed with sigma 4 in the
original image's pixels; here, as for every method, in model-input pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from patchbank.scorers.base import Params, Scorer, batches, choice
from patchbank.scorers.image_score import MAP_RULES
from patchbank.scorers.neighbors import METRICS, FlatIndex

log = logging.getLogger(__name__)


def mean_top_fraction(distances: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Per image (rows of ``distances`` (N, P)): the mean of its ``int(fraction * P)`` largest
    values, or the maximum when that is 0 (the official ``mean_top1p``)."""
    d = np.asarray(distances, dtype=np.float64).reshape(len(distances), -1)
    n = int(fraction * d.shape[1])
    if n == 0:
        return d.max(axis=1)
    return np.partition(d, d.shape[1] - n, axis=1)[:, -n:].mean(axis=1)


def first_component(tokens: np.ndarray) -> np.ndarray:
    """Projections (P,) of the centred ``tokens`` (P, C) on their first principal direction,
    signed so that the direction's largest-magnitude entry is positive (as scikit-learn's
    ``svd_flip``)."""
    x = np.asarray(tokens, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[0]
    if v[np.argmax(np.abs(v))] < 0:
        v = -v
    return x @ v


def background_mask(tokens: np.ndarray, threshold: float = 10.0, border: float = 0.2,
                    kernel: int = 3) -> np.ndarray:
    """Foreground mask (h, w) bool of one image's patch tokens (h, w, C): first principal
    component above ``threshold``, its sign flipped when the centre crop keeps at most 35 % of
    its patches, then a ``kernel`` x ``kernel`` dilation and closing (borders never erode)."""
    h, w, c = tokens.shape
    pc = first_component(tokens.reshape(-1, c)).reshape(h, w)
    mask = pc > threshold
    centre = mask[int(h * border):int(h * (1 - border)), int(w * border):int(w * (1 - border))]
    if centre.sum() <= centre.size * 0.35:
        mask = -pc > threshold
    square = np.ones((kernel, kernel), dtype=bool)
    mask = ndimage.binary_dilation(mask, square)
    closed = ndimage.binary_dilation(mask, square)
    return ndimage.binary_erosion(closed, square, border_value=1)


class AnomalyDINOScorer(Scorer):
    """AnomalyDINO: 1-NN cosine distance of last-layer patch tokens to the reference patches;
    image score = mean of the top 1 % of the map; optional zero-shot background masking."""

    name: ClassVar[str] = "anomalydino"
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True
    tap_policy: ClassVar[str] = "last"

    @dataclass(frozen=True)
    class Params(Params):
        k: int = 1
        metric: str = choice("cosine", METRICS)
        #: fraction of the patches whose mean is the image score (official: 1 %).
        top_frac: float = 0.01
        #: "topk_mean" (official: the mean of the top ``top_frac``), "max_grid" or "max_map".
        image_score: str = choice("topk_mean", MAP_RULES)
        #: zero-shot background masking of test images (official: per category; off for bottle).
        masking: bool = False
        mask_reference: bool = False
        mask_threshold: float = 10.0
        mask_border: float = 0.2
        mask_kernel: int = 3
        #: test images per search batch.
        batch: int = 16

        def check(self) -> None:
            self.require(self.k >= 1, "k", ">= 1")
            self.require(0 < self.top_frac <= 1, "top_frac", "in (0, 1]")
            self.require(0 <= self.mask_border < 0.5, "mask_border", "in [0, 0.5)")
            self.require(self.mask_kernel >= 1 and self.mask_kernel % 2 == 1, "mask_kernel",
                         "an odd number >= 1")
            self.require(self.batch >= 1, "batch", ">= 1")

    def _mask(self, tokens: np.ndarray) -> np.ndarray:
        return background_mask(np.asarray(tokens, dtype=np.float32), self.p.mask_threshold,
                               self.p.mask_border, self.p.mask_kernel)

    def _fit(self, train: np.ndarray) -> None:
        c = train.shape[-1]
        if self.p.mask_reference:
            patches = np.concatenate([np.asarray(t, dtype=np.float32)[self._mask(t)]
                                      for t in train]).reshape(-1, c)
        else:
            patches = np.asarray(train, dtype=np.float32).reshape(-1, c)
        if self.p.k > len(patches):
            raise ValueError(f"anomalydino: parameter 'k'={self.p.k} exceeds the "
                             f"{len(patches)} reference patches")
        self._set_state({"memory_bank": patches})

    def _state(self) -> dict[str, np.ndarray]:
        return {"memory_bank": self.memory_bank_}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.memory_bank_ = np.asarray(arrays["memory_bank"], dtype=np.float32)
        self._index = FlatIndex(self.memory_bank_, self.p.metric, self.device)

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, h, w, _ = test.shape
        maps = np.empty((n, h, w), dtype=np.float32)
        spans = list(batches(n, self.p.batch))
        for lo, hi in tqdm(spans, desc="anomalydino", unit="batch", disable=len(spans) <= 1,
                           leave=False):
            part = np.asarray(test[lo:hi])
            dist, _ = self._index.search(part, self.p.k)
            maps[lo:hi] = dist.mean(axis=1).reshape(hi - lo, h, w)
            if self.p.masking:
                for i in range(hi - lo):
                    maps[lo + i][~self._mask(part[i])] = 0.0
        frac = self.p.top_frac if self.p.image_score == "topk_mean" else 0.0
        return mean_top_fraction(maps, frac), maps
