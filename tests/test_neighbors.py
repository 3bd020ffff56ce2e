"""Exact nearest-neighbour search: the pruned index returns the flat index's neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from patchbank.scorers.neighbors import FlatIndex, PrunedIndex


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
