"""Nearest-neighbour search: the pruned index returns the flat index's neighbours; the IVF index
is exact when it probes every cell and otherwise never returns a distance below the true one."""

from __future__ import annotations

import numpy as np
import pytest

from patchbank.scorers.neighbors import (
    FlatIndex,
    IVFIndex,
    PrunedIndex,
    kmeans_centroids,
    pca_basis,
)


@pytest.mark.parametrize("dims", [4, 32])
def test_pruned_index_finds_the_flat_nearest_neighbours(dims: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (20, 96))
    base = (centres[rng.integers(0, 20, 3000)] + rng.normal(0, 1, (3000, 96))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 500)] + rng.normal(0, 1.5, (500, 96)))
    queries[:10] = rng.normal(0, 20, (10, 96))  # far from everything
    flat_d, flat_i = FlatIndex(base, "l2", "cpu").search(queries, 1)
    index = PrunedIndex(base, dims=dims)
    d, i = index.search(queries.astype(np.float32), 1, chunk=128)
    exact = np.linalg.norm(base[None] - queries[:, None].astype(np.float32), axis=2)
    np.testing.assert_array_equal(i[:, 0], exact.argmin(axis=1))
    np.testing.assert_allclose(d[:, 0], exact.min(axis=1), rtol=1e-5)
    np.testing.assert_allclose(d, flat_d, rtol=1e-4)
    assert (i == flat_i).mean() > 0.99  # flat's float32 expansion may break near-ties apart
    # k > 1 is the flat search
    np.testing.assert_array_equal(index.search(queries, 3)[1], FlatIndex(base).search(queries,
                                                                                    3)[1])


def test_contraction_bounds_every_distance() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(500, 64)).astype(np.float32)
    index = PrunedIndex(base, dims=8)
    q = rng.normal(size=(50, 64)).astype(np.float32)
    low = index._contract(q - index.mean.astype(np.float32))
    bound = ((low[:, None] - index.low[None]) ** 2).sum(axis=2)
    true = ((q[:, None] - base[None]) ** 2).sum(axis=2)
    assert (bound <= true * (1 + 1e-5) + 1e-4).all()
    assert np.median(bound / true) > 0.1


def clustered(seed: int, n: int = 3000, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (30, dim))
    base = (centres[rng.integers(0, 30, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)
    queries = (centres[rng.integers(0, 30, 400)] + rng.normal(0, 1.5, (400, dim)))
    return base, queries.astype(np.float32)


def test_ivf_index_is_exact_when_every_cell_is_probed_and_an_upper_bound_otherwise() -> None:
    base, queries = clustered(2)
    cells = kmeans_centroids(base, 40, seed=0)
    assert cells.shape == (40, 64)
    np.testing.assert_array_equal(cells, kmeans_centroids(base, 40, seed=0))  # seeded
    flat_d, flat_i = FlatIndex(base).search(queries, 1)
    d, i = IVFIndex(base, cells, nprobe=40).search(queries, 1)
    np.testing.assert_allclose(d, flat_d, rtol=1e-5)
    assert (i == flat_i).mean() > 0.99
    d1, i1 = IVFIndex(base, cells, nprobe=1).search(queries, 1, chunk=64)
    assert (d1 >= flat_d * (1 - 1e-5)).all()  # a missed neighbour only makes it larger
    recall = (i1 == flat_i).mean()
    assert 0.5 < recall < 1.0  # clusters split across cells: some neighbours are missed
    np.testing.assert_allclose(d1[i1 == flat_i], flat_d[i1 == flat_i], rtol=1e-5)


def test_ivf_index_drops_empty_cells_so_every_query_gets_a_neighbour() -> None:
    base, queries = clustered(3, n=500)
    cells = np.concatenate([kmeans_centroids(base, 8), np.full((1, 64), 1e4, np.float32)])
    far = np.full((1, 64), 9e3, np.float32)  # nearest to the empty cell's centroid
    index = IVFIndex(base, cells, nprobe=1)
    assert index.index.nlist == 8
    d, i = index.search(np.concatenate([queries, far]), 1)
    assert (i >= 0).all() and np.isfinite(d).all()
    with pytest.raises(ValueError, match="dimension"):
        IVFIndex(base, cells[:, :10])


def test_projected_ivf_returns_exact_distances_to_reranked_candidates() -> None:
    base, queries = clustered(4)
    mean, proj = pca_basis(base, 8)
    assert proj.shape == (64, 8) and np.allclose(proj.T @ proj, np.eye(8), atol=1e-5)
    low = (base - mean) @ proj
    cells = kmeans_centroids(low, 20)
    index = IVFIndex(base, cells, nprobe=2, proj=proj, mean=mean, rerank=6)
    d, i = index.search(queries, 2)
    np.testing.assert_allclose(d, np.linalg.norm(base[i] - queries[:, None], axis=2), rtol=1e-5)
    assert (d[:, 0] <= d[:, 1]).all()
    flat_d, flat_i = FlatIndex(base).search(queries, 1)
    assert (d[:, 0] >= flat_d[:, 0] * (1 - 1e-5)).all()  # never below the true nearest
    # the whole space as the projection, every cell probed: the exact search
    mean, proj = pca_basis(base, 64)
    full = IVFIndex(base, kmeans_centroids((base - mean) @ proj, 20), nprobe=20, proj=proj,
                    mean=mean, rerank=1)
    np.testing.assert_allclose(full.search(queries, 1)[0], flat_d, rtol=1e-4)
    with pytest.raises(ValueError, match="dimension"):
        IVFIndex(base, cells, proj=proj, mean=mean)  # 8-d centroids, a 64-d projection
