"""Tests for patchbank.evaluation.metrics: exactness against slow references and scikit-learn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from patchbank.core.errors import ScoresError
from patchbank.evaluation import metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec_ad"


# ---------------------------------------------------------------- slow reference implementation


def ref_pro_curve(masks, maps):
    """One (fpr, pro) point per distinct threshold (descending), preceded by (0, 0)."""
    neg, regions = [], []
    for mask, amap in zip(masks, maps, strict=True):
        a = np.asarray(amap, dtype=np.float32).astype(np.float64)
        m = np.asarray(mask) != 0
        neg.append(a[~m])
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == r] for r in range(1, k + 1)]
    neg = np.concatenate(neg)
    thresholds = np.unique(np.concatenate([neg] + regions))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(float(np.mean(neg >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fprs), np.array(pros)


def ref_area(x, y, x_max):
    """Trapezoids segment by segment, the one crossing x_max cut by linear interpolation."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:], strict=True):
        if x1 <= x_max:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < x_max:
            y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            area += (x_max - x0) * (y0 + y_cut) / 2
            break
        else:
            break
    return area


def ref_pro(masks, maps, max_fpr=0.3):
    x, y = ref_pro_curve(masks, maps)
    return ref_area(x, y, max_fpr) / max_fpr


def flat(masks, maps):
    """All pixels of all images: (labels, float32 scores)."""
    y = np.concatenate([np.asarray(m).ravel() != 0 for m in masks])
    s = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in maps])
    return y, s


def random_case(seed: int, quantize: float | None):
    """Images of different sizes, several regions each, good-only images mixed in."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(6):
        h, w = rng.integers(12, 30, size=2)
        if i % 3 == 2:  # good-only image
            mask = np.zeros((h, w), dtype=np.uint8)
        elif i == 4:  # scattered pixels: many regions touching only diagonally
            mask = (rng.random((h, w)) < 0.2).astype(np.uint8)
        else:
            blobs = ndimage.gaussian_filter(rng.random((h, w)), 1.5)
            mask = (blobs > np.quantile(blobs, 0.85)).astype(np.uint8) * 255
        amap = rng.random((h, w)) + 0.6 * (mask > 0)
        if quantize:
            amap = np.round(amap / quantize) * quantize
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    # a region that is never detected: scores 0 inside it
    masks[0][:3, :3] = 1
    maps[0][:3, :3] = 0.0
    return masks, maps


# ---------------------------------------------------------------- PRO


def test_pro_perfect_and_never_detected():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:3, 1:3] = True
    assert metrics.pro([mask], [mask.astype(np.float32)]) == pytest.approx(1.0, abs=1e-12)
    # region scores lowest: PRO stays 0 until FPR 1
    assert metrics.pro([mask], [(~mask).astype(np.float32)]) == pytest.approx(0.0, abs=1e-12)


def test_pro_hand_computed_with_interpolation():
    # one region {a: 0.9, b: 0.2}; negatives 0.8, 0.5, 0.1, 0.1 (n_neg = 4)
    mask = np.array([[1, 1, 0, 0, 0, 0]], dtype=np.uint8)
    amap = np.array([[0.9, 0.2, 0.8, 0.5, 0.1, 0.1]], dtype=np.float32)
    # curve: (0,0) (0,.5) (.25,.5) (.5,.5) (.5,1) (1,1); area to 0.3 = 0.15 -> 0.5
    assert metrics.pro([mask], [amap]) == pytest.approx(0.5, abs=1e-9)
    # to 0.6: 0.5*0.5 + 0.1*1 = 0.35 -> 0.35 / 0.6
    assert metrics.pro([mask], [amap], max_fpr=0.6) == pytest.approx(0.35 / 0.6, abs=1e-9)
    assert metrics.pro([mask], [amap], max_fpr=1.0) == pytest.approx(0.75, abs=1e-9)


def test_pro_diagonal_touch_is_one_region():
    # A (1,1) touches B (2,2) diagonally -> one region under 8-connectivity; C separate
    mask = np.zeros((5, 5), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[4, 4] = True
    amap = np.full((5, 5), 0.5, dtype=np.float32)
    amap[1, 1], amap[2, 2], amap[4, 4] = 1.0, 0.0, 0.0
    # regions {A,B}, {C}: PRO = mean(1/2, 0) = 0.25 from FPR 0 (4-connectivity would give 1/3)
    assert metrics.pro([mask], [amap]) == pytest.approx(0.25, abs=1e-12)
    assert ref_pro([mask], [amap]) == pytest.approx(0.25, abs=1e-12)


def test_pro_regions_are_averaged_over_all_images():
    # image 1: one big region fully detected; image 2: a small region missed; image 3: good
    m1 = np.zeros((6, 6), bool)
    m1[:4, :4] = True
    m2 = np.zeros((4, 4), bool)
    m2[0, 0] = True
    m3 = np.zeros((3, 5), bool)
    a1, a2, a3 = m1 * 1.0, np.full((4, 4), 0.5), np.full((3, 5), 0.5)
    a2[0, 0] = 0.0
    # big region detected at FPR 0; the small one only at FPR 1 -> PRO 0.5 up to 0.3
    assert metrics.pro([m1, m2, m3], [a1, a2, a3]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantize", [None, 0.05])
def test_pro_matches_reference_on_random_cases(seed, quantize):
    masks, maps = random_case(seed, quantize)
    for max_fpr in (0.3, 0.05, 1.0):
        assert metrics.pro(masks, maps, max_fpr) == pytest.approx(
            ref_pro(masks, maps, max_fpr), abs=1e-6)


@pytest.mark.parametrize("quantize", [None, 0.1])
def test_pro_curve_is_the_reference_polyline(quantize):
    masks, maps = random_case(3, quantize)
    fpr, pro = metrics.pro_curve(masks, maps)
    rx, ry = ref_pro_curve(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and fpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    if quantize is None:  # all scores distinct: far fewer points than thresholds
        assert len(fpr) < len(rx) / 2
    ref_points = {(round(a, 9), round(b, 9)) for a, b in zip(rx, ry, strict=True)}
    assert all((round(a, 9), round(b, 9)) in ref_points for a, b in zip(fpr, pro, strict=True))
    for x_max in (0.1, 0.3, 0.77):
        assert ref_area(fpr, pro, x_max) == pytest.approx(ref_area(rx, ry, x_max), abs=1e-9)


def test_pro_nan_without_regions():
    maps = [np.random.default_rng(0).random((4, 4))]
    assert math.isnan(metrics.pro([np.zeros((4, 4))], maps))
    fpr, pro = metrics.pro_curve([None], maps)
    assert fpr.size == 0 and pro.size == 0


# ---------------------------------------------------------------- AUROC, AP, Dice


@pytest.mark.parametrize("quantize", [None, 0.1])
def test_pixel_auroc_ap_match_sklearn(quantize):
    masks, maps = random_case(7, quantize)
    y, s = flat(masks, maps)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(y, s), abs=1e-6)


def test_pixel_metrics_one_pass_equals_single_functions():
    masks, maps = random_case(4, 0.05)
    masks[2] = None  # a good image may come without a mask
    out = metrics.pixel_metrics(masks, maps, progress=False)
    assert set(out) == {"pixel_auroc", "pixel_ap", "pro", "best_dice"}
    assert out["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
    assert out["pixel_ap"] == metrics.pixel_ap(masks, maps)
    assert out["best_dice"] == metrics.best_dice(masks, maps)
    masks[2] = np.zeros(maps[2].shape, np.uint8)
    assert out["pro"] == pytest.approx(ref_pro(masks, maps), abs=1e-6)


def test_best_dice_hand_computed():
    # thresholds 0.9: 2/3; 0.8: 1/2; 0.4: TP 2, FP 1 -> 4/5; 0.1: 1/2
    mask = np.array([[1, 1, 0, 0, 0, 0]], dtype=np.uint8)
    amap = np.array([[0.9, 0.4, 0.8, 0.1, 0.1, 0.1]], dtype=np.float32)
    assert metrics.best_dice([mask], [amap]) == pytest.approx(0.8)
    # split over two images: same pooled answer
    assert metrics.best_dice([mask[:, :3], mask[:, 3:]],
                             [amap[:, :3], amap[:, 3:]]) == pytest.approx(0.8)


def test_best_dice_matches_brute_force():
    masks, maps = random_case(5, 0.05)
    y, s = flat(masks, maps)
    brute = max(2 * np.sum(y & (s >= t)) / (np.sum(s >= t) + y.sum()) for t in np.unique(s))
    assert metrics.best_dice(masks, maps) == pytest.approx(brute, abs=1e-12)


def test_undefined_pixel_metrics_are_nan():
    out = metrics.pixel_metrics([np.zeros((3, 3))], [np.ones((3, 3))], progress=False)
    assert all(math.isnan(v) for v in out.values())


# ---------------------------------------------------------------- input errors


def test_shape_mismatch_names_image_and_shapes():
    masks = [np.zeros((4, 4)), np.zeros((8, 6))]
    maps = [np.zeros((4, 4)), np.zeros((8, 5))]
    with pytest.raises(ScoresError, match=r"image 1: mask shape \(8, 6\) != map shape \(8, 5\)"):
        metrics.pixel_metrics(masks, maps)


def test_other_input_errors():
    with pytest.raises(ScoresError, match="2 masks but 1 maps"):
        metrics.pixel_auroc([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])
    with pytest.raises(ScoresError, match="image 0: anomaly map has shape"):
        metrics.pixel_auroc([np.zeros((2, 2))], [np.zeros((1, 2, 2))])
    with pytest.raises(ScoresError, match="image 0: anomaly map contains NaN"):
        metrics.pixel_auroc([np.eye(2)], [np.full((2, 2), np.nan)])
    with pytest.raises(ScoresError, match="max_fpr"):
        metrics.pro([np.eye(2)], [np.eye(2)], max_fpr=0.0)
    with pytest.raises(ScoresError, match="differ in length"):
        metrics.image_auroc([0, 1], [0.5])


# ---------------------------------------------------------------- image level


def test_image_auroc_ap_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60) + 0.5 * y, 1)  # with ties
    assert metrics.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert metrics.image_ap(y, s) == pytest.approx(average_precision_score(y, s))
    assert math.isnan(metrics.image_auroc([1, 1], [0.1, 0.2]))


def test_best_f1_and_threshold_metrics_hand_computed():
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.1, 0.3, 0.35, 0.4, 0.8, 0.9]
    # t=0.35: TP 3, FP 1 -> P 0.75, R 1, F1 6/7 (t=0.8: 0.8, t=0.4: 0.667, t=0.1: 0.667)
    f1, thr, prec, rec = metrics.best_f1(labels, scores)
    assert (f1, thr, prec, rec) == pytest.approx((6 / 7, 0.35, 0.75, 1.0))
    m = metrics.threshold_metrics(labels, scores, 0.4)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    none = metrics.threshold_metrics(labels, scores, 5.0)
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)


def test_unsupervised_threshold():
    s = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sample std sqrt(5/3)
    assert metrics.unsupervised_threshold(s) == pytest.approx(2.5 + 3 * math.sqrt(5 / 3))
    assert metrics.unsupervised_threshold(s, n_sigma=1) == pytest.approx(2.5 + math.sqrt(5 / 3))
    with pytest.raises(ScoresError, match=">= 2 finite"):
        metrics.unsupervised_threshold([1.0])


def test_composite_scores():
    out = metrics.composite_scores(0.9, 0.8, 0.96, 0.5)
    assert out == pytest.approx({"image_score": 0.85, "pixel_score": 0.73, "overall_score": 0.79})
    nan = metrics.composite_scores(0.9, 0.8, float("nan"), float("nan"))
    assert nan["image_score"] == pytest.approx(0.85)
    assert math.isnan(nan["pixel_score"]) and math.isnan(nan["overall_score"])


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_bottle_masks_as_maps():
    root = DATA / "bottle"
    if not root.is_dir():
        pytest.skip(f"MVTec bottle not found at {root}")
    paths = sorted((root / "ground_truth" / "broken_small").glob("*_mask.png"))[:4]
    masks = [np.asarray(Image.open(p)) for p in paths] + [np.zeros((900, 900), np.uint8)]
    rng = np.random.default_rng(0)
    maps = [(m > 0) + rng.random(m.shape, dtype=np.float32) * 0.5 for m in masks]
    out = metrics.pixel_metrics(masks, maps, progress=False)
    assert out == pytest.approx({"pixel_auroc": 1.0, "pixel_ap": 1.0, "pro": 1.0,
                                 "best_dice": 1.0})
    # a blurred map loses some overlap at region borders: all metrics drop below 1
    blurred = [ndimage.gaussian_filter(a, 15) for a in maps]
    out = metrics.pixel_metrics(masks, blurred, progress=False)
    y, s = flat(masks, blurred)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    assert out["best_dice"] == pytest.approx(f1.max(), abs=1e-9)
    # pinned (these inputs are fixed: seeded noise on the first four broken_small masks)
    assert out == pytest.approx({"pixel_auroc": 0.9998748685, "pixel_ap": 0.9960967141,
                                 "pro": 0.9938946430, "best_dice": 0.9721612732}, abs=1e-7)
