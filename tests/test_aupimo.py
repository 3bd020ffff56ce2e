"""Tests for patchbank.evaluation.aupimo: a hand-computed case, a direct reference, edge cases."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from patchbank.core.errors import ScoresError
from patchbank.evaluation.aupimo import aupimo, aupimo_scores

N = 1_000_000  # pixels of the hand-checkable good image: scores 0, 1, ..., N - 1


def _hand_case() -> tuple[list, list]:
    """One good image scored 0..N-1 and three 10x10 defective images.

    With K = N thresholds linspace(0, N-1) the thresholds are the integers, so the shared FPR at
    threshold k is (N - k) / N: FPR 1e-4 at k = N - 100, 1e-5 at k = N - 10 (91 points).
    """
    good = np.arange(N, dtype=np.float32).reshape(1000, 1000)
    full = np.ones((10, 10), dtype=bool)
    above = np.full((10, 10), N + 5, dtype=np.float32)  # TPR 1 at every threshold
    half = np.where(np.arange(100).reshape(10, 10) < 50, N + 5, 0).astype(np.float32)
    step = np.full((10, 10), N - 32, dtype=np.float32)  # TPR 1 for FPR >= 32/N, else 0
    masks = [np.zeros(good.shape, dtype=bool), full, full, full]
    return masks, [good, above, half, step]


def test_hand_checkable_values():
    masks, maps = _hand_case()
    got = aupimo_scores(masks, maps, num_thresholds=N)
    step = (math.log(100 / 32) + 0.5 * math.log(32 / 31)) / math.log(10)
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1:], [1.0, 0.5, step], rtol=0, atol=1e-12)
    assert aupimo(masks, maps, num_thresholds=N) == pytest.approx((1.5 + step) / 3, abs=1e-12)


def test_affine_transform_is_exact_and_none_mask_is_good():
    masks, maps = _hand_case()
    base = aupimo_scores(masks, maps, num_thresholds=N)
    moved = aupimo_scores([None] + masks[1:], [2 * m + 3 for m in maps], num_thresholds=N)
    np.testing.assert_array_equal(base, moved)


# ---------------------------------------------------------------- random case, direct reference


def _random_case(seed: int = 0) -> tuple[list, list]:
    """Two good 400x400 maps with log-uniform tails (FPR(t) ~ 10^-t), three defective maps."""
    rng = np.random.default_rng(seed)
    good = [(-np.log10(rng.uniform(1e-7, 1, (400, 400)))).astype(np.float32) for _ in range(2)]
    masks = [np.zeros((400, 400), bool)] * 2
    maps = list(good)
    for shift in (3.5, 4.5, 6.0):
        m = np.zeros((400, 400), bool)
        m[100:160, 50:90] = True
        a = (-np.log10(rng.uniform(1e-7, 1, (400, 400)))).astype(np.float32)
        a[m] = rng.normal(shift, 0.7, int(m.sum())).astype(np.float32)
        masks.append(m)
        maps.append(a)
    return masks, maps


def ref_aupimo(masks, maps, k, bounds=(1e-5, 1e-4)):
    """The definition written out threshold by threshold (boolean masks per threshold)."""
    good = [a for m, a in zip(masks, maps, strict=True) if not m.any()]
    lo = min(a.min() for a in good)
    hi = max(a.max() for a in good)
    thr = np.linspace(lo, hi, k, dtype=np.float32)
    fpr = np.array([np.mean([np.mean(a >= t) for a in good]) for t in thr])
    first = int(np.argmin(np.abs(fpr - bounds[1])))
    last = int(np.argmin(np.abs(fpr - bounds[0])))
    x = np.log(fpr[first:last + 1])
    out = []
    for m, a in zip(masks, maps, strict=True):
        if not m.any():
            out.append(np.nan)
            continue
        tpr = np.array([np.mean(a[m] >= t) for t in thr[first:last + 1]])
        # x descends: negate the trapezoid area
        out.append(-np.trapezoid(tpr, x) / math.log(bounds[1] / bounds[0]))
    return np.clip(np.array(out), 0, 1)


def test_matches_direct_reference():
    masks, maps = _random_case()
    got = aupimo_scores(masks, maps, num_thresholds=1500)
    want = ref_aupimo(masks, maps, 1500)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(got[:2]).all()
    assert 0.02 < got[2] < got[3] < got[4] and got[4] > 0.9  # larger shift, higher AUPIMO


def test_nonlinear_monotone_transform_changes_little():
    """Thresholds are linear in the score, so only affine maps are exact; a smooth monotone map
    moves AUPIMO by the threshold quantisation only."""
    masks, maps = _random_case(1)
    base = aupimo_scores(masks, maps)
    moved = aupimo_scores(masks, [np.cbrt(a) for a in maps])
    np.testing.assert_allclose(moved[2:], base[2:], atol=1e-3)


# ---------------------------------------------------------------- edge cases and bad input


def test_no_good_images_is_nan_with_reason(caplog):
    m = np.ones((4, 4), bool)
    with caplog.at_level(logging.WARNING, "patchbank.evaluation.aupimo"):
        got = aupimo_scores([m, m], [np.zeros((4, 4)), np.ones((4, 4))])
    assert np.isnan(got).all() and "0 good and 2 defective" in caplog.text


def test_unreachable_fpr_range_is_nan_with_reason(caplog):
    """100 good pixels: the lowest reachable FPR is 1e-2, far above the range."""
    rng = np.random.default_rng(0)
    masks = [np.zeros((10, 10), bool), np.ones((10, 10), bool)]
    maps = [rng.random((10, 10)), rng.random((10, 10))]
    with caplog.at_level(logging.WARNING, "patchbank.evaluation.aupimo"):
        assert math.isnan(aupimo(masks, maps))
    assert "does not contain the range" in caplog.text


def test_too_few_thresholds_is_nan_with_reason(caplog):
    masks, maps = _hand_case()
    with caplog.at_level(logging.WARNING, "patchbank.evaluation.aupimo"):
        got = aupimo_scores(masks, maps, num_thresholds=1000)
    assert np.isnan(got).all() and "raise num_thresholds" in caplog.text


def test_constant_good_maps_is_nan_with_reason(caplog):
    masks = [np.zeros((4, 4), bool), np.ones((4, 4), bool)]
    with caplog.at_level(logging.WARNING, "patchbank.evaluation.aupimo"):
        got = aupimo_scores(masks, [np.zeros((4, 4)), np.ones((4, 4))])
    assert np.isnan(got).all() and "constant" in caplog.text


@pytest.mark.parametrize(("masks", "maps", "match"), [
    ([np.zeros((2, 2), bool)], [], "1 masks but 0 maps"),
    ([], [], "no masks/maps"),
    ([np.zeros((2, 3), bool)], [np.zeros((2, 2))], "mask shape"),
    ([None], [np.zeros((1, 2, 2))], "expected 2-D"),
    ([None], [np.array([[0.0, np.nan]])], "NaN or inf"),
    ([None], [np.array([[0.0, np.inf]])], "NaN or inf"),
])
def test_bad_input_raises_one_line(masks, maps, match):
    with pytest.raises(ScoresError, match=match) as err:
        aupimo_scores(masks, maps)
    assert "\n" not in str(err.value)


def test_bad_parameters_raise():
    masks, maps = [None], [np.zeros((2, 2))]
    with pytest.raises(ScoresError, match="fpr_bounds"):
        aupimo_scores(masks, maps, fpr_bounds=(1e-4, 1e-5))
    with pytest.raises(ScoresError, match="num_thresholds"):
        aupimo_scores(masks, maps, num_thresholds=1)
