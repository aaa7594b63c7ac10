"""MoMKD and ABMIL end to end on small bags: shapes, invariants, precision, memory hooks, factory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momkd_fed.config import Config, ConfigError, LossConfig, MemoryConfig, ModelConfig
from momkd_fed.losses import memory_delta
from momkd_fed.model import ABMIL, MoMKD, build_model

D_IN, G = 20, 12


def small_cfg() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(hidden_dim=16, heads=2, shared_dim=8, omics_hidden=16, omics_embed_dim=12,
                            cls_hidden=32, abmil_hidden=16)
    cfg.memory = MemoryConfig(slots=4)
    return cfg


def bag(p: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(p)
    k = min(k, p - 1)
    neighbors = torch.stack([(idx + s) % p for s in range(k + 1)], dim=1)  # (P, k+1)
    return torch.randn(p, D_IN), neighbors


@pytest.mark.parametrize("p", [1, 2, 17])
def test_forward_shapes_and_invariants(p):
    torch.manual_seed(p)
    model = build_model(small_cfg(), D_IN, G).train()
    x, nb = bag(p)
    g = torch.randn(G)
    out = model(x, nb, g)
    assert out.logits.shape == (2,) and out.attention.shape == (p,)
    assert out.patch_emb.shape == (p, 8) and out.slide_emb.shape == (8,)
    assert out.omics_emb.shape == (8,) and out.omics_z.shape == (12,) and out.omics_recon.shape == (G,)
    assert abs(float(out.attention.detach().sum()) - 1.0) < 1e-5 and bool((out.attention >= 0).all())
    torch.testing.assert_close(out.patch_emb.norm(dim=-1), torch.ones(p))
    torch.testing.assert_close(out.slide_emb.norm(), torch.tensor(1.0))
    torch.testing.assert_close(out.omics_emb.norm(), torch.tensor(1.0))
    for v in (out.logits, out.attention, out.patch_emb, out.slide_emb, out.omics_emb, out.omics_recon):
        assert torch.isfinite(v).all()
    torch.testing.assert_close(out.memory_score, memory_delta(out.slide_emb, model.memory.normalized(), 5.0))
    lb = model.loss(out, 1, g)
    assert all(math.isfinite(v) for v in lb.as_floats().values())


def test_attention_is_memory_guided_softmax():
    torch.manual_seed(0)
    model = build_model(small_cfg(), D_IN, 0).eval()
    x, nb = bag(9)
    out = model(x, nb)
    c = model.memory.normalized()
    s = torch.stack([(out.patch_emb @ c[i].T).max(1).values for i in (0, 1)])  # (2, P)
    torch.testing.assert_close(out.attention, torch.softmax((s[1] - s[0]) / 0.2, dim=0))


def test_tau_is_clamped():
    model = MoMKD(ModelConfig(hidden_dim=8, shared_dim=4), MemoryConfig(slots=2), LossConfig(), 4, 0)
    with torch.no_grad():
        model.log_tau.fill_(10.0)
    assert float(model.tau().detach()) == 2.0
    with torch.no_grad():
        model.log_tau.fill_(-10.0)
    assert abs(float(model.tau().detach()) - 0.01) < 1e-8


def test_histology_only_model_has_no_genomic_branch():
    model = build_model(small_cfg(), D_IN, 0)
    assert not any(k.startswith(("omics_encoder.", "omics_proj.", "omics_decoder.")) for k in model.state_dict())
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"histology_encoder", "patch_proj", "slide_proj", "classifier", "log_tau", "memory"}
    x, nb = bag(6)
    with pytest.raises(ValueError, match="no genomic branch"):
        model(x, nb, torch.randn(G))
    full = build_model(small_cfg(), D_IN, G)
    assert {"omics_encoder", "omics_proj", "omics_decoder"} <= {k.split(".")[0] for k in full.state_dict()}


def test_bad_inputs_raise_named_errors():
    model = build_model(small_cfg(), D_IN, G)
    x, nb = bag(5)
    with pytest.raises(ValueError, match="neighbors"):
        model(x, nb[:3])
    with pytest.raises(ValueError, match="neighbors"):
        model(x, nb + 10)
    with pytest.raises(ValueError, match="omics"):
        model(x, nb, torch.randn(G + 1))
    with pytest.raises(ValueError, match="label"):
        model.loss(model(x, nb), 2)
    with pytest.raises(ValueError, match="omics target"):
        model.loss(model(x, nb, torch.randn(G)), 1)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(1)
    model = build_model(small_cfg(), D_IN, G).train()
    x, nb = bag(40)
    g = torch.randn(G)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, nb, g)
        lb = model.loss(out, 0, g)
    assert out.logits.dtype == torch.float32 and out.attention.dtype == torch.float32
    assert abs(float(out.attention.detach().sum()) - 1.0) < 1e-5
    lb.total.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_after_step_ema_moves_own_class_only_and_counts():
    torch.manual_seed(2)
    cfg = small_cfg()
    cfg.memory = MemoryConfig(slots=4, update="ema", momentum=0.5, ema_source="both")
    model = build_model(cfg, D_IN, G)
    x, nb = bag(10)
    g = torch.randn(G)
    out = model(x, nb, g)
    before = model.memory.slots.clone()
    model.after_step(out, 1)
    assert torch.equal(model.memory.slots[0], before[0])
    assert not torch.equal(model.memory.slots[1], before[1])
    assert float(model.memory.agg_counts[1].sum()) == 11.0  # 10 patches + F_omics
    assert float(model.memory.agg_counts[0].sum()) == 0.0


def test_patch_projections_and_init_memory():
    torch.manual_seed(3)
    model = build_model(small_cfg(), D_IN, G).train()
    x, nb = bag(30)
    p1 = model.patch_projections(x, nb)
    p2 = model.patch_projections(x, nb)
    assert model.training  # mode restored
    assert torch.equal(p1, p2) and p1.shape == (30, 8) and not p1.requires_grad
    model.init_memory({0: p1[:15], 1: p1[15:]}, seed=0)
    first = model.memory.slots.detach().clone()
    model.init_memory({0: p1[:15], 1: p1[15:]}, seed=0)
    assert torch.equal(model.memory.slots.detach(), first)
    assert model.memory.slots.requires_grad  # still the trainable parameter in gradient mode


def test_abmil_forward_backward_and_factory():
    torch.manual_seed(4)
    cfg = small_cfg()
    cfg.model.name = "abmil"
    model = build_model(cfg, D_IN, G)
    assert isinstance(model, ABMIL) and model.has_memory is False
    x, nb = bag(12)
    out = model(x, nb, torch.randn(G))
    assert out.logits.shape == (2,) and out.attention.shape == (12,)
    assert abs(float(out.attention.detach().sum()) - 1.0) < 1e-5
    assert out.patch_emb is None and out.memory_score is None
    lb = model.loss(out, 1)
    torch.testing.assert_close(lb.total, F.cross_entropy(out.logits[None], torch.tensor([1])))
    assert lb.as_floats()["align_wsi"] == 0.0
    lb.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.after_step(out, 1)  # no-op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, nb).logits).all()
    assert isinstance(build_model(small_cfg(), D_IN, G), MoMKD) and MoMKD.has_memory is True
    cfg.model.name = "nope"
    with pytest.raises(ConfigError, match="model.name"):
        build_model(cfg, D_IN, G)


def test_histology_only_step_never_touches_the_genomic_branch():
    """A slide without genomics: the genomic encoder and projection take no part in the loss or its gradient, so a
    histology-only site need not be sent them (server/strategy.py leaves them out of its messages)."""
    from momkd_fed.federation.sharing import paired_only_keys

    cfg = small_cfg()
    torch.manual_seed(3)
    model = build_model(cfg, D_IN, G).train()
    genomic = paired_only_keys(dict(model.named_parameters()), cfg.federation)
    assert genomic and all(k.startswith(("omics_encoder.", "omics_proj.")) for k in genomic)
    x, nb = bag(30)

    def step(m):
        torch.manual_seed(0)  # same dropout
        m.zero_grad(set_to_none=True)
        out = m(x, nb, None)
        lb = m.loss(out, 1, None)
        lb.total.backward()
        return lb.total.detach(), {n: p.grad for n, p in m.named_parameters()}

    total, grads = step(model)
    assert all(grads[k] is None or not grads[k].any() for k in genomic)
    other = build_model(cfg, D_IN, G).train()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in genomic:
                p.add_(torch.randn_like(p))  # a different genomic branch
    total2, grads2 = step(other)
    assert torch.equal(total, total2)
    for n, g in grads.items():
        if n not in genomic:
            assert (g is None and grads2[n] is None) or torch.equal(g, grads2[n]), n
