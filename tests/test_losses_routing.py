"""Gradient routing of every MoMKD loss term, exactly as method.md lists it (gradient memory mode)."""

from __future__ import annotations

import pytest
import torch

from momkd_fed.config import LossConfig, MemoryConfig, ModelConfig
from momkd_fed.model.momkd import MoMKD

G = 12


def small_model(update: str = "gradient", commit_slot: str = "reference") -> MoMKD:
    cfg = ModelConfig(hidden_dim=16, heads=2, shared_dim=8, omics_hidden=16, omics_embed_dim=12, cls_hidden=32)
    return MoMKD(cfg, MemoryConfig(slots=4, update=update), LossConfig(commit_slot=commit_slot), feature_dim=20,
                 n_genes=G)


def ring_bag(p: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(p)
    neighbors = torch.stack([(idx + s) % p for s in range(k + 1)], dim=1)  # (P, k+1), column 0 = self
    return torch.randn(p, 20), neighbors


GROUPS = {
    "histology_encoder": lambda n: n.startswith("histology_encoder."),
    "patch_proj": lambda n: n.startswith("patch_proj."),
    "slide_proj": lambda n: n.startswith("slide_proj."),
    "classifier": lambda n: n.startswith("classifier."),
    "theta": lambda n: n == "log_tau",
    "omics_encoder": lambda n: n.startswith("omics_encoder."),
    "omics_proj": lambda n: n.startswith("omics_proj."),
    "omics_decoder": lambda n: n.startswith("omics_decoder."),
}


def reached(model: MoMKD, term: torch.Tensor) -> set[str]:
    """Names of the groups (and 'memory-'/'memory+') a loss term sends a non-zero gradient to."""
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    hit = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
    out = {grp for grp, match in GROUPS.items() if any(match(n) for n in hit)}
    slots_grad = dict(zip(names, grads))["memory.slots"]
    if slots_grad is not None:
        out |= {name for name, row in (("memory-", 0), ("memory+", 1)) if slots_grad[row].abs().sum() > 0}
    return out


HISTOLOGY = {"histology_encoder", "patch_proj", "slide_proj", "classifier", "theta"}
GENOMIC = {"omics_encoder", "omics_proj", "omics_decoder"}


@pytest.mark.parametrize("commit_slot", ["reference", "cosine", "moving", "moving_cosine"])
@pytest.mark.parametrize("label", [0, 1])
def test_each_term_reaches_exactly_what_method_md_says(label, commit_slot):
    torch.manual_seed(label)
    model = small_model(commit_slot=commit_slot).train()
    x, nb = ring_bag(30)
    g = torch.randn(G)
    out = model(x, nb, g)
    lb = model.loss(out, label, g)
    assert reached(model, lb.ce) == {"histology_encoder", "patch_proj", "classifier", "theta"}
    assert reached(model, lb.align_omics) == {"omics_encoder", "omics_proj", "memory-", "memory+"}
    assert reached(model, lb.align_wsi) == {"histology_encoder", "patch_proj", "slide_proj", "theta",
                                            "memory-", "memory+"}
    assert reached(model, lb.recon) == {"omics_encoder", "omics_decoder"}
    own = "memory+" if label == 1 else "memory-"
    # L_mem reaches the histology encoder, W_patch and the memory of class y (gradient mode): the memory through
    # the orthogonality term; through the commitment too only in the moving variants (the reference detaches it)
    moved = {own} if commit_slot.startswith("moving") else set()
    assert reached(model, lb.commit) == {"histology_encoder", "patch_proj"} | moved
    assert reached(model, lb.mem) == {"histology_encoder", "patch_proj", own}
    assert reached(model, lb.ortho) == {own}  # orthogonality acts on C_y only
    # no cross-talk: histology losses never reach the genomic branch and vice versa
    for term in (lb.ce, lb.align_wsi, lb.commit, lb.ortho):
        assert not reached(model, term) & GENOMIC
    for term in (lb.align_omics, lb.recon):
        assert not reached(model, term) & HISTOLOGY


def test_total_gives_every_parameter_a_gradient():
    torch.manual_seed(3)
    model = small_model().train()
    x, nb = ring_bag(25)
    g = torch.randn(G)
    out = model(x, nb, g)
    lb = model.loss(out, 1, g)
    lb.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    lc = model.loss_cfg
    expected = (lc.w_ce * lb.ce + lc.w_mem * lb.mem + lc.w_align_omics * lb.align_omics
                + lc.w_align_wsi * lb.align_wsi + lc.w_recon * lb.recon)
    torch.testing.assert_close(lb.total, expected)
    torch.testing.assert_close(lb.mem, lb.commit + lc.ortho_weight * lb.ortho)


def test_histology_only_slide_leaves_genomic_branch_untouched():
    torch.manual_seed(4)
    model = small_model().train()
    x, nb = ring_bag(20)
    out = model(x, nb)
    assert out.omics_emb is None and out.omics_recon is None and out.omics_z is None
    lb = model.loss(out, 0)
    assert float(lb.align_omics) == 0.0 and float(lb.recon) == 0.0
    assert lb.align_omics.shape == () and lb.recon.shape == ()
    lb.total.backward()
    for n, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched != n.startswith(("omics_encoder.", "omics_proj.", "omics_decoder.")), n


@pytest.mark.parametrize("update", ["ema", "frozen"])
def test_buffer_memory_gets_no_gradient_and_is_not_a_parameter(update):
    model = small_model(update).train()
    x, nb = ring_bag(15)
    g = torch.randn(G)
    lb = model.loss(model(x, nb, g), 1, g)
    lb.total.backward()
    assert "memory.slots" not in dict(model.named_parameters())
    assert model.memory.slots.grad is None


@pytest.mark.parametrize("update", ["ema", "frozen"])
def test_commit_slot_makes_no_difference_to_a_buffer_memory(update):
    """ema and frozen slots are unit-norm buffers: every commit_slot gives the same loss and patch gradients."""
    x, nb = ring_bag(15)
    g = torch.randn(G)
    results = []
    for commit_slot in ("reference", "cosine", "moving", "moving_cosine"):
        torch.manual_seed(7)
        model = small_model(update, commit_slot).train()
        torch.manual_seed(8)  # the same dropout draws
        lb = model.loss(model(x, nb, g), 1, g)
        lb.total.backward()
        results.append((lb.commit.detach(), model.patch_proj.weight.grad.clone()))
        assert model.memory.slots.grad is None
    for commit, grad in results[1:]:
        torch.testing.assert_close(commit, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
