"""ClassMemory modes and accounting, spherical k-means, federated assignment sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from momkd_fed.config import MemoryConfig
from momkd_fed.model.memory import ClassMemory, assign_sums, spherical_kmeans


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_slots_are_parameter_only_in_gradient_mode():
    for mode, is_param in [("gradient", True), ("ema", False), ("frozen", False)]:
        mem = ClassMemory(MemoryConfig(slots=4, update=mode), dim=8)
        names = [n for n, _ in mem.named_parameters()]
        assert (names == ["slots"]) == is_param, mode
        assert mem.trainable == is_param
        assert set(mem.state_dict()) == {"slots"}  # aggregates are per-round accounting, not state
        assert mem.slots.shape == (2, 4, 8)
        torch.testing.assert_close(mem.normalized().norm(dim=-1), torch.ones(2, 4))


def test_ema_step_moves_each_used_slot_exactly():
    torch.manual_seed(0)
    mu = 0.9
    mem = ClassMemory(MemoryConfig(slots=3, update="ema", momentum=mu, ema_source="both"), dim=5)
    c = torch.eye(3, 5)  # slot j = e_j, well apart
    mem.set_slots(torch.stack([c, c]))
    before = mem.slots.clone()
    # patches near slot 0 and slot 2 of class 1, omics near slot 0; slot 1 gets nothing
    patches = F.normalize(torch.tensor([[1.0, 0.2, 0, 0, 0], [0.9, 0, 0, 0.3, 0], [0, 0, 1.0, 0, 0.4]]), dim=-1)
    omics = F.normalize(torch.tensor([0.8, 0, 0, 0, -0.5]), dim=-1)
    mem.update(1, patches, omics)
    mean0 = (patches[0] + patches[1] + omics) / 3
    torch.testing.assert_close(mem.slots[1, 0], F.normalize(mu * c[0] + (1 - mu) * mean0, dim=0))
    torch.testing.assert_close(mem.slots[1, 2], F.normalize(mu * c[2] + (1 - mu) * patches[2], dim=0))
    torch.testing.assert_close(mem.slots[1, 1], before[1, 1])  # unused slot stays
    torch.testing.assert_close(mem.slots[0], before[0])  # other class untouched
    torch.testing.assert_close(mem.agg_counts, torch.tensor([[0.0, 0, 0], [3, 0, 1]]))
    torch.testing.assert_close(mem.agg_slides, torch.tensor([[0.0, 0, 0], [1, 0, 1]]))
    torch.testing.assert_close(mem.agg_sums[1, 0], patches[0] + patches[1] + omics)
    mem.update(1, patches, None)  # a histology-only slide: patches only
    torch.testing.assert_close(mem.agg_counts[1], torch.tensor([5.0, 0, 2]))
    torch.testing.assert_close(mem.agg_slides[1], torch.tensor([2.0, 0, 2]))
    mem.reset_aggregates()
    assert mem.agg_counts.sum() == 0 and mem.agg_slides.sum() == 0 and mem.agg_sums.abs().sum() == 0


@pytest.mark.parametrize("source, expected", [("omics", 1.0), ("patches", 4.0), ("both", 5.0)])
def test_ema_source_selects_assigned_embeddings(source, expected):
    mem = ClassMemory(MemoryConfig(slots=2, update="ema", ema_source=source), dim=6)
    mem.update(0, unit(4, 6), unit(6))
    assert float(mem.agg_counts[0].sum()) == expected


def test_ema_momentum_one_fixes_the_slots_in_local_training_and_still_aggregates():
    """memory.momentum 1: within a round the slots stay the server's; what leaves the site are the assigned sums."""
    mem = ClassMemory(MemoryConfig(slots=3, update="ema", momentum=1.0, ema_source="both"), dim=5)
    c = torch.eye(3, 5)
    mem.set_slots(torch.stack([c, c]))
    before = mem.slots.clone()
    patches = F.normalize(torch.tensor([[1.0, 0.2, 0, 0, 0], [0, 0, 1.0, 0, 0.4]]), dim=-1)
    omics = F.normalize(torch.tensor([0.8, 0, 0, 0, -0.5]), dim=-1)
    for _ in range(3):
        mem.update(1, patches, omics)
    assert torch.equal(mem.slots, before)
    torch.testing.assert_close(mem.agg_counts[1], torch.tensor([6.0, 0, 3]))
    torch.testing.assert_close(mem.agg_sums[1, 0], 3 * (patches[0] + omics))


def test_frozen_memory_never_moves_but_counts_usage():
    mem = ClassMemory(MemoryConfig(slots=4, update="frozen"), dim=8)
    before = mem.slots.clone()
    for label in (0, 1, 1):
        mem.update(label, unit(10, 8), unit(8))
    assert torch.equal(mem.slots, before)
    assert float(mem.agg_counts.sum()) == 30.0  # usage counts from patch projections only


def test_gradient_mode_records_patch_usage_without_moving():
    mem = ClassMemory(MemoryConfig(slots=4, update="gradient"), dim=8)
    before = mem.slots.detach().clone()
    patches = unit(12, 8)
    mem.update(1, patches, unit(8))
    assert torch.equal(mem.slots.detach(), before)
    idx = (patches @ mem.normalized()[1].T).argmax(1)
    torch.testing.assert_close(mem.agg_counts[1], torch.bincount(idx, minlength=4).float())
    assert float(mem.agg_counts[0].sum()) == 0.0


def clustered(n_per: int, centers: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = centers.repeat_interleave(n_per, 0) + spread * torch.randn(len(centers) * n_per, centers.shape[1],
                                                                     generator=g)
    return F.normalize(pts, dim=-1)


def test_kmeans_is_deterministic_and_separates_clusters():
    centers = torch.eye(6, 16) * 3  # 6 well-separated directions
    x = clustered(40, centers, 0.2, seed=1)
    a = spherical_kmeans(x, 6, iters=20, seed=7)
    b = spherical_kmeans(x, 6, iters=20, seed=7)
    assert torch.equal(a, b)
    # every true centre is recovered by exactly one centroid
    match = (F.normalize(centers, dim=-1) @ a.T).argmax(1)
    assert sorted(match.tolist()) == list(range(6))
    assert float((F.normalize(centers, dim=-1) @ a.T).max(1).values.min()) > 0.95
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(6))


def test_kmeans_with_fewer_points_than_centroids():
    x = unit(3, 8)
    cent = spherical_kmeans(x, 5, iters=5, seed=0)
    assert cent.shape == (5, 8) and torch.isfinite(cent).all()
    torch.testing.assert_close(cent[:3], x)  # the points seed the first N centroids
    assert torch.linalg.matrix_rank(cent) >= 4  # jittered duplicates are distinct
    with pytest.raises(ValueError, match="non-empty"):
        spherical_kmeans(torch.empty(0, 8), 4)


def test_assign_sums_counts_and_federated_merge_equals_pooled():
    torch.manual_seed(2)
    x = unit(50, 8)
    cent = unit(4, 8)
    sums, counts = assign_sums(x, cent)
    idx = (x @ cent.T).argmax(1)
    torch.testing.assert_close(counts, torch.bincount(idx, minlength=4))
    torch.testing.assert_close(sums[1], x[idx == 1].sum(0))
    s1, c1 = assign_sums(x[:20], cent)
    s2, c2 = assign_sums(x[20:], cent)
    torch.testing.assert_close(s1 + s2, sums)
    assert torch.equal(c1 + c2, counts)
    # one federated step from the same start equals one pooled Lloyd step
    step = spherical_kmeans(x, 4, iters=1, init=cent)
    torch.testing.assert_close(step, torch.where((counts > 0)[:, None], F.normalize(s1 + s2, dim=-1), cent))


def test_init_from_kmeans_is_deterministic_and_subsamples():
    cfg = MemoryConfig(slots=3, update="ema", kmeans_max_points=30)
    data = {0: unit(100, 8), 1: unit(5, 8)}
    m1, m2 = ClassMemory(cfg, 8), ClassMemory(cfg, 8)
    m1.update(0, unit(4, 8))
    m1.init_from_kmeans(data, seed=3)
    m2.init_from_kmeans(data, seed=3)
    assert torch.equal(m1.slots, m2.slots)
    assert float(m1.agg_counts.sum()) == 0.0  # reset
    with pytest.raises(ValueError, match="class 1"):
        m1.init_from_kmeans({0: unit(10, 8)}, seed=0)


def test_set_slots_checks_shape_and_normalises():
    mem = ClassMemory(MemoryConfig(slots=2), dim=4)
    mem.set_slots(3 * torch.ones(2, 2, 4))
    torch.testing.assert_close(mem.slots.detach().norm(dim=-1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="expected shape"):
        mem.set_slots(torch.ones(2, 3, 4))


@pytest.mark.parametrize("commit_slot", ["reference", "moving"])
def test_federated_merge_takes_directions_and_resets_the_raw_norm(commit_slot):
    """Gradient mode in a federation: a site's slots drift in norm during its round (AdamW on the alignment and
    orthogonality terms; the moving commitment pulls them toward patch means, norm < 1), the coordinator merges
    their directions only, and the next round starts from unit slots, where the reference commitment (nearest raw
    slot by Euclidean distance, MSE against it) equals the cosine one. The raw norm never leaves the site."""
    from momkd_fed import losses as L
    from momkd_fed.federation.memory_merge import merge_memory_slots, slot_usage_for_reply

    torch.manual_seed(0)
    sites = []
    for _ in range(2):
        mem = ClassMemory(MemoryConfig(slots=3), dim=6)
        mem.set_slots(unit(2, 3, 6))
        opt = torch.optim.AdamW([mem.slots], lr=0.05)
        for step in range(20):
            label, p = step % 2, unit(15, 6)
            loss, _, _ = L.memory_loss(p, mem.slots[label], commit_slot, 10.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mem.update(label, p)
        norms = mem.slots.detach().norm(dim=-1)
        assert (norms - 1).abs().max() > 1e-2  # the raw norm moved during the round
        sites.append(slot_usage_for_reply(mem.slots, mem.aggregates(), min_slot_count=1))
    glob = unit(2, 3, 6)
    merged, _ = merge_memory_slots(glob, sites, mu_s=0.5)
    rescaled = [type(r)(slots=r.slots * 3.7, usage=r.usage, slides=r.slides) for r in sites]
    torch.testing.assert_close(merge_memory_slots(glob, rescaled, mu_s=0.5)[0], merged)  # norms carry no weight
    nxt = ClassMemory(MemoryConfig(slots=3), dim=6)
    nxt.set_slots(merged * 2.0)  # what a site does with the global memory at the start of a round
    torch.testing.assert_close(nxt.slots.detach().norm(dim=-1), torch.ones(2, 3))
    p = unit(15, 6)
    for label in (0, 1):
        torch.testing.assert_close(L.commitment_loss(p, nxt.slots[label], "reference"),
                                   L.commitment_loss(p, nxt.slots[label], "cosine"))
