"""Scoring methods on synthetic banks: numbers against numpy/scipy references, the coreset's
greedy k-center behaviour, PaDiM's bounded fit memory, and make_scorer's parameter parsing."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score

from patchbank.core.errors import BankError, PatchbankError
from patchbank.scorers import SCORERS, make_scorer
from patchbank.scorers.base import coerce_param
from patchbank.scorers.checks import POLICY_LAYERS
from patchbank.scorers.coreset import coreset_indices, greedy_kcenter
from patchbank.scorers.neighbors import FlatIndex, knn
from patchbank.scorers.padim import GaussianAccumulator, PaDiMScorer, default_d
from patchbank.scorers.patchcore import aggregate, reweight

# ---------------------------------------------------------------- synthetic banks

H, W, C = 8, 8, 16
ANOMALY_AT = (3, 4)


def synthetic_banks(dtype: type = np.float32, n_train: int = 20, n_good: int = 6,
                    n_bad: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train bank, test bank whose last ``n_bad`` images have one shifted patch, labels."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(H, W, C))

    def sample(n: int) -> np.ndarray:
        return base + 0.1 * rng.normal(size=(n, H, W, C))

    test = sample(n_good + n_bad)
    test[n_good:, ANOMALY_AT[0], ANOMALY_AT[1]] += 8.0
    labels = np.array([0] * n_good + [1] * n_bad)
    return sample(n_train).astype(dtype), test.astype(dtype), labels


# ---------------------------------------------------------------- k-NN search


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_bruteforce_and_chunking_does_not_change_it(metric: str, k: int) -> None:
    rng = np.random.default_rng(1)
    db = rng.normal(size=(300, 12)).astype(np.float32)
    q = rng.normal(size=(50, 12)).astype(np.float32)
    db_before = db.copy()
    ref = cdist(q.astype(np.float64), db.astype(np.float64),
                "euclidean" if metric == "l2" else "cosine")
    order = np.argsort(ref, axis=1)[:, :k]
    dist, idx = knn(db, q, k=k, metric=metric, device="cpu")
    assert dist.shape == (50, k) and dist.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(ref, order, axis=1), rtol=1e-4,
                               atol=1e-4)
    d7, i7 = knn(db, q, k=k, metric=metric, chunk=7, device="cpu")  # 8 chunks, ragged last
    np.testing.assert_array_equal(i7, idx)
    np.testing.assert_allclose(d7, dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(db, db_before)  # cosine normalises a copy, not the input


def test_flat_index_accepts_banks_and_rejects_bad_k() -> None:
    rng = np.random.default_rng(2)
    db = rng.normal(size=(10, 4)).astype(np.float16)
    index = FlatIndex(db, "l2", device="cpu")
    dist, idx = index.search(db.reshape(2, 5, 1, 4), k=1)  # a bank-shaped float16 query
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))  # each vector finds itself
    assert np.abs(dist).max() < 1e-3
    with pytest.raises(ValueError, match="k=11"):
        index.search(db, k=11)
    with pytest.raises(ValueError, match="metric"):
        FlatIndex(db, "manhattan")


# ---------------------------------------------------------------- PaDiM


def test_padim_gaussian_and_mahalanobis_match_numpy() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(30, 3, 4, 10)).astype(np.float32)
    test = rng.normal(size=(5, 3, 4, 10)).astype(np.float32)
    scorer = PaDiMScorer(d=6, eps=0.01, seed=3, device="cpu")
    scorer.batch_images = 4  # 8 batches, the last ragged
    scorer.fit(train)
    ch = scorer.channels_
    assert len(ch) == 6 and len(set(ch.tolist())) == 6 and ch.max() < 10
    x = train[..., ch].reshape(30, 12, 6).astype(np.float64)
    t = test[..., ch].reshape(5, 12, 6).astype(np.float64)
    scores, maps = scorer.score(test)
    assert maps.shape == (5, 3, 4) and maps.dtype == np.float32
    cov_fit = scorer.covariance()
    for loc in range(12):
        mean = x[:, loc].mean(axis=0)
        cov = np.cov(x[:, loc], rowvar=False) + 0.01 * np.eye(6)  # unbiased (N - 1)
        np.testing.assert_allclose(scorer.mean_[loc], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov_fit[loc], cov, rtol=1e-9, atol=1e-12)
        inv = np.linalg.inv(cov)
        ref = [scipy_mahalanobis(t[i, loc], mean, inv) for i in range(5)]
        np.testing.assert_allclose(maps.reshape(5, 12)[:, loc], ref, rtol=1e-5)
    # image score as the official code: upsampled to the input (4x the stride-4 grid here),
    # smoothed with sigma 4, maximum
    up = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(12, 16),
                                         mode="bilinear", align_corners=False)[:, 0].numpy()
    official = [gaussian_filter(m, sigma=4, mode="nearest").max() for m in up]
    np.testing.assert_allclose(scores, official, rtol=1e-6)
    # a different seed picks other channels
    other = PaDiMScorer(d=6, seed=4, device="cpu").fit(train)
    assert not np.array_equal(other.channels_, ch)


def test_padim_batched_accumulation_equals_one_shot() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(loc=50.0, size=(25, 7, 5))  # large offset: the shifted sums keep precision
    one = GaussianAccumulator(7, 5)
    one.update(x)
    m1, c1 = one.finalize(eps=0.1)
    parts = GaussianAccumulator(7, 5)
    for lo, hi in [(0, 3), (3, 4), (4, 17), (17, 25)]:
        parts.update(x[lo:hi])
    m2, c2 = parts.finalize(eps=0.1)
    np.testing.assert_allclose(m2, m1, rtol=1e-12)
    np.testing.assert_allclose(c2, c1, rtol=1e-9, atol=1e-12)
    ref = np.stack([np.cov(x[:, i], rowvar=False) for i in range(7)]) + 0.1 * np.eye(5)
    np.testing.assert_allclose(c1, ref, rtol=1e-9, atol=1e-12)
    # the torch backend (used on GPUs) agrees, here on the CPU
    tb = GaussianAccumulator(7, 5, backend="torch", device="cpu")
    for lo, hi in [(0, 10), (10, 25)]:
        tb.update(x[lo:hi])
    m3, c3 = tb.finalize(eps=0.1)
    np.testing.assert_allclose(m3.numpy(), m1, rtol=1e-12)
    np.testing.assert_allclose(c3.numpy(), c1, rtol=1e-9, atol=1e-12)
    # and the scorer gives the same model whatever its batch size
    bank = rng.normal(size=(12, 2, 3, 8)).astype(np.float16)
    a = PaDiMScorer(device="cpu")
    a.batch_images = 1
    b = PaDiMScorer(device="cpu").fit(bank)
    a.fit(bank)
    np.testing.assert_allclose(a.covariance(), b.covariance(), rtol=1e-9, atol=1e-12)
    assert b.d_ == 8  # default d = min(C, 100)


def test_padim_default_d_follows_the_paper() -> None:
    assert default_d(448) == 100 and default_d(1792) == 550
    assert default_d(64) == 64 and default_d(1000) == 100


def _padim_fit_peak(n_images: int) -> int:
    train = np.random.default_rng(5).normal(size=(n_images, 16, 16, 64)).astype(np.float32)
    scorer = PaDiMScorer(device="cpu")
    tracemalloc.start()
    try:
        scorer.fit(train)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_padim_fit_memory_does_not_grow_with_the_training_set() -> None:
    small, large = _padim_fit_peak(40), _padim_fit_peak(80)
    model = 16 * 16 * 64 * 64 * 8  # float64 (h*w, d, d)
    assert large / small < 1.2, (small, large)
    assert large < 4 * model  # a few model-sized buffers, not the data set


# ---------------------------------------------------------------- PatchCore


def naive_greedy(points: np.ndarray, n: int, start: int) -> list[int]:
    """Textbook greedy k-center in float64: add the point farthest from the chosen centres."""
    z = points.astype(np.float64)
    sel = [start]
    mind = np.linalg.norm(z - z[start], axis=1)
    for _ in range(n - 1):
        s = int(np.argmax(mind))
        sel.append(s)
        mind = np.minimum(mind, np.linalg.norm(z - z[s], axis=1))
    return sel


def clustered_points(m: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(12, dim))
    return (centres[rng.integers(12, size=m)] + rng.normal(size=(m, dim))).astype(np.float32)


@pytest.mark.parametrize("method,block", [("lazy", 1), ("lazy", 7), ("lazy", 64),
                                          ("lazy", 1024), ("dense", 0)])
def test_fast_greedy_selects_the_same_indices_as_the_naive_greedy(method: str,
                                                                  block: int) -> None:
    z = clustered_points(700, 16, seed=6).astype(np.float64)
    z_before = z.copy()
    ref = naive_greedy(z, 90, start=123)
    got = greedy_kcenter(z, 90, start=123, method=method, block=max(block, 1), progress=False)
    assert got.tolist() == ref
    np.testing.assert_array_equal(z, z_before)  # the input is not centred in place


def covering_radius(points: np.ndarray, idx: np.ndarray) -> float:
    return float(cdist(points, points[idx]).min(axis=1).max())


def test_coreset_has_the_k_center_property_and_is_seeded() -> None:
    feats = clustered_points(1500, 64, seed=7)
    idx = coreset_indices(feats, 40, proj_dim=16, seed=0)  # selection on a 16-dim projection
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    rng = np.random.default_rng(0)
    random_radii = [covering_radius(feats, rng.choice(1500, 40, replace=False))
                    for _ in range(20)]
    assert covering_radius(feats, idx) <= np.median(random_radii)
    np.testing.assert_array_equal(coreset_indices(feats, 40, proj_dim=16, seed=0), idx)
    assert not np.array_equal(coreset_indices(feats, 40, proj_dim=16, seed=1), idx)
    np.testing.assert_array_equal(coreset_indices(feats, 1500, proj_dim=16), np.arange(1500))


def test_reweighting_formula_on_a_hand_built_case() -> None:
    # test patch (0, 0.5); memory bank (0,0), (1,0), (0,2), far ones. s* = 0.5 (to (0,0));
    # N_3((0,0)) = {(0,0), (1,0), (0,2)}, at distances 0.5, sqrt(1.25), 1.5 from the test patch:
    # s = (1 - e^0.5 / (e^0.5 + e^1.1180 + e^1.5)) * 0.5 = (1 - 1.6487 / 9.1892) * 0.5 = 0.41029
    # (PatchCoreScorer's use of it is pinned in test_faithful.py)
    assert reweight(0.5, [0.5, math.sqrt(1.25), 1.5]) == pytest.approx(0.4102907, abs=1e-6)
    assert math.isfinite(reweight(1000.0, [1000.0, 1001.0, 1002.0]))  # no exp overflow
    assert reweight(0.0, [0.0, 1.0]) == 0.0


def test_aggregation_modes_on_a_3x3_grid() -> None:
    grid = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    # "avgpool_valid" (patchbank <= 0.1): 3x3 mean over the valid cells only
    out = aggregate(grid, mode="avgpool_valid").reshape(3, 3)
    assert out[1, 1] == pytest.approx(4.0)  # mean of 0..8
    assert out[0, 0] == pytest.approx(2.0)  # corner: mean(0, 1, 3, 4), padding not counted
    assert out[0, 1] == pytest.approx(2.5)  # edge: mean(0..5)
    # "avgpool" (anomalib): zero padding counted, so border cells are divided by 9
    out = aggregate(grid, mode="avgpool").reshape(3, 3)
    assert out[1, 1] == pytest.approx(4.0)
    assert out[0, 0] == pytest.approx(8 / 9) and out[0, 1] == pytest.approx(15 / 9)
    # "official" (default): zero-padded unfold, C*9 = 9 values pooled to pretrain_dim and
    # target_dim; pooled to one value it is the padded mean again
    out = aggregate(grid, target_dim=1, pretrain_dim=1).reshape(3, 3)
    assert out[1, 1] == pytest.approx(4.0) and out[0, 0] == pytest.approx(8 / 9)
    assert aggregate(grid).shape == (9, 1024)  # official: always target_dim values
    chans = np.broadcast_to(np.arange(8, dtype=np.float32), (1, 2, 2, 8)).copy()
    np.testing.assert_allclose(aggregate(chans, target_dim=4, mode="avgpool_valid")[0],
                               [0.5, 2.5, 4.5, 6.5])
    assert aggregate(chans, target_dim=16, mode="avgpool_valid").shape == (4, 8)  # C kept
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(grid, mode="max")


# ---------------------------------------------------------------- every method


# trained scorers (the autoencoders) are covered with fast settings in test_autoencoder.py
NOT_TRAINED = [n for n, cls in SCORERS.items() if not cls.trained]


@pytest.mark.parametrize("name,params", [(n, {}) for n in NOT_TRAINED]
                         + [("knn", {"level": "image"}), ("knn", {"k": 3, "metric": "cosine",
                                                                   "reduce": "topk"})])
def test_every_method_ranks_injected_anomalies_first(name: str, params: dict) -> None:
    train, test, labels = synthetic_banks(np.float16)
    scorer = make_scorer(name, params, device="cpu").fit(train)
    scores, maps = scorer.score(test)
    assert scores.shape == (len(test),) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) == 1.0
    if scorer.pixel_level:
        assert maps is not None and maps.shape == (len(test), H, W) and maps.dtype == np.float32
        # the map peaks at the injected patch (PatchCore's 3x3 aggregation spreads it equally
        # over the patch's neighbours, so there any cell next to it may win)
        tol = 1 if name == "patchcore" else 0
        for m in maps[labels == 1]:
            peak = np.unravel_index(m.argmax(), m.shape)
            assert max(abs(int(p) - a) for p, a in zip(peak, ANOMALY_AT, strict=True)) <= tol, peak
    else:
        assert maps is None


#: grid side of each tap of :func:`synthetic_taps`, and the region its anomalies shift
TAP_SIDES = {1: 8, 2: 4, 3: 2}
TAP_ANOMALY = {1: ((2, 4), (4, 6)), 2: ((1, 2), (2, 3)), 3: ((0, 1), (1, 2))}


def synthetic_taps(n_train: int = 20, n_good: int = 6, n_bad: int = 6, seed: int = 0):
    """Three taps at strides 4, 8, 16 of one 32 px toy input ({1: 8x8, 2: 4x4, 3: 2x2}); the
    anomalous images shift the same region in every tap (mid cell (1, 2), fine (2:4, 4:6))."""
    rng = np.random.default_rng(seed)
    shapes = {1: (8, 8, 8), 2: (4, 4, 16), 3: (2, 2, 16)}
    base = {k: rng.normal(size=s) for k, s in shapes.items()}

    def sample(n: int) -> dict[int, np.ndarray]:
        return {k: (b + 0.1 * rng.normal(size=(n, *b.shape))).astype(np.float16)
                for k, b in base.items()}

    test = sample(n_good + n_bad)
    test[1][n_good:, 2:4, 4:6] += 8.0
    test[2][n_good:, 1, 2] += 8.0
    test[3][n_good:, 0, 1] += 8.0
    return sample(n_train), test, np.array([0] * n_good + [1] * n_bad)


@pytest.mark.parametrize("name", sorted(NOT_TRAINED))
def test_every_method_on_taps_at_their_own_resolutions(name: str) -> None:
    train, test, labels = synthetic_taps()
    scorer = make_scorer(name, device="cpu").fit(train)
    # the layers of its tap_policy: "all" (PaDiM), "last" (AnomalyDINO) or "coarse" (2, 3)
    want = POLICY_LAYERS[scorer.tap_policy]
    assert scorer.layers_ == want
    scores, maps = scorer.score(test)
    assert scores.shape == (len(labels),) and np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) == 1.0
    if scorer.pixel_level:
        side = TAP_SIDES[want[0]]  # the finest chosen tap's grid
        assert maps.shape == (len(labels), side, side) and maps.dtype == np.float32
        for m in maps[labels == 1]:
            peak = np.unravel_index(m.argmax(), m.shape)
            region = TAP_ANOMALY[want[0]]
            tol = 1 if name == "patchcore" else 0  # 3x3 neighbourhoods spread the anomaly
            assert all(lo - tol <= p < hi + tol
                       for p, (lo, hi) in zip(peak, region, strict=True)), peak
    else:
        assert maps is None


def test_bank_errors() -> None:
    train, test, _ = synthetic_banks()
    scorer = make_scorer("knn", device="cpu")
    with pytest.raises(RuntimeError, match="fit"):
        scorer.score(test)
    with pytest.raises(BankError, match="rebuild it"):
        scorer.fit(train[0])
    scorer.fit(train)
    with pytest.raises(BankError, match="differs from the train bank"):
        scorer.score(test[..., :8])
    with pytest.raises(BankError, match=r"lacks layers \[0\]"):
        scorer.score({1: test})
    taps, _, _ = synthetic_taps()
    with pytest.raises(BankError, match="different numbers of images"):
        make_scorer("knn", device="cpu").fit({1: taps[1], 2: taps[2][:5], 3: taps[3]})
    with pytest.raises(BankError, match=r"layers \[4\] asked for, the bank holds \[1, 2, 3\]"):
        make_scorer("patchcore", {"layers": "4"}, device="cpu").fit(taps)
    bad = train.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(BankError, match="NaN"):
        make_scorer("knn", device="cpu").fit(bad)
    with pytest.raises(BankError, match="at least 2"):
        make_scorer("padim", device="cpu").fit(train[:1])
    with pytest.raises(ValueError, match="'k'=999"):
        make_scorer("knn", {"level": "image", "k": 999}, device="cpu").fit(train)


# ---------------------------------------------------------------- make_scorer


def test_make_scorer_parses_strings_to_the_default_types() -> None:
    knn_s = make_scorer("knn", {"k": "3", "metric": "cosine", "topk_frac": "0.05",
                                "reduce": "topk"})
    # ``reduce`` is the old name of ``image_score`` (max -> max_grid, topk -> topk_mean)
    assert knn_s.params == {"layers": "auto", "level": "patch", "k": 3, "metric": "cosine",
                            "image_score": "topk_mean", "topk_frac": 0.05, "top_sigma": 0}
    assert isinstance(knn_s.params["k"], int) and isinstance(knn_s.params["topk_frac"], float)
    assert make_scorer("padim", {"d": "none"}).params["d"] is None
    assert make_scorer("padim", {"d": "50", "eps": "1"}).params == {
        "layers": "auto", "d": 50, "eps": 1.0, "seed": 0, "image_score": "max_map"}
    assert make_scorer("knn", {"layers": [3, 2]}).params["layers"] == "3,2"
    assert make_scorer("knn", {"layers": "2,3"}).params["layers"] == "2,3"
    pc = make_scorer("patchcore").params
    assert (pc["aggregation"], pc["squared"], pc["n_reweight"]) == ("official", True, 0)
    assert (pc["pretrain_dim"], pc["target_dim"]) == (1024, 1024)
    assert make_scorer("mahalanobis", {"pca": "0.9"}).params["pca"] == 0.9
    assert make_scorer("mahalanobis", {"pca": "5"}).params["pca"] == 5
    assert make_scorer("patchcore", {"coreset": "0.25"}).params["coreset"] == 0.25
    assert coerce_param("m", "flag", "true", (bool,)) is True
    assert coerce_param("m", "flag", "False", (bool,)) is False
    # that every method's resolved params feed back unchanged: check_params_round_trip


def test_make_scorer_rejects_unknown_methods_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="choose one of.*'patchcore'"):
        make_scorer("nosuch")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['coreset'\].*'k'"):
        make_scorer("knn", {"coreset": "0.1"})
    with pytest.raises(ValueError, match="'k' expects int"):
        make_scorer("knn", {"k": "abc"})
    with pytest.raises(ValueError, match="'k' expects int"):
        make_scorer("knn", {"k": "1.5"})
    with pytest.raises(ValueError, match="'metric' must be one of"):
        make_scorer("knn", {"metric": "manhattan"})
    with pytest.raises(ValueError, match="'coreset' must be in"):
        make_scorer("patchcore", {"coreset": "1.5"})
    with pytest.raises(ValueError, match="'seed' expects int"):
        make_scorer("patchcore", {"seed": True})
    with pytest.raises(ValueError, match="'aggregation' must be one of"):
        make_scorer("patchcore", {"aggregation": "max"})
    with pytest.raises(ValueError, match="'layers' must be 'auto' or a comma list"):
        make_scorer("knn", {"layers": "two"}).fit(synthetic_taps()[0])
    if not torch.cuda.is_available():
        with pytest.raises(PatchbankError, match="CUDA is not available"):
            make_scorer("knn", device="cuda")
