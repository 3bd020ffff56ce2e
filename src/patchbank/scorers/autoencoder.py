"""Autoencoder scorers: DFR's feature reconstruction (``ae_features``) and a convolutional
autoencoder on raw pixels (``ae_pixels``, on a bank of the ``pixels`` backbone).

``ae_features`` follows DFR (Shi, Yang, Qi, arXiv 2012.07122; official code YoungGod/DFR,
``feat_cae.FeatCAE`` and ``anoseg_dfr.AnoSegDFR``): the taps are aligned onto the finest grid
and concatenated (DFR: many VGG19 layers resized to one stride-4 grid), a conv autoencoder of
1x1 convolutions C -> (C+2d)/2 -> 2d -> d -> 2d -> (C+2d)/2 -> C with BatchNorm and ReLU
between (``kernel=3``: DFR's 3x3 variant) reconstructs every patch vector, the latent size d is
the number of principal components explaining 90 % of the variance of the patch vectors of the
first 10 training images (DFR's rule), training is Adam (lr 1e-4, no weight decay) on the mean
squared error in batches of 4 images, the map is the per-patch squared reconstruction error
(DFR: its mean over channels, i.e. the same map divided by C) and the image score its maximum.

Deviations from DFR, each a parameter (DFR's value in brackets), chosen so that a CPU fits
bottle (EfficientNet-Lite0, 224 px, 56x56 x 176) in about two minutes: ``max_epochs=10``
[150 fixed epochs], early stopping on a seeded held-out part of the training images
(``val_frac=0.1``, ``patience=3``, ``min_delta``; the best epoch's weights are kept) [none],
``lr=1e-3`` [1e-4], ``standardize=true``: per-channel z-scores of the features, from the
training part [raw features; without it the loss of raw Lite0 features falls ~10x slower].
``image_score`` (``max_grid`` [as DFR], ``topk_mean`` or ``max_map``). Not parameters: the
backbone is the bank's (DFR: VGG19 relu1_1..relu4_4), taps are aligned bilinearly with
``align_corners=False`` (DFR: True, then a 4x4 average pool onto a 64x64 grid).

Training is seeded (weights init, split, batch order), shows a progress bar with the losses,
runs on the GPU with AMP (bfloat16, or float16 with loss scaling) when the scorer's device is
CUDA, and on the CPU otherwise. The fitted network is saved as plain arrays (its state dict)
with the architecture, so ``load_scorer`` rebuilds it exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from patchbank.scorers.base import Params, Scorer, batches, choice
from patchbank.scorers.knn import GRID_RULES, REDUCE_RENAMED, reduce_patches

log = logging.getLogger(__name__)

#: bytes of float32 input per scoring / validation batch.
EVAL_BYTES = 64 << 20


def pca_latent(vectors: np.ndarray, var: float) -> int:
    """DFR's latent size: the fewest principal components whose explained variance ratio sums
    to more than ``var`` (scikit-learn's ``PCA(n_components=var)`` rule) for vectors (M, C)."""
    x = np.asarray(vectors, dtype=np.float64).reshape(-1, vectors.shape[-1])
    x = x - x.mean(axis=0)
    eig = np.clip(np.linalg.eigvalsh(x.T @ x / max(1, len(x) - 1))[::-1], 0.0, None)
    total = eig.sum()
    if total <= 0:
        return 1
    ratio = np.cumsum(eig) / total
    return int(min(len(eig), np.searchsorted(ratio, var, side="right") + 1))


def _layer(cin: int, cout: int, kernel: int) -> nn.Module:
    # a 1x1 convolution is a linear map of each patch vector; nn.Linear on (M, C) vectors
    # computes the same and runs about twice as fast on CPUs as Conv2d
    if kernel == 1:
        return nn.Linear(cin, cout)
    return nn.Conv2d(cin, cout, kernel_size=kernel, stride=1, padding=kernel // 2)


def _block(cin: int, cout: int, kernel: int, bn: bool) -> list[nn.Module]:
    norm = (nn.BatchNorm1d(cout) if kernel == 1 else nn.BatchNorm2d(cout)) if bn else None
    return [_layer(cin, cout, kernel), *([norm] if norm is not None else []), nn.ReLU()]


class FeatureCAE(nn.Module):
    """DFR's FeatCAE: C -> (C+2d)//2 -> 2d -> d -> 2d -> (C+2d)//2 -> C with BatchNorm + ReLU
    between, kernel 1 (as patch-vector linear maps, BatchNorm over all patches of the batch:
    the same as DFR's 1x1 convolutions + BatchNorm2d) or 3 (3x3 convolutions). Takes and
    returns (B, C, h, w)."""

    def __init__(self, channels: int, latent: int, kernel: int = 1, bn: bool = True) -> None:
        super().__init__()
        hidden = (channels + 2 * latent) // 2
        self.kernel = kernel
        self.encoder = nn.Sequential(*_block(channels, hidden, kernel, bn),
                                     *_block(hidden, 2 * latent, kernel, bn),
                                     _layer(2 * latent, latent, kernel))
        self.decoder = nn.Sequential(*_block(latent, 2 * latent, kernel, bn),
                                     *_block(2 * latent, hidden, kernel, bn),
                                     _layer(hidden, channels, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != 1:
            return self.decoder(self.encoder(x))
        b, c, h, w = x.shape
        v = x.permute(0, 2, 3, 1).reshape(-1, c)
        return self.decoder(self.encoder(v)).reshape(b, h, w, c).permute(0, 3, 1, 2)


class PixelCAE(nn.Module):
    """A plain convolutional autoencoder: ``depth`` stride-2 4x4 convolutions (width doubling
    from ``width``, BatchNorm, LeakyReLU 0.2), a 1x1 bottleneck of ``latent`` channels, and the
    mirror image with transposed convolutions; input padded (replicate) to a multiple of
    2^depth and the output cropped back."""

    def __init__(self, channels: int, width: int, depth: int, latent: int) -> None:
        super().__init__()
        self.factor = 2 ** depth
        enc: list[nn.Module] = []
        cin = channels
        widths = [width * 2 ** i for i in range(depth)]
        for w in widths:
            enc += [nn.Conv2d(cin, w, 4, stride=2, padding=1), nn.BatchNorm2d(w),
                    nn.LeakyReLU(0.2)]
            cin = w
        enc.append(nn.Conv2d(cin, latent, 1))
        dec: list[nn.Module] = [nn.Conv2d(latent, cin, 1), nn.BatchNorm2d(cin), nn.LeakyReLU(0.2)]
        for i in reversed(range(depth)):
            out = widths[i - 1] if i > 0 else channels
            dec.append(nn.ConvTranspose2d(cin, out, 4, stride=2, padding=1))
            if i > 0:  # the last layer is linear: normalised pixels are signed
                dec += [nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            cin = out
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.factor, -w % self.factor
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.decoder(self.encoder(x))[..., :h, :w]


@dataclass(frozen=True)
class AEParams(Params):
    """Training parameters shared by both autoencoders."""

    lr: float = 1e-4
    batch_size: int = 4
    max_epochs: int = 150
    val_frac: float = 0.1
    patience: int = 5
    min_delta: float = 1e-3
    standardize: bool = False
    #: "max_grid" (DFR), "topk_mean" (of the top ``topk_frac``) or "max_map".
    image_score: str = choice("max_grid", GRID_RULES)
    topk_frac: float = 0.01
    renamed = REDUCE_RENAMED
    amp: bool = True
    seed: int = 0

    def check(self) -> None:
        self.require(self.lr > 0, "lr", "> 0")
        self.require(self.batch_size >= 1, "batch_size", ">= 1")
        self.require(self.max_epochs >= 1, "max_epochs", ">= 1")
        self.require(0 <= self.val_frac < 1, "val_frac", "in [0, 1)")
        self.require(self.patience >= 1, "patience", ">= 1")
        self.require(self.min_delta >= 0, "min_delta", ">= 0 (relative improvement)")
        self.require(0 < self.topk_frac <= 1, "topk_frac", "in (0, 1]")


def train_spans(n: int, size: int, least: int) -> list[tuple[int, int]]:
    """``batches(n, size)``, a last batch of fewer than ``least`` images merged into the one
    before it."""
    spans = list(batches(n, size))
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < least:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


class AutoencoderScorer(Scorer):
    """Fit = train a conv autoencoder on the train bank's (aligned) taps; map = per-cell squared
    L2 reconstruction error over channels; image score = its max (or top-k mean)."""

    pixel_level: ClassVar[bool] = True
    map_sigma: ClassVar[float] = 0.0
    tap_policy: ClassVar[str] = "all"
    min_train: ClassVar[int] = 1
    trained: ClassVar[bool] = True
    check_params: ClassVar[Mapping[str, Any]] = {"max_epochs": 2, "lr": 1e-2, "batch_size": 8}

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.net: nn.Module | None = None
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self._arch_arr = np.zeros(0, dtype=np.int64)
        self.history_: dict[str, list[float]] = {"train": [], "val": []}
        self.best_epoch_ = 0
        self.epochs_run_ = 0

    # -- architecture ----------------------------------------------------------------------
    def _arch(self, train: np.ndarray, fit_idx: np.ndarray) -> np.ndarray:
        """Integer architecture vector chosen from the training data (saved with the model)."""
        raise NotImplementedError

    def _build(self, arch: np.ndarray) -> nn.Module:
        raise NotImplementedError

    def _bottleneck(self, h: int, w: int) -> tuple[int, int] | None:
        """The grid of the narrowest BatchNorm for (h, w) inputs; None without BatchNorm."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, x: np.ndarray, dev: torch.device) -> torch.Tensor:
        """(b, h, w, C) float16/32 bank rows -> standardised (b, C, h, w) float32 on ``dev``."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
        t = t.permute(0, 3, 1, 2)
        if self._mean is not None:
            t = (t - self._mean.to(dev)) / self._std.to(dev)
        return t

    def _amp(self, dev: torch.device) -> tuple[Any, torch.dtype | None]:
        if dev.type != "cuda" or not self.p.amp:
            return nullcontext(), None
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype

    def _errors(self, x: np.ndarray, desc: str = "") -> np.ndarray:
        """Per-cell squared reconstruction errors (N, h, w) float32 of bank rows ``x``."""
        assert self.net is not None
        dev = torch.device(self.device)
        self.net.eval()
        n = len(x)
        out = np.empty((n, *x.shape[1:3]), dtype=np.float32)
        step = max(1, EVAL_BYTES // (4 * max(1, x[0].size)))
        amp, _ = self._amp(dev)
        spans = list(batches(n, step))
        with torch.inference_mode():
            for lo, hi in tqdm(spans, desc=desc or self.name, unit="batch", leave=False,
                               disable=len(spans) <= 1 or not desc):
                t = self._tensor(x[lo:hi], dev)
                with amp:
                    rec = self.net(t)
                out[lo:hi] = (rec.float() - t).pow(2).sum(dim=1).cpu().numpy()
        return out

    # -- fit -------------------------------------------------------------------------------
    def _min_batch(self, train: np.ndarray) -> int:
        """Images a training batch needs: 2 when a BatchNorm sees one cell per image (training
        BatchNorm on a single value per channel is undefined), else 1."""
        grid = self._bottleneck(*train.shape[1:3])
        if grid is None or grid[0] * grid[1] > 1:
            return 1
        if len(train) < 2:
            raise ValueError(f"{self.name}: the {train.shape[1]}x{train.shape[2]} grid gives a "
                             f"{grid[0]}x{grid[1]} BatchNorm bottleneck, which needs at least 2 "
                             f"training images, got {len(train)}: add training images"
                             + (" or lower 'depth'" if "depth" in self.params else ""))
        return 2

    def _split(self, n: int, keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Seeded (fit, validation) image indices; no validation below 2 images, with
        val_frac 0, or when fewer than ``keep`` images would be left to fit on."""
        n_val = int(round(n * self.p.val_frac))
        if n_val < 1 or n - n_val < max(1, keep):
            return np.arange(n), np.arange(0)
        order = np.random.default_rng(self.p.seed).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _fit(self, train: np.ndarray) -> None:
        p = self.p
        dev = torch.device(self.device)
        min_batch = self._min_batch(train)
        fit_idx, val_idx = self._split(len(train), min_batch)
        self._mean = self._std = None
        if p.standardize:
            z = np.asarray(train[fit_idx], dtype=np.float64).reshape(-1, train.shape[-1])
            self._mean = torch.from_numpy(z.mean(0)).float().view(1, -1, 1, 1)
            self._std = torch.from_numpy(z.std(0) + 1e-6).float().view(1, -1, 1, 1)
        arch = self._arch(train, fit_idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.net = self._build(arch).to(dev)
        self._arch_arr = arch
        opt = torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=0.0)
        amp, amp_dtype = self._amp(dev)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        rng = np.random.default_rng(p.seed + 1)
        best, best_state, bad = math.inf, None, 0
        self.history_ = {"train": [], "val": []}
        t0 = time.perf_counter()
        bar = tqdm(range(1, p.max_epochs + 1), desc=f"{self.name} fit", unit="epoch",
                   leave=False)
        for epoch in bar:
            self.net.train()
            order = fit_idx[rng.permutation(len(fit_idx))]
            total, count = 0.0, 0
            for lo, hi in train_spans(len(order), p.batch_size, min_batch):
                rows = np.sort(order[lo:hi])
                t = self._tensor(train[rows], dev)
                with amp:
                    loss = F.mse_loss(self.net(t).float(), t)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += float(loss.detach()) * (hi - lo)
                count += hi - lo
            self.history_["train"].append(total / count)
            self.epochs_run_ = epoch
            if len(val_idx):
                val = float(self._errors(train[val_idx]).mean()) / train.shape[-1]
                self.history_["val"].append(val)
                bar.set_postfix(loss=f"{total / count:.4g}", val=f"{val:.4g}")
                if val < best * (1.0 - p.min_delta):
                    best, bad, self.best_epoch_ = val, 0, epoch
                    best_state = {k: v.detach().clone() for k, v in
                                  self.net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= p.patience:
                        break
            else:
                bar.set_postfix(loss=f"{total / count:.4g}")
                self.best_epoch_ = epoch
        bar.close()
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        log.info("%s: %d epochs in %.1f s (best %d, train loss %.4g%s), arch %s", self.name,
                 self.epochs_run_, time.perf_counter() - t0, self.best_epoch_,
                 self.history_["train"][self.best_epoch_ - 1],
                 f", val loss {best:.4g}" if len(val_idx) else "", arch.tolist())

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        assert self.net is not None
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        state["arch"] = np.asarray(self._arch_arr, dtype=np.int64)
        state["train_loss"] = np.asarray(self.history_["train"], dtype=np.float64)
        state["val_loss"] = np.asarray(self.history_["val"], dtype=np.float64)
        state["epochs"] = np.asarray([self.epochs_run_, self.best_epoch_], dtype=np.int64)
        if self._mean is not None:
            state["mean"], state["std"] = self._mean.numpy(), self._std.numpy()
        return state

    def _set_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._arch_arr = np.asarray(arrays["arch"], dtype=np.int64)
        self._mean = torch.from_numpy(np.asarray(arrays["mean"])) if "mean" in arrays else None
        self._std = torch.from_numpy(np.asarray(arrays["std"])) if "std" in arrays else None
        net = self._build(self._arch_arr)
        sd = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
              if k.startswith("net.")}
        net.load_state_dict(sd, strict=True)
        self.net = net.to(torch.device(self.device)).eval()
        self.history_ = {"train": list(np.asarray(arrays["train_loss"], dtype=float)),
                         "val": list(np.asarray(arrays["val_loss"], dtype=float))}
        self.epochs_run_, self.best_epoch_ = (int(v) for v in arrays["epochs"])

    # -- score -----------------------------------------------------------------------------
    def _score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = self._errors(test, desc=f"{self.name} score")
        return reduce_patches(maps, self.p.image_score, self.p.topk_frac), maps


class FeatureAEScorer(AutoencoderScorer):
    """DFR: a 1x1 (or 3x3) conv autoencoder reconstructing the patch-feature grid."""

    name: ClassVar[str] = "ae_features"

    @dataclass(frozen=True)
    class Params(AEParams):
        lr: float = 1e-3
        max_epochs: int = 10
        patience: int = 3
        standardize: bool = True
        kernel: int = 1
        latent: int = 0
        pca_var: float = 0.9
        pca_images: int = 10
        batch_norm: bool = True

        def check(self) -> None:
            super().check()
            self.require(self.kernel in (1, 3), "kernel", "1 or 3")
            self.require(self.latent >= 0, "latent", ">= 0 (0 = DFR's PCA rule)")
            self.require(0 < self.pca_var < 1, "pca_var", "in (0, 1)")
            self.require(self.pca_images >= 1, "pca_images", ">= 1")

    def _arch(self, train: np.ndarray, fit_idx: np.ndarray) -> np.ndarray:
        channels = int(train.shape[-1])
        latent = self.p.latent
        if latent == 0:
            first = fit_idx[: self.p.pca_images]
            x = np.asarray(train[first], dtype=np.float64)
            if self._mean is not None:
                x = (x - self._mean.numpy().reshape(-1)) / self._std.numpy().reshape(-1)
            latent = pca_latent(x, self.p.pca_var)
        return np.asarray([channels, latent], dtype=np.int64)

    def _build(self, arch: np.ndarray) -> nn.Module:
        return FeatureCAE(int(arch[0]), int(arch[1]), self.p.kernel, self.p.batch_norm)

    def _bottleneck(self, h: int, w: int) -> tuple[int, int] | None:
        return (h, w) if self.p.batch_norm else None


class PixelAEScorer(AutoencoderScorer):
    """A small conv autoencoder on a raw-pixel bank (``extract --backbone pixels``): map =
    per-cell squared reconstruction error over the colour channels."""

    name: ClassVar[str] = "ae_pixels"
    #: on grids of at most 2^depth cells a side the bottleneck is 1x1, and its BatchNorm
    #: cannot train on one image.
    min_train: ClassVar[int] = 2
    check_params: ClassVar[Mapping[str, Any]] = {**AutoencoderScorer.check_params, "width": 4}

    @dataclass(frozen=True)
    class Params(AEParams):
        lr: float = 1e-3
        batch_size: int = 16
        max_epochs: int = 50
        patience: int = 5
        width: int = 32
        depth: int = 3
        latent: int = 16

        def check(self) -> None:
            super().check()
            self.require(self.width >= 1, "width", ">= 1")
            self.require(1 <= self.depth <= 6, "depth", "in 1..6")
            self.require(self.latent >= 1, "latent", ">= 1")

    def _arch(self, train: np.ndarray, fit_idx: np.ndarray) -> np.ndarray:
        if train.shape[-1] > 16:
            log.warning("ae_pixels on a bank of %d channels: it is meant for a pixels bank "
                        "(extract --backbone pixels)", train.shape[-1])
        return np.asarray([train.shape[-1], self.p.width, self.p.depth, self.p.latent],
                          dtype=np.int64)

    def _build(self, arch: np.ndarray) -> nn.Module:
        return PixelCAE(*(int(v) for v in arch))

    def _bottleneck(self, h: int, w: int) -> tuple[int, int]:
        # the input is padded to a multiple of 2^depth, then halved depth times
        f = 2 ** self.p.depth
        return -(-h // f), -(-w // f)
