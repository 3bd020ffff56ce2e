"""Fit a scorer with a seeded hold-out: the one place the score stage, predict and the app fit.

The score stage fits a scorer on the train taps and scores the test taps; with a hold-out it
also fits a clone on part of the training images and scores the rest, so the evaluate stage
(and predict) can set unsupervised thresholds: mean + 3 sigma
(:func:`patchbank.evaluation.metrics.unsupervised_threshold`) of the held-out image scores and
of the held-out maps' maxima once placed on their images
(:func:`patchbank.evaluation.heatmap.map_maxima`). :func:`fit_with_holdout` does that once;
predict's refit for older runs and the app's quick model call it with the same split, so their
thresholds are the score stage's.

The seeded splits live here too (below ``stages``, so ``inference`` and ``app`` need not reach
into the score stage): :func:`holdout_split`, :func:`holdout_rows` and the few-shot subsets
:func:`shot_indices`, :func:`shot_rows`, :func:`fit_bank`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from patchbank.evaluation.heatmap import map_extrema
from patchbank.evaluation.metrics import unsupervised_threshold
from patchbank.scorers.base import Scorer
from patchbank.store.banks import Bank

#: sigmas above the held-out mean for the unsupervised image and pixel thresholds
N_SIGMA = 3.0

Taps = Mapping[int, np.ndarray]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` training images into (fit, held-out) index arrays."""
    n_out = int(round(n * fraction))
    if fraction <= 0 or n_out < 2 or n - n_out < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def holdout_rows(meta: pd.DataFrame, fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(rows fitted on, held-out rows) of a train bank for the unsupervised threshold: the
    split (:func:`holdout_split`) draws among the original images; with ``--augment`` an
    image's copies follow it into the fitted part and are left out when it is held out."""
    if "augment_of" not in meta.columns:
        return holdout_split(len(meta), fraction, seed)
    originals = np.flatnonzero(meta["augment"].to_numpy() == 0)
    fit, out = holdout_split(len(originals), fraction, seed)
    return (np.flatnonzero(np.isin(meta["augment_of"].to_numpy(), originals[fit])),
            originals[out])


def shot_indices(n: int, shots: int | None, seed: int) -> np.ndarray:
    """Training rows a run fits on: all ``n``, or a seeded sorted subset of ``shots`` of them."""
    if shots is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(shots), replace=False))


def shot_rows(meta: pd.DataFrame, shots: int | None, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen training images' bank rows, every bank row fitted on). Banks extracted with
    ``--augment`` draw the shots among the original images and keep each one's augmented
    copies (the ``augment``/``augment_of`` columns), so a shot is an image, not a copy."""
    augmented = "augment" in meta.columns and "augment_of" in meta.columns
    originals = np.flatnonzero(meta["augment"].to_numpy() == 0) if augmented \
        else np.arange(len(meta))
    chosen = originals[shot_indices(len(originals), shots, seed)]
    if not augmented or shots is None:
        return chosen, np.arange(len(meta)) if shots is None else chosen
    return chosen, np.flatnonzero(np.isin(meta["augment_of"].to_numpy(), chosen))


def subset_bank(bank: Bank, rows: np.ndarray) -> Bank:
    """The bank restricted to the sorted ``rows`` (taps read into memory; metadata re-indexed,
    ``augment_of`` pointing at the new rows)."""
    meta = bank.meta.iloc[rows].reset_index(drop=True)
    if "augment_of" in meta.columns:
        meta["augment_of"] = np.searchsorted(rows, meta["augment_of"].to_numpy())
    return Bank({k: np.asarray(v[rows]) for k, v in bank.taps.items()}, meta, bank.fingerprint)


def fit_bank(train: Bank, shots: int | None, seed: int) -> Bank:
    """The train bank a run fits on: all of it, or its few-shot subset (:func:`shot_rows`)."""
    return train if shots is None else subset_bank(train, shot_rows(train.meta, shots, seed)[1])


@dataclass
class HoldoutFit:
    """What :func:`fit_with_holdout` fitted and scored.

    ``scorer`` is fitted on every train row; ``held_out`` are the held-out rows (empty when the
    split held none out), ``held_scores`` / ``held_map_max`` / ``held_map_min`` their image
    scores and placed maps' maxima / minima (None without a hold-out, or the latter two for
    image-level scorers or without a map geometry). ``test_scores`` / ``test_maps`` are set
    when test taps were given. Times in seconds (``holdout_s``: the clone's fit and score).
    """

    scorer: Scorer
    held_out: np.ndarray
    held_scores: np.ndarray | None = None
    held_maps: np.ndarray | None = None
    held_map_max: np.ndarray | None = None
    held_map_min: np.ndarray | None = None
    test_scores: np.ndarray | None = None
    test_maps: np.ndarray | None = None
    fit_s: float | None = None
    score_s: float | None = None
    holdout_s: float | None = None

    def image_threshold(self, n_sigma: float = N_SIGMA) -> float | None:
        """Mean + ``n_sigma`` sigma of the held-out image scores (None without a hold-out)."""
        if self.held_scores is None:
            return None
        return unsupervised_threshold(self.held_scores, n_sigma)

    def pixel_threshold(self, n_sigma: float = N_SIGMA) -> float | None:
        """Mean + ``n_sigma`` sigma of the held-out map maxima (None without them)."""
        if self.held_map_max is None:
            return None
        return unsupervised_threshold(self.held_map_max, n_sigma)


def _rows(taps: Taps, rows: np.ndarray) -> dict[int, np.ndarray]:
    return {k: v[rows] for k, v in taps.items()}


def fit_with_holdout(scorer: Scorer, train: Taps, split: tuple[np.ndarray, np.ndarray], *,
                     test: Taps | None = None, geometry: Mapping[str, Any] | None = None,
                     heights: Sequence[int] | None = None, widths: Sequence[int] | None = None,
                     fit: bool = True) -> HoldoutFit:
    """Fit ``scorer`` on the ``train`` taps (unless ``fit`` is False: it is fitted already),
    score ``test`` when given, and, when ``split`` = (fit rows, held-out rows) holds images
    out, fit ``scorer.clone()`` on the fit rows and score the held-out ones.

    With ``geometry`` (a run's ``run.json`` map keys: ``image_size``, ``crop``,
    ``input_size``, ``map_sigma``) and the held-out images' ``heights`` / ``widths`` (indexed
    like the train rows), the held-out maps are placed on their images and their maxima and
    minima kept. Scorer errors (ValueError) propagate.
    """
    out = HoldoutFit(scorer=scorer, held_out=np.asarray(split[1], dtype=np.intp))
    if fit:
        t0 = time.perf_counter()
        scorer.fit(train)
        out.fit_s = time.perf_counter() - t0
    if test is not None:
        t0 = time.perf_counter()
        out.test_scores, out.test_maps = scorer.score(test)
        out.score_s = time.perf_counter() - t0
    if not len(out.held_out):
        return out
    t0 = time.perf_counter()
    held = scorer.clone().fit(_rows(train, np.asarray(split[0])))
    out.held_scores, out.held_maps = held.score(_rows(train, out.held_out))
    out.holdout_s = time.perf_counter() - t0
    if out.held_maps is not None and geometry is not None and heights is not None \
            and widths is not None:
        h = np.asarray(heights)[out.held_out]
        w = np.asarray(widths)[out.held_out]
        out.held_map_min, out.held_map_max = map_extrema(out.held_maps, geometry, h, w)
    return out
