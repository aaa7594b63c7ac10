"""kNN neighbour index: equal to brute force (random and tie-heavy grids), small P, stored edge lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from momkd_fed.data.graph import knn_neighbors, knn_neighbors_bruteforce, neighbors_from_edge_index
from momkd_fed.errors import DataError


def _grid(P: int, step: int = 512) -> np.ndarray:
    side = int(np.ceil(np.sqrt(max(P, 1)))) + 1
    g = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2) * step
    return g[np.random.default_rng(P).permutation(len(g))[:P]].astype(np.int64)  # a ragged, shuffled grid


@pytest.mark.parametrize("P", [0, 1, 2, 3, 8, 9, 500])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_matches_bruteforce(P, k):
    rng = np.random.default_rng(P * 10 + k)
    for coords in (rng.integers(0, 40, size=(P, 2)).astype(np.int64), _grid(P)):
        got = knn_neighbors(coords, k)
        ref = knn_neighbors_bruteforce(coords, k)
        k_eff = max(0, min(k, P - 1))
        assert got.dtype == torch.int64 and got.shape == (P, k_eff + 1)
        assert torch.equal(got, ref)
        assert torch.equal(got[:, 0], torch.arange(P))


def test_grid_ties_resolved_by_index():
    coords = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)  # 4 ties around patch 0
    nb = knn_neighbors(coords, 2)
    assert nb[0].tolist() == [0, 1, 2]
    assert knn_neighbors(coords, 4)[0].tolist() == [0, 1, 2, 3, 4]


def test_duplicate_coordinates():
    coords = np.zeros((30, 2), dtype=np.int64)  # every patch at the same place: all tied
    assert torch.equal(knn_neighbors(coords, 8), knn_neighbors_bruteforce(coords, 8))


def test_from_edge_index_equals_knn():
    coords = _grid(60)
    nb = knn_neighbors(coords, 8)
    src = nb[:, 1:].flatten()  # neighbour
    dst = torch.arange(60).repeat_interleave(8)  # patch
    ei = np.stack([dst.numpy(), src.numpy()])[:, np.random.default_rng(0).permutation(480)]
    assert torch.equal(neighbors_from_edge_index(ei, 60, 8, coords=coords), nb)
    got = neighbors_from_edge_index(ei, 60, 8)  # no coords: neighbours ordered by index
    assert torch.equal(got[:, 0], torch.arange(60))
    assert torch.equal(got[:, 1:].sort(1).values, nb[:, 1:].sort(1).values)


def test_from_edge_index_rejects_ragged_degree():
    ei = np.array([[0, 0, 1, 2], [1, 2, 0, 0]])  # patch 0 has 2 neighbours, 1 and 2 have one
    with pytest.raises(DataError, match="degree other than k_eff=2"):
        neighbors_from_edge_index(ei, 3, 8, path="x.h5")
