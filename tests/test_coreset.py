"""Greedy k-center coreset: every fast method picks exactly the indices of a textbook float64
greedy (exact ties, near-ties, duplicate points, an initial distance vector), the official
PatchCore initialisation (random anchors, mean distance) and its seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from patchbank.scorers.coreset import (
    anchor_distances,
    contract,
    coreset_indices,
    greedy_kcenter,
    kd_blocks,
    project,
)


def naive_greedy(points: np.ndarray, n: int, start: int | None = None,
                 init: np.ndarray | None = None) -> list[int]:
    """Textbook greedy k-center in float64: a point's distance is min(init, distance to the
    centres); each step adds the first point with the largest distance."""
    z = np.asarray(points, dtype=np.float64)
    mind = np.full(len(z), np.inf) if init is None else np.asarray(init, np.float64).copy()
    s = int(np.argmax(mind)) if start is None else start
    sel = []
    for _ in range(n):
        sel.append(s)
        mind = np.minimum(mind, np.linalg.norm(z - z[s], axis=1))
        s = int(np.argmax(mind))
    return sel


def clustered(m: int, dim: int, seed: int, k: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, dim))
    return (centres[rng.integers(k, size=m)] + rng.normal(size=(m, dim))).astype(np.float32)


def lattice_with_ties(m: int, dim: int, seed: int) -> np.ndarray:
    """Small integers, each point with its negation (the mean is exactly 0, so centring and
    the squared distances are exact: ties are exact ties), many duplicates."""
    rng = np.random.default_rng(seed)
    half = rng.integers(-3, 4, size=(m // 2, dim)).astype(np.float64)
    z = np.concatenate([half, -half])
    return z[rng.permutation(len(z))]


def near_ties(m: int, dim: int, seed: int) -> np.ndarray:
    """A lattice moved by 1e-7: distances that differ in the 8th-9th digit."""
    rng = np.random.default_rng(seed)
    return lattice_with_ties(m, dim, seed) + 1e-7 * rng.standard_normal((m, dim))


FAST = [("pruned", 1), ("pruned", 3), ("pruned", 16), ("pruned", 128), ("lazy", 7),
        ("lazy", 1024), ("dense", 1)]


@pytest.mark.parametrize("method,block", FAST)
@pytest.mark.parametrize("case", ["clustered", "ties", "near_ties"])
def test_fast_methods_pick_the_naive_greedy_indices(method: str, block: int, case: str) -> None:
    z = {"clustered": lambda: clustered(700, 16, seed=6).astype(np.float64),
         "ties": lambda: lattice_with_ties(600, 3, seed=1),
         "near_ties": lambda: near_ties(600, 3, seed=2)}[case]()
    before = z.copy()
    ref = naive_greedy(z, 120, start=123)
    got = greedy_kcenter(z, 120, 123, method=method, block=block, progress=False)
    assert got.tolist() == ref
    np.testing.assert_array_equal(z, before)  # the input is not centred in place


@pytest.mark.parametrize("method,block", FAST)
def test_duplicates_up_to_every_point_selected(method: str, block: int) -> None:
    z = lattice_with_ties(150, 2, seed=3)  # at most 49 distinct points
    assert len(np.unique(z, axis=0)) <= 49
    ref = naive_greedy(z, 150, start=5)  # after the distinct ones: distance 0, first index
    assert greedy_kcenter(z, 150, 5, method=method, block=block, progress=False).tolist() == ref


@pytest.mark.parametrize("method,block", FAST)
def test_initial_distances_are_honoured(method: str, block: int) -> None:
    z = clustered(900, 12, seed=8).astype(np.float64)
    anchors = np.random.default_rng(0).choice(900, 10, replace=False)
    init = anchor_distances(z, anchors)
    ref_init = np.mean([np.linalg.norm(z - z[a], axis=1) for a in anchors], axis=0)
    np.testing.assert_allclose(init, ref_init, rtol=1e-7)
    ref = naive_greedy(z, 100, init=ref_init)
    assert ref[0] == int(np.argmax(ref_init))
    got = greedy_kcenter(z, 100, method=method, block=block, progress=False, init=init)
    assert got.tolist() == ref
    # with a start too: the start first, then from min(init, distance)
    got = greedy_kcenter(z, 100, 17, method=method, block=block, progress=False, init=init)
    assert got.tolist() == naive_greedy(z, 100, start=17, init=ref_init)


def test_pruned_equals_lazy_on_a_larger_high_dimensional_set() -> None:
    """Where the bounds actually prune (many blocks, many centres), in 64 dims."""
    z = clustered(12_000, 64, seed=9, k=40)
    a = greedy_kcenter(z, 1200, 0, method="pruned", progress=False)
    b = greedy_kcenter(z, 1200, 0, method="lazy", progress=False)
    np.testing.assert_array_equal(a, b)


def test_contraction_is_a_lower_bound_and_blocks_partition() -> None:
    x = clustered(3000, 32, seed=4).astype(np.float64)
    x -= x.mean(axis=0)
    x8, x16 = contract(x, (8, 16))
    assert x8.shape == (3000, 9) and x16.shape == (3000, 17)
    i, j = np.random.default_rng(0).integers(0, 3000, (2, 5000))
    full = np.linalg.norm(x[i] - x[j], axis=1)
    low8 = np.linalg.norm(x8[i].astype(np.float64) - x8[j], axis=1)
    low16 = np.linalg.norm(x16[i].astype(np.float64) - x16[j], axis=1)
    assert (low8 <= full * (1 + 1e-5) + 1e-4).all() and (low16 <= full * (1 + 1e-5) + 1e-4).all()
    assert np.median(low8 / np.maximum(full, 1e-9)) > 0.5  # and not a useless one
    assert np.median(low16 - low8) >= 0  # more components: tighter
    blocks = kd_blocks(x8, 100)
    assert max(len(b) for b in blocks) <= 100
    np.testing.assert_array_equal(np.sort(np.concatenate(blocks)), np.arange(3000))
    assert all(np.all(np.diff(b) > 0) for b in blocks)


def test_greedy_argument_errors() -> None:
    z = clustered(50, 4, seed=0)
    with pytest.raises(ValueError, match="method"):
        greedy_kcenter(z, 5, 0, method="nope")
    with pytest.raises(ValueError, match="start index or initial"):
        greedy_kcenter(z, 5)
    with pytest.raises(ValueError, match="init must have shape"):
        greedy_kcenter(z, 5, init=np.ones(3))
    with pytest.raises(ValueError, match="need 1 <= n"):
        greedy_kcenter(z, 51, 0)


# ---------------------------------------------------------------- coreset_indices


def official_reference(feats: np.ndarray, n: int, proj_dim: int, seed: int,
                       n_starts: int) -> list[int]:
    """The official ApproximateGreedyCoresetSampler's steps, written out plainly: uniform
    +-1/sqrt(D) projection, n_starts random anchors, mean distance to them, then greedy."""
    rng = np.random.default_rng(seed)
    anchors = rng.choice(len(feats), n_starts, replace=False)
    bound = 1.0 / math.sqrt(feats.shape[1])
    w = rng.uniform(-bound, bound, size=(feats.shape[1], proj_dim)).astype(np.float32)
    z = (feats.astype(np.float32) @ w).astype(np.float64)
    init = np.mean([np.linalg.norm(z - z[a], axis=1) for a in anchors], axis=0)
    return naive_greedy(z, n, init=init)


def previous_reference(feats: np.ndarray, n: int, proj_dim: int, seed: int) -> list[int]:
    """patchbank <= 0.2: Gaussian projection, one random start that is the first centre."""
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(feats)))
    w = rng.standard_normal((feats.shape[1], proj_dim)).astype(np.float32) / np.float32(
        math.sqrt(proj_dim))
    z = (feats.astype(np.float32) @ w).astype(np.float64)
    return naive_greedy(z, n, start=start)


@pytest.mark.parametrize("seed", [0, 3])
def test_default_is_the_official_initialisation(seed: int) -> None:
    feats = clustered(1500, 64, seed=7)
    idx = coreset_indices(feats, 60, proj_dim=16, seed=seed)
    assert idx.tolist() == official_reference(feats, 60, 16, seed, 10)
    assert coreset_indices(feats, 60, 16, seed, "cpu", n_starts=4).tolist() == \
        official_reference(feats, 60, 16, seed, 4)


def test_n_starts_0_with_gaussian_projection_is_the_previous_behaviour() -> None:
    feats = clustered(1500, 64, seed=7)
    idx = coreset_indices(feats, 60, 16, 1, "cpu", n_starts=0, projection="gaussian")
    assert idx.tolist() == previous_reference(feats, 60, 16, 1)


def test_coreset_is_seeded_and_deterministic() -> None:
    feats = clustered(1500, 64, seed=7)
    for kw in ({}, {"n_starts": 0}, {"projection": "gaussian"}, {"method": "lazy"}):
        a = coreset_indices(feats, 40, proj_dim=16, seed=0, **kw)
        np.testing.assert_array_equal(coreset_indices(feats, 40, proj_dim=16, seed=0, **kw), a)
        assert not np.array_equal(coreset_indices(feats, 40, proj_dim=16, seed=1, **kw), a)
        assert len(set(a.tolist())) == 40
    np.testing.assert_array_equal(coreset_indices(feats, 1500, proj_dim=16), np.arange(1500))
    np.testing.assert_array_equal(coreset_indices(feats, 40, 16, 0, "cpu"),
                                  coreset_indices(feats, 40, 16, 0, "cpu", method="lazy"))


def test_projection_options() -> None:
    feats = clustered(200, 64, seed=1)
    u = project(feats, 8, "uniform", np.random.default_rng(0))
    g = project(feats, 8, "gaussian", np.random.default_rng(0))
    assert u.shape == g.shape == (200, 8) and u.dtype == np.float32
    w = np.random.default_rng(0).uniform(-1 / 8, 1 / 8, size=(64, 8)).astype(np.float32)
    np.testing.assert_allclose(u, feats @ w, rtol=1e-4, atol=1e-5)  # +-1/sqrt(64)
    small = project(feats[:, :8], 16, "uniform", np.random.default_rng(0))
    np.testing.assert_array_equal(small, feats[:, :8])  # D <= proj_dim: not projected
    with pytest.raises(ValueError, match="projection"):
        project(feats, 8, "nope", np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_starts"):
        coreset_indices(feats, 10, n_starts=-1)


def test_partitioned_sampler_takes_each_parts_share_exactly() -> None:
    z = clustered(4000, 16, seed=5)
    idx = coreset_indices(z, 400, proj_dim=16, seed=3, partitions=4)
    assert len(idx) == 400 and len(np.unique(idx)) == 400 and (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(idx, coreset_indices(z, 400, proj_dim=16, seed=3,
                                                       partitions=4))
    # each part's picks are that part's own exact greedy: re-derive the parts and compare
    rng = np.random.default_rng(3)
    parts = [np.sort(p) for p in np.array_split(rng.permutation(4000), 4)]
    for p in parts:
        assert np.isin(idx, p).sum() == 100
    assert not np.array_equal(idx, coreset_indices(z, 400, proj_dim=16, seed=3))
    with pytest.raises(ValueError, match="partitions"):
        coreset_indices(z, 10, partitions=0)
