"""Each method's image score against a direct re-implementation of its official formula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from patchbank.scorers import SCORERS, load_scorer, make_scorer
from patchbank.scorers.image_score import smoothed_max


def banks(seed: int = 0, n_train: int = 12, n_test: int = 6, grid: int = 8, c: int = 16):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(n_train, grid, grid, c)).astype(np.float32)
    test = rng.normal(size=(n_test, grid, grid, c)).astype(np.float32)
    test[0, 2:5, 2:5] += 6.0  # one clear anomaly
    return train, test


def official_max_map(maps: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """PaDiM's official image score: bilinear upsampling to the input, Gaussian, maximum."""
    up = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(size, size),
                                         mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.array([gaussian_filter(m, sigma=sigma, mode="nearest").max() for m in up])


def test_defaults_are_the_official_rules() -> None:
    defaults = {name: cls.Params().image_score for name, cls in SCORERS.items()
                if "image_score" in cls.Params.__dataclass_fields__}
    assert defaults == {"knn": "max_grid", "padim": "max_map", "patchcore": "max_grid",
                        "spade": "pooled_knn", "anomalydino": "topk_mean",
                        "ae_features": "max_grid", "ae_pixels": "max_grid"}


def test_padim_max_map_at_the_input_size() -> None:
    train, test = banks()
    scorer = make_scorer("padim", {"d": 8}, device="cpu")
    scorer.input_size = 32
    scores, maps = scorer.fit(train).score(test)
    np.testing.assert_allclose(scores, official_max_map(maps, 32), rtol=1e-6)
    assert scores.argmax() == 0
    # the smoothed maximum is below the raw one (a Gaussian averages the peak away)
    assert (scores < maps.reshape(len(maps), -1).max(axis=1)).all()
    grid = make_scorer("padim", {"d": 8, "image_score": "max_grid"}, device="cpu")
    g_scores, g_maps = grid.fit(train).score(test)
    np.testing.assert_array_equal(g_maps, maps)
    np.testing.assert_allclose(g_scores, maps.reshape(len(maps), -1).max(axis=1))


def test_smoothed_max_follows_the_input_size_and_sigma() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 1], maps[1] = 1.0, 0.5
    up = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(16, 16),
                                         mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(smoothed_max(maps, 16, 0.0), up.reshape(2, -1).max(axis=1))
    assert smoothed_max(maps, 16, 0.0)[1] == 0.5
    np.testing.assert_allclose(smoothed_max(maps, 16, 4.0), official_max_map(maps, 16),
                               rtol=1e-6)
    # None: a stride-4 grid (16 rows for 4)
    np.testing.assert_allclose(smoothed_max(maps, None, 4.0), smoothed_max(maps, 16, 4.0))


def test_patchcore_scores_the_grid_maximum() -> None:
    train, test = banks(1)
    pc = make_scorer("patchcore", {"coreset": 0.5, "target_dim": 32, "pretrain_dim": 32},
                     device="cpu").fit(train)
    scores, maps = pc.score(test)
    np.testing.assert_allclose(scores, maps.reshape(len(maps), -1).max(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="image_score"):
        make_scorer("patchcore", {"n_reweight": 3, "image_score": "max_map"})


def test_knn_and_anomalydino_topk_means() -> None:
    train, test = banks(2)
    knn = make_scorer("knn", {"image_score": "topk_mean", "topk_frac": 0.05}, device="cpu")
    scores, maps = knn.fit(train).score(test)
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    np.testing.assert_allclose(scores, flat[:, -4:].mean(axis=1), rtol=1e-6)  # ceil(0.05 * 64)
    dino = make_scorer("anomalydino", device="cpu")  # official mean_top1p: int(0.01 P) or max
    d_scores, d_maps = dino.fit(train).score(test)
    np.testing.assert_allclose(d_scores, d_maps.reshape(len(d_maps), -1).max(axis=1), rtol=1e-6)
    dino2 = make_scorer("anomalydino", {"top_frac": 0.1}, device="cpu")
    s2, m2 = dino2.fit(train).score(test)
    top = np.sort(m2.reshape(len(m2), -1), axis=1)[:, -6:]  # int(0.1 * 64)
    np.testing.assert_allclose(s2, top.mean(axis=1), rtol=1e-6)


def test_spade_pooled_knn_and_its_alternative() -> None:
    train, test = banks(3)
    spade = make_scorer("spade", {"k_images": 3}, device="cpu")
    scores, maps = spade.fit(train).score(test)
    pooled_train = train.astype(np.float64).mean(axis=(1, 2))
    pooled_test = test.astype(np.float64).mean(axis=(1, 2))
    d = np.linalg.norm(pooled_test[:, None] - pooled_train[None], axis=2)
    np.testing.assert_allclose(scores, np.sort(d, axis=1)[:, :3].mean(axis=1), rtol=1e-5)
    alt = make_scorer("spade", {"k_images": 3, "image_score": "max_map"}, device="cpu")
    alt.input_size = 32
    a_scores, a_maps = alt.fit(train).score(test)
    np.testing.assert_allclose(a_scores, official_max_map(a_maps, 32), rtol=1e-6)


def test_input_size_is_saved_and_cloned(tmp_path: Path) -> None:
    train, test = banks(4)
    scorer = make_scorer("padim", {"d": 8}, device="cpu")
    scorer.input_size = 40
    scorer.fit(train)
    assert scorer.clone().input_size == 40
    scorer.save(tmp_path / "m.npz")
    back = load_scorer(tmp_path / "m.npz", device="cpu")
    assert back.input_size == 40
    np.testing.assert_allclose(back.score(test)[0], scorer.score(test)[0], rtol=1e-5)


def test_models_saved_before_the_rule_keep_their_image_score(tmp_path: Path) -> None:
    """A version-2 PaDiM header (no image_score) still scores by the raw grid's maximum, as its
    run's image_scores.csv was written; the old knn ``reduce`` is read as ``image_score``."""
    train, test = banks(5)
    scorer = make_scorer("padim", {"d": 8, "image_score": "max_grid"}, device="cpu").fit(train)
    path = tmp_path / "old.npz"
    scorer.save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    meta["version"] = 2
    del meta["params"]["image_score"], meta["input_size"]
    header = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, __meta__=header, **arrays)
    back = load_scorer(path, device="cpu")
    assert back.params["image_score"] == "max_grid" and back.input_size is None
    np.testing.assert_allclose(back.score(test)[0], scorer.score(test)[0], rtol=1e-5)
    assert make_scorer("knn", {"reduce": "max"}).params["image_score"] == "max_grid"
    assert make_scorer("ae_features", {"reduce": "topk"}).params["image_score"] == "topk_mean"
