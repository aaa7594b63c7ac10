"""Federated spherical k-means: seed + Lloyd refinement across sites vs centralised k-means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momkd_fed.errors import ConfigError
from momkd_fed.federation.kmeans import kmeans_seed, kmeans_update, local_kmeans_seed, local_kmeans_stats
from momkd_fed.model.memory import spherical_kmeans

K, S = 4, 16


def _clusters(gen):
    """Well-separated clusters per class: K true directions, points with small angular noise."""
    centres = F.normalize(torch.randn(2, K, S, generator=gen), dim=-1)  # (2, K, S)
    return centres


def _points(centres, c, ids, n, gen):
    lab = torch.tensor(ids)[torch.randint(len(ids), (n,), generator=gen)]  # (n,) true cluster per point
    x = F.normalize(centres[c, lab] + 0.08 * torch.randn(n, S, generator=gen), dim=-1)  # (n, S)
    return x, lab


def test_federated_kmeans_matches_centralised_and_slot_identity_agrees():
    gen = torch.Generator().manual_seed(0)
    centres = _clusters(gen)
    # non-iid sites: each site sees only some of the clusters of each class
    site_ids = [[0, 1, 2], [1, 2, 3], [0, 3]]
    sites, labels = [], []
    for ids, n in zip(site_ids, (300, 200, 150)):
        pts, labs = {}, {}
        for c in range(2):
            pts[c], labs[c] = _points(centres, c, ids, n, gen)
        sites.append(pts)
        labels.append(labs)
    # 1-2: seed from local clusters, pooled at the server
    seeds = [local_kmeans_seed(p, K, iters=20, seed=i) for i, p in enumerate(sites)]
    cent = kmeans_seed(seeds, K, iters=20, seed=0)  # (2, K, S)
    assert cent.shape == (2, K, S) and torch.allclose(cent.norm(dim=-1), torch.ones(2, K))
    # the seed already finds every true cluster (well separated): each true centre has a slot with cos > 0.95
    sim = torch.einsum("cks,cjs->ckj", centres, cent)  # (2, K_true, K)
    assert bool((sim.max(dim=-1).values > 0.95).all())
    seeded = cent.clone()
    # 3: federated Lloyd refinement
    for _ in range(5):
        cent, counts = kmeans_update(cent, [local_kmeans_stats(p, cent) for p in sites])
    assert float(counts.sum()) == 2 * (300 + 200 + 150)
    # centralised spherical k-means over the union, initialised with the same seed centroids, 5 iterations
    for c in range(2):
        pooled = torch.cat([p[c] for p in sites])  # (650, S)
        central = spherical_kmeans(pooled, K, iters=5, init=seeded[c])  # the model's centralised k-means
        assert torch.allclose(central, cent[c], atol=1e-5)
    # slot identity: points of one true cluster map to the same slot at every site
    for c in range(2):
        slot_of_true = {}
        for pts, labs in zip(sites, labels):
            assign = (pts[c] @ cent[c].T).argmax(dim=1)  # (n,)
            for t in labs[c].unique().tolist():
                slots = assign[labs[c] == t].unique().tolist()
                assert len(slots) == 1
                assert slot_of_true.setdefault(t, slots[0]) == slots[0]
        assert len(set(slot_of_true.values())) == K  # distinct true clusters get distinct slots


def test_kmeans_update_keeps_empty_clusters_and_withholding():
    cent = F.normalize(torch.randn(2, 3, 5), dim=-1)
    sums = torch.zeros(2, 3, 5)
    counts = torch.zeros(2, 3)
    sums[0, 1] = torch.tensor([2.0, 0, 0, 0, 0])
    counts[0, 1] = 2
    new, tot = kmeans_update(cent, [(sums, counts)])
    assert torch.equal(new[1], cent[1]) and torch.equal(new[0, 0], cent[0, 0])
    assert torch.allclose(new[0, 1], torch.tensor([1.0, 0, 0, 0, 0]))
    # a centroid with fewer than min_count assigned points is withheld by the site
    pts = {0: F.normalize(torch.randn(10, 5), dim=-1)}
    s_all, c_all = local_kmeans_stats(pts, cent)
    s_min, c_min = local_kmeans_stats(pts, cent, min_count=4)
    assert torch.equal(c_min, torch.where(c_all >= 4, c_all, 0.0)) and float(c_all.sum()) == 10


def test_kmeans_seed_needs_enough_clusters():
    gen = torch.Generator().manual_seed(1)
    few = {0: F.normalize(torch.randn(2, S, generator=gen), dim=-1), 1: F.normalize(torch.randn(9, S), dim=-1)}
    seed = local_kmeans_seed(few, K)
    assert float(seed[1][0].sum()) == 2 and int((seed[1][0] > 0).sum()) == 2  # 2 points -> 2 clusters, rest empty
    with pytest.raises(ConfigError, match="class 0"):
        kmeans_seed([seed], K)
