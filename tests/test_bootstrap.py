"""Stratified bootstrap: indices, exact image replicates, the binned pixel approximation against
exact recomputation, intervals, and bad input."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchbank.core.errors import ScoresError
from patchbank.evaluation import bootstrap as bs
from patchbank.evaluation import metrics


def pixel_case(seed: int, n: int = 12, n_good: int = 5, shape: tuple[int, int] = (40, 50),
               ) -> tuple[list, list, np.ndarray]:
    """Smooth noisy maps with one or two defect blocks per defective image (hard to separate)."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        m = np.zeros(shape, bool)
        if i >= n_good:
            r, c = rng.integers(0, shape[0] - 12), rng.integers(0, shape[1] - 12)
            m[r:r + rng.integers(3, 12), c:c + rng.integers(3, 12)] = True
            if i % 2:
                m[-6:-2, -9:-3] = True
        a = ndimage.gaussian_filter(rng.normal(size=shape), 2) + 0.7 * m + \
            rng.normal(0, 0.5, shape)
        masks.append(m if m.any() else None)
        maps.append(np.round(a, 2).astype(np.float32))  # rounding: many tied scores
    return masks, maps, (np.arange(n) >= n_good).astype(int)


def test_stratified_indices_keep_group_sizes_and_are_seeded() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1])
    idx = bs.stratified_indices(labels, 200, seed=3)
    assert idx.shape == (200, 9)
    assert (labels[idx] == labels[None, :]).all()  # each position keeps its class
    assert np.array_equal(idx, bs.stratified_indices(labels, 200, seed=3))
    assert not np.array_equal(idx, bs.stratified_indices(labels, 200, seed=4))
    assert len(np.unique(idx[:, labels == 1])) == 5  # draws cover the class, with repeats
    w = bs.index_weights(idx, 9)
    assert (w.sum(axis=1) == 9).all() and (w[:, labels == 0].sum(axis=1) == 4).all()


def test_image_replicates_equal_the_metrics_of_each_resample() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(60, int)]
    s = np.round(rng.normal(size=100) + y, 1)  # ties
    idx = bs.stratified_indices(y, 50, seed=1)
    reps = bs.image_replicates(y, s, idx)
    for r in range(50):
        yy, ss = y[idx[r]], s[idx[r]]
        assert reps["image_auroc"][r] == pytest.approx(metrics.image_auroc(yy, ss), abs=1e-12)
        assert reps["image_ap"][r] == pytest.approx(metrics.image_ap(yy, ss), abs=1e-12)
        assert reps["image_f1"][r] == pytest.approx(metrics.best_f1(yy, ss)[0], abs=1e-12)
    one = bs.image_replicates(y, s, np.arange(100)[None])
    assert one["image_auroc"][0] == pytest.approx(metrics.image_auroc(y, s), abs=1e-12)


def test_image_intervals_agree_with_a_naive_sklearn_bootstrap_and_are_fast() -> None:
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(45, int), np.ones(55, int)]
    s = rng.normal(size=100) + 1.2 * y
    t0 = time.perf_counter()
    cis = bs.bootstrap_cis(y, s, None, n_boot=1000, seed=0)
    took = time.perf_counter() - t0
    assert took < 1.0, took
    good, bad = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    naive = []
    for _ in range(400):
        i = np.r_[rng.choice(good, good.size), rng.choice(bad, bad.size)]
        naive.append(roc_auc_score(y[i], s[i]))
    lo, hi = np.percentile(naive, [2.5, 97.5])
    assert cis["image_auroc"] == pytest.approx((lo, hi), abs=0.03)
    point = {"image_auroc": metrics.image_auroc(y, s), "image_ap": metrics.image_ap(y, s),
             "image_f1": metrics.best_f1(y, s)[0]}
    for k, v in point.items():
        assert cis[k][0] < v < cis[k][1], k
    assert all(np.isnan(cis[k]).all() for k in bs.PIXEL_METRICS)  # no pixel stats given
    assert bs.bootstrap_cis(y, s, None, seed=0) == cis  # deterministic


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_stats_match_exact_metrics_on_the_sample_and_on_resamples(seed: int) -> None:
    masks, maps, labels = pixel_case(seed)
    exact = metrics.pixel_metrics(masks, maps, progress=False)
    stats = bs.PixelStats(masks, maps)
    approx = stats.metrics(np.ones(len(maps)))
    for k in ("pixel_auroc", "pixel_ap", "pro", "best_dice"):
        assert approx[k] == pytest.approx(exact[k], abs=1e-3), k
    assert 0.6 < exact["pixel_auroc"] < 0.99 and 0.2 < exact["pro"] < 0.95  # not trivial
    idx = bs.stratified_indices(labels, 4, seed=seed)
    reps = stats.replicates(bs.index_weights(idx, len(maps)))
    for r in range(4):
        e = metrics.pixel_metrics([masks[j] for j in idx[r]], [maps[j] for j in idx[r]],
                                  progress=False)
        for k in ("pixel_auroc", "pixel_ap", "pro", "best_dice"):
            assert reps[k][r] == pytest.approx(e[k], abs=1e-3), (k, r)


def test_pixel_intervals_hold_the_exact_point_estimate() -> None:
    masks, maps, labels = pixel_case(7, n=16, n_good=6)
    exact = metrics.pixel_metrics(masks, maps, progress=False)
    scores = np.array([float(a.max()) for a in maps])
    cis = bs.bootstrap_cis(labels, scores, bs.PixelStats(masks, maps), n_boot=300, seed=0,
                           pixel_points=exact)
    for k in bs.PIXEL_METRICS:
        lo, hi = cis[k]
        assert lo < exact[k] < hi and hi - lo < 0.5, k
    # perfectly separated maps: every replicate is exactly 1 after the bias correction
    perfect = [(m if m is not None else np.zeros((40, 50), bool)).astype(np.float32)
               for m in masks]
    exact = metrics.pixel_metrics(masks, perfect, progress=False)
    cis = bs.bootstrap_cis(labels, scores, bs.PixelStats(masks, perfect), n_boot=100,
                           pixel_points=exact)
    assert np.array([cis[k] for k in bs.PIXEL_METRICS]) == pytest.approx(1.0, abs=1e-12)


def test_bad_input_gives_one_line_or_nan_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    for bad in (10, 99, -1, 2.5):
        with pytest.raises(ScoresError, match="use 0 .* at least 100"):
            bs.bootstrap_cis(y, s, None, n_boot=bad)
    with pytest.raises(ScoresError, match="not in \\(0, 1\\)"):
        bs.bootstrap_cis(y, s, None, ci=95)
    assert all(np.isnan(v).all() for v in bs.bootstrap_cis(y, s, None, n_boot=0).values())
    cases = {"one class": (np.ones(4), s), "same score": (y, np.full(4, 0.5)),
             "NaN or inf": (y, np.array([0.1, np.inf, 0.3, 0.4]))}
    for reason, (labels, scores) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, "patchbank.evaluation.bootstrap"):
            cis = bs.bootstrap_cis(labels, scores, None, n_boot=100)
        assert all(np.isnan(v).all() for v in cis.values())
        assert reason in caplog.text
    masks, maps, labels = pixel_case(0, n=4, n_good=2)
    maps[1][0, 0] = np.nan
    stats = bs.PixelStats(masks, maps)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "patchbank.evaluation.bootstrap"):
        cis = bs.bootstrap_cis(labels, np.arange(4.0), stats, n_boot=100)
    assert "image 1: anomaly map contains NaN or inf" in caplog.text
    assert np.isnan(cis["pro"]).all() and not np.isnan(cis["image_auroc"]).any()
    good_only = bs.PixelStats([None, None], maps[:1] + maps[2:3])
    assert np.isnan(good_only.metrics([1, 1])["pixel_auroc"])
