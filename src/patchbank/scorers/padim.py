"""PaDiM (Defard et al. 2021): a Gaussian per grid location on a random channel subset.

As in the paper: the three finest taps (stride 4, 8, 16 for ResNet-like backbones), coarser ones
replicated onto the finest grid (nearest) and concatenated, ``d`` random channels, covariance +
eps*I; map = Mahalanobis distance; image score = the maximum of the map upsampled bilinearly to
the model input and smoothed with sigma 4, as the official code (``image_score="max_grid"``:
the raw grid's maximum, the default of patchbank <= 0.2).

Fit accumulates per-location sums and outer-product sums over batches of images in float64, so
peak memory is the model (h*w, d, d), not the dataset. Score: Mahalanobis distance per location
via batched Cholesky solves (torch, on the GPU when present).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from patchbank.scorers.base import Params, Scorer, batches, choice
from patchbank.scorers.image_score import grid_max

log = logging.getLogger(__name__)

#: cap on the float64 bytes of one batch of (images, locations, d) features in fit and score.
BATCH_BYTES = 256 << 20
#: cap on the bytes of one (locations, d, d) temporary (outer products, Cholesky chunks).
CHUNK_BYTES = 16 << 20


def default_d(channels: int) -> int:
    """The paper's channel count: min(C, 100) up to 1000 channels (ResNet18: 448 -> 100), else 550
    (WideResNet50: 1792 -> 550)."""
    return min(channels, 100) if channels <= 1000 else 550


def select_channels(channels: int, d: int, seed: int) -> np.ndarray:
    """Sorted seeded random subset of ``d`` of ``channels`` channel indices (all when d == C)."""
    if d == channels:
        return np.arange(channels)
    return np.sort(np.random.default_rng(seed).choice(channels, size=d, replace=False))


class GaussianAccumulator:
    """Streaming per-location mean and covariance of features (L, d) seen in batches (b, L, d).

    Sums are taken about a shift (the first batch's mean) for numerical stability, in float64.
    ``backend`` "numpy" runs on the CPU; "torch" runs on ``device`` (used for CUDA).
    """

    def __init__(self, n_locations: int, dim: int, backend: str = "numpy",
                 device: str = "cpu") -> None:
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        self.backend, self.device = backend, device
        self.n = 0
        shape = (n_locations, dim)
        if backend == "numpy":
            self.shift = np.zeros(shape)
            self.sum = np.zeros(shape)
            self.outer = np.zeros((*shape, dim))
        else:
            kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
            self.shift = torch.zeros(shape, **kw)
            self.sum = torch.zeros(shape, **kw)
            self.outer = torch.zeros((*shape, dim), **kw)
        self._loc_chunk = max(1, CHUNK_BYTES // (8 * dim * dim))

    def update(self, x: np.ndarray) -> None:
        """Add a batch of features (b, L, d) (any float dtype)."""
        b = len(x)
        if b == 0:
            return
        if self.backend == "numpy":
            xt = np.asarray(x, dtype=np.float64).transpose(1, 0, 2)  # (L, b, d) view
            if self.n == 0:
                self.shift[:] = xt.mean(axis=1)
            xc = xt - self.shift[:, None, :]  # (L, b, d) contiguous, one batch
            self.sum += xc.sum(axis=1)
            for lo, hi in batches(len(xc), self._loc_chunk):
                self.outer[lo:hi] += np.matmul(xc[lo:hi].transpose(0, 2, 1), xc[lo:hi])
        else:
            xt = torch.as_tensor(np.asarray(x)).to(self.device, torch.float64).transpose(0, 1)
            if self.n == 0:
                self.shift.copy_(xt.mean(dim=1))
            xc = xt - self.shift[:, None, :]
            self.sum += xc.sum(dim=1)
            self.outer.baddbmm_(xc.transpose(1, 2), xc)
        self.n += b

    def finalize(self, eps: float = 0.0) -> tuple[np.ndarray | torch.Tensor, Any]:
        """(mean (L, d), covariance (L, d, d)) with the unbiased (n - 1) normaliser, plus eps*I.

        The covariance is built in place in the outer-product buffer (no second copy).
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.n}")
        mc = self.sum / self.n
        cov = self.outer
        for lo, hi in batches(len(cov), self._loc_chunk):
            m = mc[lo:hi]
            cov[lo:hi] -= self.n * (m[:, :, None] * m[:, None, :])
        cov /= self.n - 1
        if self.backend == "numpy":
            diag = np.arange(cov.shape[-1])
            cov[:, diag, diag] += eps
        else:
            cov.diagonal(dim1=-2, dim2=-1).add_(eps)
        return self.shift + mc, cov


class PaDiMScorer(Scorer):
    """PaDiM: per-location Gaussian on ``d`` seeded random channels; map = Mahalanobis distance,
    image score = max of the map upsampled to the input and smoothed (sigma 4), as the official
    code (``image_score="max_grid"``: the raw grid's maximum, patchbank <= 0.2)."""

    name: ClassVar[str] = "padim"
    map_sigma: ClassVar[float] = 4.0
    pixel_level: ClassVar[bool] = True
    min_train: ClassVar[int] = 2
    #: the paper's taps: every stored layer (stride 4, 8, 16 for ResNet-like backbones), coarse
    #: cells replicated onto the finest grid (nearest), as the reference code's embedding_concat.
    tap_policy: ClassVar[str] = "all"
    upsample: ClassVar[str] = "nearest"
    #: the Cholesky factors are saved in float32 (see ``_state``).
    reload_rtol: ClassVar[float] = 1e-5
    #: images per fit batch; None -> min(d // 4, what fits in BATCH_BYTES), so a batch is at most
    #: a quarter of the model's size.
    batch_images: int | None = None
    legacy_image_score: ClassVar[str | None] = "max_grid"

    @dataclass(frozen=True)
    class Params(Params):
        #: random channels kept; None -> the paper's choice for the bank's width (default_d).
        d: int | None = None
        eps: float = 0.01
        seed: int = 0
        #: "max_map" (official) or "max_grid" (see ``scorers.image_score``).
        image_score: str = choice("max_map", ("max_map", "max_grid"))

        def check(self) -> None:
            self.require(self.d is None or self.d >= 1, "d", "None or >= 1")
            self.require(self.eps >= 0, "eps", ">= 0")

    def _fit(self, train: np.ndarray) -> None:
        n, h, w, c = train.shape
        d = self.p.d if self.p.d is not None else default_d(c)
        if d > c:
            raise ValueError(f"padim: parameter 'd'={d} exceeds the bank's {c} channels")
        self.d_ = d
        self.channels_ = select_channels(c, d, self.p.seed)
        loc = h * w
        on_gpu = self.device != "cpu"
        acc = GaussianAccumulator(loc, d, "torch" if on_gpu else "numpy", self.device)
        step = self.batch_images or max(1, min(d // 4, BATCH_BYTES // (8 * loc * d)))
        spans = list(batches(n, step))
        for lo, hi in tqdm(spans, desc="padim fit", unit="batch", disable=len(spans) <= 1,
                           leave=False):
            acc.update(train[lo:hi][..., self.channels_].reshape(hi - lo, loc, d))
        mean, cov = acc.finalize(self.p.eps)
        del acc
        self._mean = torch.as_tensor(mean, device=self.device)
        self._chol = torch.as_tensor(cov, device=self.device)  # factorised in place below
        for lo, hi in batches(loc, max(1, CHUNK_BYTES // (8 * d * d))):
            factor, info = torch.linalg.cholesky_ex(self._chol[lo:hi])
            if int(info.max()) > 0:
                raise ValueError(f"padim: covariance not positive definite at some grid "
                                 f"locations; raise 'eps' (now {self.params['eps']})")
            self._chol[lo:hi] = factor
        log.info("padim: %d locations x d=%d (%.0f MiB model)", loc, d,
                 self._chol.numel() * 8 / 2**20)

    def _state(self) -> dict[str, np.ndarray]:
        # Cholesky factors stored as float32 (half the bytes of the float64 fit; a reloaded
        # model's distances agree to ~1e-6 relative).
        return {"channels": self.channels_, "mean": self.mean_,
                "cholesky": self._chol.cpu().numpy().astype(np.float32)}

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.channels_ = np.asarray(arrays["channels"])
        self.d_ = len(self.channels_)
        self._mean = torch.as_tensor(np.asarray(arrays["mean"], np.float64), device=self.device)
        self._chol = torch.as_tensor(np.asarray(arrays["cholesky"], np.float64),
                                     device=self.device)

    @property
    def mean_(self) -> np.ndarray:
        """Per-location means (h*w, d) float64."""
        return self._mean.cpu().numpy()

    def covariance(self) -> np.ndarray:
        """Per-location covariances (h*w, d, d) float64, eps*I included (from the Cholesky)."""
        return (self._chol @ self._chol.transpose(1, 2)).cpu().numpy()

    def mahalanobis(self, feats: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (b, h*w) of selected-channel features (b, h*w, d)."""
        x = torch.as_tensor(np.asarray(feats)).to(self.device, torch.float64)
        diff = (x - self._mean).permute(1, 2, 0)  # (L, d, b)
        y = torch.linalg.solve_triangular(self._chol, diff, upper=False)
        return y.square().sum(dim=1).sqrt().T.cpu().numpy()

    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, h, w, _ = test.shape
        loc, d = h * w, self.d_
        maps = np.empty((n, h, w), dtype=np.float32)
        step = max(1, BATCH_BYTES // (8 * loc * d))
        spans = list(batches(n, step))
        for lo, hi in tqdm(spans, desc="padim score", unit="batch", disable=len(spans) <= 1,
                           leave=False):
            feats = test[lo:hi][..., self.channels_].reshape(hi - lo, loc, d)
            maps[lo:hi] = self.mahalanobis(feats).reshape(hi - lo, h, w)
        return grid_max(maps), maps
