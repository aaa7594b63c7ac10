"""Loss terms: formulas, signs and what each term detaches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momkd_fed import losses as L


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_soft_angle_is_scaled_logsumexp_and_smooth_max():
    torch.manual_seed(0)
    f, c = unit(8), unit(5, 8)
    t = 5.0
    expected = math.log(sum(math.exp(t * float(c[j] @ f)) for j in range(5))) / t
    assert abs(float(L.soft_angle(f, c, t)) - expected) < 1e-6
    hard = float((c @ f).max())
    assert hard <= float(L.soft_angle(f, c, 200.0)) <= hard + math.log(5) / 200 + 1e-6


def test_alignment_loss_sign_and_margin():
    mem = torch.stack([torch.eye(2, 4)[[1]], torch.eye(2, 4)[[0]]])  # C- = {e1}, C+ = {e0}; K = 1
    f_pos = torch.tensor([1.0, 0, 0, 0])  # delta = 1
    t, beta, m = 5.0, 20.0, 0.3
    assert abs(float(L.memory_delta(f_pos, mem, t)) - 1.0) < 1e-6
    pos, neg = L.alignment_loss(f_pos, mem, 1, t, beta, m), L.alignment_loss(f_pos, mem, 0, t, beta, m)
    torch.testing.assert_close(pos, F.softplus(torch.tensor(beta * (m - 1))))
    torch.testing.assert_close(neg, F.softplus(torch.tensor(beta * (m + 1))))
    assert float(L.alignment_loss(f_pos, mem, 1, t, beta, m)) < 1e-5 < float(L.alignment_loss(f_pos, mem, 0, t, beta, m))


def test_alignment_reaches_both_class_memories():
    mem = unit(2, 3, 8).requires_grad_(True)
    L.alignment_loss(unit(8), mem, 1, 5.0, 20.0, 0.3).backward()
    assert mem.grad[0].abs().sum() > 0 and mem.grad[1].abs().sum() > 0


def spread_slots() -> torch.Tensor:
    """(4, 8) slots whose norms differ (0.3 to 2), so that the Euclidean and the cosine nearest slot differ."""
    torch.manual_seed(1)
    return torch.randn(4, 8) * torch.tensor([0.3, 1.0, 2.0, 0.6]).unsqueeze(1)


def test_commitment_reference_is_nearest_raw_slot_detached():
    """reference: nearest slot by Euclidean distance to the RAW slot, MSE against it, only the patches move."""
    slots = spread_slots().requires_grad_(True)
    p = unit(10, 8).requires_grad_(True)
    loss = L.commitment_loss(p, slots, "reference")
    nearest_raw = torch.cdist(p.detach(), slots.detach()).argmin(1)  # (P,)
    nearest_cos = (p.detach() @ F.normalize(slots.detach(), dim=-1).T).argmax(1)
    assert not torch.equal(nearest_raw, nearest_cos)  # the norms matter: this case tells the two rules apart
    torch.testing.assert_close(loss, ((p.detach() - slots.detach()[nearest_raw]) ** 2).mean())
    loss.backward()
    assert slots.grad is None and p.grad.abs().sum() > 0


def test_commitment_moving_adds_the_slot_gradient_only():
    """moving: the reference's value and patch gradient, plus the MSE's gradient on the nearest slots."""
    slots = spread_slots().requires_grad_(True)
    p0 = unit(10, 8)
    p_ref, p_mov = p0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    ref, mov = L.commitment_loss(p_ref, slots, "reference"), L.commitment_loss(p_mov, slots, "moving")
    torch.testing.assert_close(mov, ref)
    ref.backward()
    mov.backward()
    torch.testing.assert_close(p_mov.grad, p_ref.grad)
    nearest = torch.cdist(p0, slots.detach()).argmin(1)  # (P,)
    # 2 * sum over the slot's patches of (c - p) / (P * S); slots nobody chose get nothing
    expected = torch.zeros(4, 8).index_add_(0, nearest, slots.detach()[nearest] - p0) * 2 / 80
    torch.testing.assert_close(slots.grad, expected)
    assert slots.grad[nearest].abs().sum(1).gt(0).all()


def test_commitment_cosine_pulls_patches_not_slots():
    slots = spread_slots().requires_grad_(True)
    p = unit(10, 8).requires_grad_(True)
    loss = L.commitment_loss(p, slots, "cosine")
    c = F.normalize(slots.detach(), dim=-1)
    torch.testing.assert_close(loss, ((p.detach() - c[(p.detach() @ c.T).argmax(1)]) ** 2).mean())
    loss.backward()
    assert slots.grad is None and p.grad.abs().sum() > 0


def test_commitment_moving_cosine_moves_the_unit_slot():
    slots = spread_slots().requires_grad_(True)
    p = unit(10, 8).requires_grad_(True)
    loss = L.commitment_loss(p, slots, "moving_cosine")
    c = F.normalize(slots.detach(), dim=-1)
    torch.testing.assert_close(loss, ((p.detach() - c[(p.detach() @ c.T).argmax(1)]) ** 2).mean())
    loss.backward()
    assert slots.grad.abs().sum() > 0
    radial = (slots.grad * slots.detach()).sum(-1)  # through the normalisation: no radial component
    torch.testing.assert_close(radial, torch.zeros(4), atol=1e-7, rtol=0)


def test_commitment_forms_coincide_on_unit_slots():
    """On unit-norm slots (ema/frozen buffers, a memory after set_slots) value and patch gradient agree."""
    torch.manual_seed(3)
    slots = unit(5, 8)
    p0 = unit(12, 8)
    vals, grads = [], []
    for form in L.COMMIT_SLOTS:
        p = p0.clone().requires_grad_(True)
        loss = L.commitment_loss(p, slots, form)
        loss.backward()
        vals.append(loss.detach())
        grads.append(p.grad)
    for v, g in zip(vals[1:], grads[1:]):
        torch.testing.assert_close(v, vals[0])
        torch.testing.assert_close(g, grads[0])
    with pytest.raises(ValueError, match="commit_slot"):
        L.commitment_loss(p0, slots, "stopgrad")


def test_memory_loss_is_commitment_plus_weighted_orthogonality_on_unit_slots():
    slots = spread_slots()
    p = unit(6, 8)
    mem, commit, ortho = L.memory_loss(p, slots, "reference", 10.0)
    torch.testing.assert_close(commit, L.commitment_loss(p, slots, "reference"))
    torch.testing.assert_close(ortho, L.orthogonality_penalty(F.normalize(slots, dim=-1)))
    torch.testing.assert_close(mem, commit + 10.0 * ortho)


def test_orthogonality_penalty_zero_iff_orthogonal():
    assert abs(float(L.orthogonality_penalty(torch.eye(4, 8)))) < 1e-7
    same = F.normalize(torch.ones(4, 8), dim=-1)
    assert abs(float(L.orthogonality_penalty(same)) - (1 - 1 / 4)) < 1e-6  # all cos^2 = 1
    c = unit(4, 8)
    gram = c @ c.T
    off = gram[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(L.orthogonality_penalty(c), off.pow(2).sum() / 16)
    assert abs(float(L.orthogonality_penalty(unit(1, 8)))) < 1e-6  # K = 1: no pairs


def test_ce_recon_and_breakdown_as_floats():
    logits = torch.tensor([0.3, -1.2])
    torch.testing.assert_close(L.classification_loss(logits, 1), -torch.log_softmax(logits, 0)[1])
    torch.testing.assert_close(L.reconstruction_loss(torch.ones(3), torch.zeros(3)), torch.tensor(1.0))
    z = torch.zeros(())
    b = L.LossBreakdown(total=torch.tensor(2.0), ce=z, mem=z, commit=z, ortho=z, align_omics=z, align_wsi=z,
                        recon=torch.tensor(0.5, requires_grad=True))
    d = b.as_floats()
    assert d == {"total": 2.0, "ce": 0.0, "mem": 0.0, "commit": 0.0, "ortho": 0.0, "align_omics": 0.0,
                 "align_wsi": 0.0, "recon": 0.5}
    assert all(type(v) is float for v in d.values())
