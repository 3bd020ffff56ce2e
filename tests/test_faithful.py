"""Each step the scorers take from their papers' reference code, pinned on small hand-built cases.

PatchCore follows amazon-science/patchcore-inspection (``PatchCore._embed``, ``PatchMaker``,
``common.Preprocessing`` / ``MeanMapper`` / ``Aggregator``, ``NearestNeighbourScorer``); PaDiM
follows the reference ``embedding_concat`` (coarse cells replicated onto the finest grid).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from patchbank.core.errors import BankError
from patchbank.scorers import load_scorer, make_scorer
from patchbank.scorers import patchcore as patchcore_module
from patchbank.scorers.base import align_taps
from patchbank.scorers.padim import PaDiMScorer
from patchbank.scorers.patchcore import PatchCoreScorer, aggregate

# ---------------------------------------------------------------- (a) official aggregation


def reference_official(taps: list[np.ndarray], pretrain_dim: int, target_dim: int) -> np.ndarray:
    """The official order, literally: patchify every tap (zero-padded 3x3 unfold), bilinearly
    resize the coarser taps' unfolded C*9 maps to the first tap's grid, MeanMapper per tap
    (adaptive average pool of the flattened C*9 vector to pretrain_dim), stack the taps,
    Aggregator (adaptive average pool of the n_taps*pretrain_dim vector to target_dim)."""
    feats = [torch.from_numpy(np.asarray(t, dtype=np.float32)).permute(0, 3, 1, 2)
             for t in taps]  # (B, C, h, w), as the backbone returns them
    patches, shapes = [], []
    for x in feats:  # PatchMaker.patchify(patchsize=3, stride=1)
        b, c, h, w = x.shape
        u = F.unfold(x, kernel_size=3, stride=1, padding=1, dilation=1)  # (B, C*9, h*w)
        u = u.reshape(b, c, 3, 3, -1).permute(0, 4, 1, 2, 3)  # (B, h*w, C, 3, 3)
        patches.append(u)
        shapes.append((h, w))
    ref_h, ref_w = shapes[0]
    for i in range(1, len(patches)):
        u = patches[i]
        h, w = shapes[i]
        u = u.reshape(u.shape[0], h, w, *u.shape[2:])  # (B, h, w, C, 3, 3)
        u = u.permute(0, 3, 4, 5, 1, 2)  # (B, C, 3, 3, h, w)
        base_shape = u.shape
        u = u.reshape(-1, h, w)
        u = F.interpolate(u.unsqueeze(1), size=(ref_h, ref_w), mode="bilinear",
                          align_corners=False).squeeze(1)
        u = u.reshape(*base_shape[:-2], ref_h, ref_w)
        u = u.permute(0, 4, 5, 1, 2, 3)  # (B, H, W, C, 3, 3)
        u = u.reshape(len(u), -1, *u.shape[-3:])  # (B, H*W, C, 3, 3)
        patches[i] = u
    flat = [u.reshape(-1, *u.shape[-3:]) for u in patches]  # (B*H*W, C, 3, 3)
    mapped = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), pretrain_dim).squeeze(1)
              for f in flat]  # MeanMapper
    stacked = torch.stack(mapped, dim=1)  # Preprocessing: (B*H*W, n_taps, pretrain_dim)
    out = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim)  # Aggregator
    return out.reshape(len(stacked), -1).numpy()


def random_taps(shapes: list[tuple[int, int, int]], n: int = 2, seed: int = 0,
                dtype: type = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, *s)).astype(dtype) for s in shapes]


@pytest.mark.parametrize("shapes, pretrain_dim, target_dim", [
    ([(6, 6, 3), (3, 3, 5)], 16, 12),  # C*9 = 27, 45 pooled to 16 (uneven windows), then 32->12
    ([(7, 7, 2), (4, 4, 3)], 40, 50),  # non-integer scale; pooling up (18 -> 40) replicates
    ([(8, 8, 4), (4, 4, 6), (2, 2, 8)], 30, 64),  # three taps
    ([(4, 4, 8), (2, 2, 16)], 1024, 1024),  # the defaults
    ([(5, 5, 3)], 10, 7),  # one tap
])
def test_official_aggregation_equals_the_reference_order(shapes, pretrain_dim: int,
                                                         target_dim: int) -> None:
    taps = random_taps(shapes)
    want = reference_official(taps, pretrain_dim, target_dim)
    got = aggregate(taps, target_dim, pretrain_dim, "official")
    h, w, _ = shapes[0]
    assert got.shape == (2 * h * w, target_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the default mode is "official", and float16 banks give the same up to their rounding
    np.testing.assert_array_equal(aggregate(taps, target_dim, pretrain_dim), got)
    half = [t.astype(np.float16) for t in taps]
    np.testing.assert_allclose(aggregate(half, target_dim, pretrain_dim),
                               reference_official(half, pretrain_dim, target_dim),
                               rtol=1e-5, atol=1e-5)


def test_official_aggregation_does_not_depend_on_the_image_batching(monkeypatch) -> None:
    taps = random_taps([(6, 6, 3), (3, 3, 5)], n=5)
    whole = aggregate(taps, 12, 16)
    monkeypatch.setattr(patchcore_module, "AGG_BYTES", 1)  # one image per batch
    np.testing.assert_array_equal(aggregate(taps, 12, 16), whole)
    np.testing.assert_allclose(whole, reference_official(taps, 16, 12), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (b) zero padding


def test_zero_padding_at_the_corner() -> None:
    ones = np.ones((1, 4, 4, 1), np.float32)
    # pretrain_dim = target_dim = C*9 = 9: both poolings are the identity, so each row is the
    # patch's unfolded 3x3 neighbourhood, row-major
    rows = aggregate(ones, target_dim=9, pretrain_dim=9).reshape(4, 4, 9)
    corner, edge, interior = rows[0, 0], rows[0, 1], rows[1, 1]
    np.testing.assert_array_equal(corner, [0, 0, 0, 0, 1, 1, 0, 1, 1])
    assert (corner == 1).sum() == 4 and (corner == 0).sum() == 5
    np.testing.assert_array_equal(edge, [0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(interior, np.ones(9))
    np.testing.assert_array_equal(rows[3, 3], [1, 1, 0, 1, 1, 0, 0, 0, 0])
    # pooled to one value: the corner is 4/9 of the interior, an edge 6/9
    pooled = aggregate(ones, target_dim=1, pretrain_dim=1).reshape(4, 4)
    assert pooled[1, 1] == pytest.approx(1.0)
    assert pooled[0, 0] == pytest.approx(4 / 9) and pooled[0, 1] == pytest.approx(6 / 9)
    # pooled up to the default 1024 dims each of the 9 values fills ~1024/9 slots (windows
    # straddling two values average them): the interior is all ones, the corner ~4/9 ones
    default = aggregate(ones).reshape(4, 4, 1024)
    np.testing.assert_allclose(default[1, 1], 1.0)
    assert set(np.unique(default[0, 0]).tolist()) <= {0.0, 0.5, 1.0}
    assert default[0, 0].mean() == pytest.approx(4 / 9, abs=3 / 1024)
    # zero-padded 3x3 mean ("avgpool"): also 4/9; valid-cells mean ("avgpool_valid"): 1
    assert aggregate(ones, mode="avgpool").reshape(4, 4)[0, 0] == pytest.approx(4 / 9)
    np.testing.assert_allclose(aggregate(ones, mode="avgpool_valid"), 1.0)


def test_unfold_is_channel_major() -> None:
    """C*9 values ordered channel by channel, each channel's 3x3 block row-major."""
    two = np.stack([np.ones((3, 3)), 2 * np.ones((3, 3))], axis=-1)[None].astype(np.float32)
    rows = aggregate(two, target_dim=18, pretrain_dim=18).reshape(3, 3, 18)
    np.testing.assert_array_equal(rows[0, 0], [0, 0, 0, 0, 1, 1, 0, 1, 1,
                                               0, 0, 0, 0, 2, 2, 0, 2, 2])
    # pooled to 2 values: one per channel (each window is one channel's nine values)
    np.testing.assert_allclose(aggregate(two, target_dim=2, pretrain_dim=2).reshape(3, 3, 2)[0, 0],
                               [4 / 9, 8 / 9], rtol=1e-6)


# ---------------------------------------------------------------- (c) tap alignment

COARSE = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)


def test_bilinear_alignment_of_a_2x2_tap_to_4x4() -> None:
    # align_corners=False: output cell i samples source x = (i + 0.5) / 2 - 0.5, clamped at 0,
    # i.e. -0.25 -> 0, 0.25, 0.75, 1.25 -> weights (1, 0), (.75, .25), (.25, .75), (0, 1):
    # [a, b] -> [a, .75a + .25b, .25a + .75b, b] along each axis
    want = np.array([[0, 1, 3, 4],
                     [2, 3, 5, 6],
                     [6, 7, 9, 10],
                     [8, 9, 11, 12]], np.float32)
    fine = np.zeros((1, 4, 4, 1), np.float32)
    aligned = align_taps([fine, COARSE.reshape(1, 2, 2, 1)], "bilinear")
    assert aligned.shape == (1, 4, 4, 2)
    np.testing.assert_array_equal(aligned[0, ..., 0], 0)
    np.testing.assert_array_equal(aligned[0, ..., 1], want)
    # PatchCore cuts each tap into neighbourhoods at its OWN resolution, then aligns: on a
    # 2x2 tap every cell is a corner (4 of 9 values inside), so a constant 9 pools to 4 in all
    # four cells and stays 4 after upsampling (aligning first would give 9 inside the 4x4 grid)
    const = np.full((1, 2, 2, 1), 9.0, np.float32)
    out = aggregate([fine, const], target_dim=2, pretrain_dim=1).reshape(4, 4, 2)
    np.testing.assert_allclose(out[..., 1], 4.0, rtol=1e-6)
    np.testing.assert_allclose(out[..., 0], 0.0)
    # and the coarse tap's neighbourhoods are aligned with those same bilinear weights: with
    # identity pooling (9 values per tap) the centre of each upsampled 3x3 block is the
    # upsampled tap itself
    out = aggregate([fine, COARSE.reshape(1, 2, 2, 1)], target_dim=18, pretrain_dim=9)
    np.testing.assert_allclose(out.reshape(4, 4, 18)[..., 9 + 4], want, rtol=1e-6, atol=1e-6)


def test_padim_replicates_each_coarse_cell_onto_its_2x2_block() -> None:
    want = np.array([[0, 0, 4, 4],
                     [0, 0, 4, 4],
                     [8, 8, 12, 12],
                     [8, 8, 12, 12]], np.float32)
    fine = np.zeros((1, 4, 4, 1), np.float32)
    aligned = align_taps([fine, COARSE.reshape(1, 2, 2, 1)], "nearest")
    np.testing.assert_array_equal(aligned[0, ..., 1], want)
    # end to end: PaDiM's per-location means are the nearest-replicated coarse means
    assert PaDiMScorer.upsample == "nearest" and PaDiMScorer.tap_policy == "all"
    rng = np.random.default_rng(0)
    fine = rng.integers(-8, 8, size=(6, 4, 4, 1)) / 4  # exact in float16
    coarse = rng.integers(-8, 8, size=(6, 2, 2, 1)) / 4
    scorer = PaDiMScorer(device="cpu").fit({1: fine.astype(np.float16),
                                            2: coarse.astype(np.float16)})
    assert scorer.layers_ == (1, 2) and scorer.d_ == 2
    mean = scorer.mean_.reshape(4, 4, 2)
    np.testing.assert_allclose(mean[..., 0], fine.mean(axis=0)[..., 0], atol=1e-12)
    replicated = np.repeat(np.repeat(coarse.mean(axis=0)[..., 0], 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(mean[..., 1], replicated, atol=1e-12)
    _, maps = scorer.score({1: fine[:2].astype(np.float16), 2: coarse[:2].astype(np.float16)})
    assert maps.shape == (2, 4, 4)


# ---------------------------------------------------------------- (d) PatchCore distances

BANK = np.array([[0, 0], [1, 0], [0, 2], [10, 10], [10, 11], [11, 10]], np.float32)
QUERIES = np.array([[0, 0.5], [3, 4], [10.5, 10.5]], np.float32)
#: squared distances to the nearest bank entry: (0,0) 0.25; (0,2) 9 + 4 = 13; (10,10) 0.5
NN_SQUARED = [0.25, 13.0, 0.5]
#: 1x1 grids, C=2: with pretrain_dim = target_dim = C*9 = 18 the aggregation is the unfold,
#: i.e. each vector's two values among zeros, so distances are the 2-D ones
IDENTITY = {"pretrain_dim": 18, "target_dim": 18, "coreset": 1.0}


def test_identity_aggregation_of_1x1_grids() -> None:
    feats = aggregate(BANK.reshape(6, 1, 1, 2), 18, 18)
    want = np.zeros((6, 18), np.float32)
    want[:, 4], want[:, 13] = BANK[:, 0], BANK[:, 1]  # the centres of the two 3x3 blocks
    np.testing.assert_array_equal(feats, want)


def test_patchcore_maps_are_squared_nn_distances_to_the_memory_bank() -> None:
    train, test = BANK.reshape(6, 1, 1, 2), QUERIES.reshape(3, 1, 1, 2)
    scorer = PatchCoreScorer(device="cpu", **IDENTITY).fit(train)
    assert len(scorer.memory_bank_) == 6  # coreset=1.0 keeps every patch
    scores, maps = scorer.score(test)
    np.testing.assert_allclose(maps[:, 0, 0], NN_SQUARED, rtol=1e-6)
    np.testing.assert_allclose(scores, NN_SQUARED, rtol=1e-6)
    plain = PatchCoreScorer(device="cpu", squared=False, **IDENTITY).fit(train)
    np.testing.assert_allclose(plain.score(test)[1][:, 0, 0], np.sqrt(NN_SQUARED), rtol=1e-6)


def test_patchcore_map_and_image_score_on_a_grid_match_brute_force() -> None:
    shapes = [(6, 6, 3), (3, 3, 4)]
    train, test = random_taps(shapes, n=4, seed=1), random_taps(shapes, n=3, seed=2)
    scorer = PatchCoreScorer(device="cpu", coreset=1.0, pretrain_dim=20, target_dim=16).fit(
        {2: train[0], 3: train[1]})
    scores, maps = scorer.score({2: test[0], 3: test[1]})
    bank = reference_official(train, 20, 16)
    assert scorer.memory_bank_.shape == bank.shape == (4 * 36, 16)
    want = cdist(reference_official(test, 20, 16).astype(np.float64), bank.astype(np.float64),
                 "sqeuclidean").min(axis=1).reshape(3, 6, 6)
    np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)  # max


@pytest.mark.parametrize("ivf_dims", [0, 4])  # cells in the full 16 dims; in a 4-d projection
def test_patchcore_ivf_search_is_a_saved_named_approximation(tmp_path, ivf_dims: int) -> None:
    shapes = [(6, 6, 3), (3, 3, 4)]
    train, test = random_taps(shapes, n=6, seed=3), random_taps(shapes, n=3, seed=4)
    kw = {"device": "cpu", "coreset": 1.0, "pretrain_dim": 20, "target_dim": 16}
    exact = PatchCoreScorer(**kw).fit(train)
    assert "ivf_centroids" not in exact._state()  # the default is the official exact search
    e_scores, e_maps = exact.score(test)
    ivf = PatchCoreScorer(**kw, search="ivf", nprobe=1, ivf_dims=ivf_dims).fit(train)
    state = ivf._state()
    assert state["ivf_centroids"].shape == (round(math.sqrt(6 * 36)), ivf_dims or 16)
    assert ("ivf_proj" in state) == ("ivf_mean" in state) == (ivf_dims > 0)
    scores, maps = ivf.score(test)
    # missed neighbours only raise the map; each image's maximum is re-searched exactly
    assert (maps >= e_maps * (1 - 1e-5)).all() and (maps > e_maps * (1 + 1e-5)).any()
    np.testing.assert_allclose(scores, e_scores, rtol=1e-5)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)
    if ivf_dims == 0:  # probing every cell is the exact search
        everywhere = PatchCoreScorer(**kw, search="ivf", nprobe=len(state["ivf_centroids"]),
                                     ivf_dims=0).fit(train)
        np.testing.assert_allclose(everywhere.score(test)[1], e_maps, rtol=1e-5)
    ivf.save(tmp_path / "model.npz")
    back = load_scorer(tmp_path / "model.npz", device="cpu")
    for key, value in state.items():
        np.testing.assert_array_equal(back._state()[key], value)
    np.testing.assert_array_equal(back.score(test)[1], maps)
    broken = {k: v for k, v in state.items() if k != "ivf_centroids"}
    with pytest.raises(ValueError, match="ivf_centroids"):
        PatchCoreScorer(**kw, search="ivf")._set_state(broken)
    with pytest.raises(ValueError, match="nprobe"):
        PatchCoreScorer(nprobe=0)


def test_exact_maxima_searches_until_no_bound_can_beat_the_exact_maximum() -> None:
    true = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
                     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    approx = true.copy()
    approx[0, :2] = [50.0, 40.0]  # two missed neighbours: bounds far above the true maximum
    approx[0, 2:6] += 0.5  # four slightly loose bounds, still below the true maximum
    calls = []

    class Exact:  # searches return the true distance of the queried patch (its id as feature)
        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            calls.append(len(q))
            ids = q[:, 0].astype(int)
            return true.ravel()[ids][:, None], ids[:, None]

    feats = np.arange(20, dtype=np.float64)[:, None]
    dist, nn = approx.copy(), np.zeros((2, 10), dtype=np.int64)
    patchcore_module._exact_maxima(Exact(), feats, dist, nn, first=2)
    assert dist.max(axis=1).tolist() == [10.0, 1.0]  # the true maxima
    assert calls == [4, 4]  # image 0 needs a second round (2 then 4 patches); image 1 does not
    checked = [0, 1, 6, 7, 8, 9]  # the two loose ones first, then the four largest bounds
    np.testing.assert_array_equal(dist[0, checked], true[0, checked])
    np.testing.assert_array_equal(dist[0, 2:6], approx[0, 2:6])  # the rest keep their bounds
    np.testing.assert_array_equal(nn[0, checked], checked)


@pytest.mark.parametrize("fraction, size", [(0.3, 43), (0.5, 72), (0.999, 143), (1.0, 144)])
def test_coreset_size_is_the_truncated_fraction_of_the_patches(fraction: float,
                                                               size: int) -> None:
    train = random_taps([(6, 6, 3)], n=4)  # 144 patches
    scorer = PatchCoreScorer(device="cpu", coreset=fraction, pretrain_dim=8, target_dim=8)
    assert len(scorer.fit(train).memory_bank_) == size == int(fraction * 144)


def test_reweighting_with_n_reweight_3_follows_eq_7() -> None:
    train, test = BANK.reshape(6, 1, 1, 2), QUERIES[:1].reshape(1, 1, 1, 2)
    # query (0, 0.5): m* = (0, 0); N_3(m*) = {(0,0), (1,0), (0,2)} at 0.5, sqrt(1.25), 1.5
    dists = np.array([0.5, math.sqrt(1.25), 1.5])

    def eq7(s: float, d: np.ndarray) -> float:
        return (1 - math.exp(s) / np.exp(d).sum()) * s

    plain = PatchCoreScorer(device="cpu", squared=False, n_reweight=3, **IDENTITY).fit(train)
    scores, maps = plain.score(test)
    assert eq7(0.5, dists) == pytest.approx(0.4102907, abs=1e-6)  # worked by hand
    assert scores[0] == pytest.approx(0.4102907, abs=1e-5)
    assert maps[0, 0, 0] == pytest.approx(0.5, abs=1e-6)  # maps are not re-weighted
    # with squared maps (the default) eq. 7 still runs on plain distances, as the paper has it
    squared = PatchCoreScorer(device="cpu", n_reweight=3, **IDENTITY).fit(train)
    s, m = squared.score(test)
    assert s[0] == pytest.approx(0.4102907, abs=1e-5)
    assert m[0, 0, 0] == pytest.approx(0.25, abs=1e-6)
    for b in (0, 1):  # off: the image score is the max of the map
        s, _ = PatchCoreScorer(device="cpu", n_reweight=b, **IDENTITY).fit(train).score(test)
        assert s[0] == pytest.approx(0.25, abs=1e-6)


def test_the_paper_methods_maps_are_smoothed_with_sigma_4() -> None:
    # PatchCore, PaDiM, SPADE and AnomalyDINO smooth their upsampled maps with a Gaussian of
    # sigma 4 (px at the model input), as does the patch k-NN baseline
    for name in ("knn", "padim", "patchcore", "spade", "anomalydino"):
        assert make_scorer(name).map_sigma == 4.0, name


# ---------------------------------------------------------------- (e) choose_layers


def test_choose_layers_keeps_taps_of_one_grid() -> None:
    # ViT blocks share one grid: "coarse" must not drop the first of three
    grids = [(16, 16)] * 3
    assert make_scorer("patchcore").choose_layers((4, 7, 10), grids) == (4, 7, 10)
    assert make_scorer("patchcore").choose_layers((1, 2, 3), [(56, 56), (28, 28), (14, 14)]) \
        == (2, 3)


def test_choose_layers_per_method() -> None:
    assert make_scorer("patchcore").choose_layers((1, 2, 3)) == (2, 3)
    assert make_scorer("knn").choose_layers((1, 2, 3)) == (2, 3)
    assert make_scorer("spade").choose_layers((1, 2, 3)) == (2, 3)
    assert make_scorer("mahalanobis").choose_layers((1, 2, 3)) == (2, 3)
    assert make_scorer("padim").choose_layers((1, 2, 3)) == (1, 2, 3)
    # fewer than three taps: every method uses them all
    assert make_scorer("patchcore").choose_layers((2, 3)) == (2, 3)
    assert make_scorer("knn").choose_layers((0,)) == (0,)
    # explicit
    assert make_scorer("patchcore", {"layers": "1,3"}).choose_layers((1, 2, 3)) == (1, 3)
    assert make_scorer("padim", {"layers": "3, 2"}).choose_layers((1, 2, 3)) == (2, 3)
    assert make_scorer("knn", {"layers": [1]}).choose_layers((1, 2, 3)) == (1,)


def test_explicit_layers_are_what_the_scorer_fits_on() -> None:
    taps = dict(zip((1, 2, 3), random_taps([(8, 8, 2), (4, 4, 3), (2, 2, 4)], n=3),
                    strict=True))
    scorer = make_scorer("patchcore", {"layers": "1,3", "coreset": 1.0, "pretrain_dim": 8,
                                       "target_dim": 8}, device="cpu").fit(taps)
    assert scorer.layers_ == (1, 3)
    np.testing.assert_array_equal(scorer.memory_bank_,
                                  aggregate([taps[1], taps[3]], 8, 8))
    assert scorer.score(taps)[1].shape == (3, 8, 8)  # on layer 1's grid


@pytest.mark.parametrize("method", ["patchcore", "knn", "padim"])
def test_asking_for_a_layer_the_bank_lacks_names_the_available_ones(method: str) -> None:
    taps = dict(zip((1, 2, 3), random_taps([(8, 8, 2), (4, 4, 3), (2, 2, 4)], n=3),
                    strict=True))
    scorer = make_scorer(method, {"layers": "2,4"}, device="cpu")
    with pytest.raises(BankError, match=r"layers \[2, 4\] asked for, the bank holds \[1, 2, 3\]"):
        scorer.choose_layers((1, 2, 3))
    with pytest.raises(BankError, match=r"the bank holds \[1, 2, 3\].*--layers"):
        scorer.fit(taps)
