"""Our MoMKD equals the authors' code (../shared/reference/momkd) on the same weights: the memory loss, the whole
model, every loss term as the reference's training loop composes it, every gradient, one optimiser step, and
histology-only inference.

The reference is imported, never copied (tests/reference_momkd.py). These tests run the reference's form of the
memory loss (``loss.commit_slot: reference``) whatever the default is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_momkd as R
from momkd_fed import losses as L
from momkd_fed.config import Config, LossConfig, MemoryConfig, ModelConfig
from momkd_fed.data.bag import Bag
from momkd_fed.data.graph import knn_neighbors
from momkd_fed.engine import make_optimizer, sample_order, train_epoch
from momkd_fed.model.memory import ClassMemory
from momkd_fed.model.momkd import MoMKD

_reason = R.missing_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

D_IN, G, K, S = 20, 12, 4, 8
LOSS_TERMS = {"ce": "loss_task", "mem": "mem_loss", "align_omics": "loss_align_rna", "align_wsi": "loss_align_wsi",
              "recon": "loss_recon"}  # our LossBreakdown field -> the key mkd_train_loop returns


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(actual.detach().float(), expected.detach().float().reshape(actual.shape), atol=tol,
                               rtol=tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------------
# 1. The memory: the reference's VectorQuantize pair vs our ClassMemory


def reference_memories() -> tuple[torch.nn.Module, torch.nn.Module]:
    """mem_neg, mem_pos exactly as the reference's MKD builds them (taken from an MKD of the test's dims)."""
    ref = R.reference_model(ModelConfig(hidden_dim=16, shared_dim=S, omics_embed_dim=12, cls_hidden=32),
                            MemoryConfig(slots=K), D_IN, G)
    return ref.mem_neg.train(), ref.mem_pos.train()


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("p", [1, 3, 50])
@pytest.mark.parametrize("codes", ["reference_init", "unit", "mixed_norms"])
def test_memory_loss_and_gradients_equal_vector_quantize(label, p, codes):
    torch.manual_seed(10 * p + label)
    mem_neg, mem_pos = reference_memories()
    own, other = (mem_pos, mem_neg) if label == 1 else (mem_neg, mem_pos)
    with torch.no_grad():  # the reference's kaiming-uniform codes (norm ~0.35), unit codes, or spread norms
        for m in (mem_neg, mem_pos):
            c = m._codebook.embed  # (1, K, S)
            if codes == "unit":
                c.copy_(torch.nn.functional.normalize(torch.randn_like(c), dim=-1))
            elif codes == "mixed_norms":
                c.copy_(torch.randn_like(c) * torch.linspace(0.2, 1.5, K).view(1, K, 1))
    proj = torch.nn.functional.normalize(torch.randn(p, S), dim=-1)  # (P, S) unit patch projections

    # reference: the class-y memory with its codebook live, the other one frozen under no_grad (as MKD does)
    x_ref = proj.clone().requires_grad_(True)
    _, _, ref_loss = own(x_ref.unsqueeze(0), freeze_codebook=False)
    with torch.no_grad():
        other(x_ref.unsqueeze(0), freeze_codebook=True)
    ref_loss.sum().backward()

    # ours: the same codes in a gradient-mode ClassMemory (row 0 = C- = mem_neg, row 1 = C+ = mem_pos)
    mem = ClassMemory(MemoryConfig(slots=K, update="gradient"), S)
    with torch.no_grad():
        mem.slots.copy_(torch.cat([mem_neg._codebook.embed, mem_pos._codebook.embed]))  # raw, not normalised
    x = proj.clone().requires_grad_(True)
    lc = LossConfig(commit_slot="reference")
    ours, _, _ = L.memory_loss(x, mem.slots[label], lc.commit_slot, lc.ortho_weight)
    ours.backward()

    close(ours, ref_loss, 1e-6, "memory loss")
    close(x.grad, x_ref.grad, 1e-6, "gradient w.r.t. the patch projections")
    close(mem.slots.grad[label], own._codebook.embed.grad[0], 1e-6, "gradient w.r.t. the class-y codes")
    assert other._codebook.embed.grad is None and mem.slots.grad[1 - label].abs().sum() == 0
    assert mem.slots.grad[label].abs().sum() > 0  # the orthogonality term trains the class-y codes


def test_reference_commitment_does_not_move_the_codes():
    """The fact the default rests on: in vector-quantize-pytorch 1.22.17, as the reference configures it
    (``orthogonal_reg_weight=10, ema_update=False``, ``learnable_codebook`` not set), the codebook is a parameter
    but the commitment MSE is taken against the DETACHED nearest code: only the orthogonality term reaches it."""
    torch.manual_seed(0)
    _, mem_pos = reference_memories()
    codes = mem_pos._codebook.embed
    assert isinstance(codes, torch.nn.Parameter) and not mem_pos.learnable_codebook
    proj = torch.nn.functional.normalize(torch.randn(30, S), dim=-1).requires_grad_(True)
    _, _, loss, parts = mem_pos(proj.unsqueeze(0), freeze_codebook=False, return_loss_breakdown=True)
    assert torch.autograd.grad(parts.commitment, codes, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(parts.commitment, proj, retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(parts.orthogonal_reg, codes, retain_graph=True)[0].abs().sum() > 0
    # our moving variant is the same value with the extra slot gradient; cosine differs on these raw codes
    slots = codes[0].detach().clone().requires_grad_(True)
    moving, _, _ = L.memory_loss(proj.detach(), slots, "moving", 10.0)
    close(moving, loss, 1e-6, "moving memory loss value")
    moving_grad = torch.autograd.grad(moving, slots)[0]
    ref_grad = torch.autograd.grad(loss.sum(), codes)[0][0]
    assert (moving_grad - ref_grad).abs().max() > 1e-3
    cosine, _, _ = L.memory_loss(proj.detach(), slots, "cosine", 10.0)
    assert abs(float(cosine.detach()) - float(loss.detach())) > 1e-2  # codes of norm ~0.35: the MSE to the unit slot differs


# --------------------------------------------------------------------------------------------------------------
# 2. The whole model: the reference MKD vs our MoMKD with the same weights


def configs() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(hidden_dim=16, heads=2, shared_dim=S, omics_hidden=512, omics_embed_dim=12, cls_hidden=32,
                            dropout=0.0, attn_dropout=0.0, omics_dropout=0.0)
    cfg.memory = MemoryConfig(slots=K, update="gradient")
    cfg.loss = LossConfig(commit_slot="reference")  # the reference's form, whatever the default
    cfg.train.precision = "fp32"
    cfg.train.grad_clip = 16.0
    cfg.data.max_patches = 0
    return cfg


def make_bag(p: int, label: int, seed: int) -> Bag:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 20, (p, 2), generator=gen) * 224  # (P, 2) level-0 pixels on a grid
    return Bag(slide_id=f"s{seed}", case_id=f"c{seed}", label=label, features=torch.randn(p, D_IN, generator=gen),
               coords=coords, neighbors=knn_neighbors(coords.numpy(), 8),
               omics=torch.randn(G, generator=gen))


def models(seed: int, init: str) -> tuple[MoMKD, torch.nn.Module]:
    cfg = configs()
    torch.manual_seed(seed)
    ours = MoMKD(cfg.model, cfg.memory, cfg.loss, D_IN, G)
    ref = R.reference_model(cfg.model, cfg.memory, D_IN, G)
    if init == "reference":  # the reference's own initial weights (raw codes of norm ~0.35)
        R.copy_from_reference(ours, ref)
    else:  # ours (unit slots), perturbed so that the memory rows differ in norm
        with torch.no_grad():
            ours.memory.slots.mul_(torch.linspace(0.5, 1.5, K).view(1, K, 1))
        R.copy_into_reference(ours, ref)
    R.disable_dropout(ref)
    return ours.train(), ref.train()


def record_grads(opt, into: dict) -> None:
    """Keep each parameter's gradient as the optimiser's step sees it (after clipping). Wraps ``step`` (our
    engine's optimiser is not a ``torch.optim.Optimizer``: momkd_fed.optim, no step hooks)."""
    step = opt.step

    def recording_step(*args, **kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                into[id(p)] = None if p.grad is None else p.grad.detach().clone()
        return step(*args, **kwargs)
    opt.step = recording_step


BAGS = [(1, 1), (3, 0), (9, 1), (40, 0), (57, 1)]  # (P, label): P = 1 and 3 have k_eff = P - 1 < k = 8


@pytest.mark.parametrize("init", ["reference", "ours"])
@pytest.mark.parametrize("p,label", BAGS)
def test_model_equals_reference_forward_losses_gradients_and_step(p, label, init):
    torch.set_num_threads(1)
    cfg = configs()
    ours, ref = models(seed=p, init=init)
    bag = make_bag(p, label, seed=100 + p)
    ei = R.edge_index(bag.neighbors)
    rna, y = bag.omics.unsqueeze(0), torch.tensor([label])
    _, tu = R.load_reference()

    # forward (training mode, dropout off)
    out = ours(bag.features, bag.neighbors, bag.omics)
    ref_out = ref.forward_train(rna, (bag.features, ei), y)
    close(out.logits, ref_out["logits"], 1e-5, "logits")
    close(out.attention, ref_out["attention"], 1e-5, "attention")
    close(out.slide_emb, ref_out["wsi_proj"], 1e-5, "slide projection F_wsi")
    close(out.omics_emb, ref_out["rna_proj"], 1e-5, "genomic projection F_omics")
    close(out.omics_recon, ref_out["reconstructed_rna"], 1e-5, "reconstruction")
    ref_patch = torch.nn.functional.normalize(ref.wsi_patch_projector(ref.wsi_encoder((bag.features, ei))), dim=-1)
    close(out.patch_emb, ref_patch, 1e-5, "patch projections")
    sims = torch.einsum("ps,cks->cpk", out.patch_emb, ours.memory.normalized()).argmax(-1)  # (2, P)
    assert torch.equal(sims[1], ref_out["idx_pos"]) and torch.equal(sims[0], ref_out["idx_neg"])

    # every loss term and every gradient: the reference's own training loop, one slide, vs our engine's epoch
    ours_opt, ref_opt = make_optimizer(ours, cfg.train), torch.optim.AdamW(ref.parameters(), lr=2e-4, weight_decay=1e-4)
    ours_grads, ref_grads = {}, {}
    record_grads(ours_opt, ours_grads)
    record_grads(ref_opt, ref_grads)
    hp = R.hparams(cfg.loss, cfg.train.grad_clip)
    ref_terms = tu.mkd_train_loop(0, ref, [((bag.features, ei), rna, y, bag.slide_id)], ref_opt, hp, "cpu")
    terms = train_epoch(ours, [bag], ours_opt, cfg, generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu"))
    for mine, theirs in LOSS_TERMS.items():
        assert abs(terms[mine] - ref_terms[theirs]) <= 1e-5 * max(1.0, abs(ref_terms[theirs])), (mine, terms[mine],
                                                                                                 ref_terms[theirs])
    ref_total = (hp["task_weight"] * ref_terms["loss_task"] + 0.1 * ref_terms["mem_loss"]
                 + hp["alpha_rna"] * ref_terms["loss_align_rna"] + hp["alpha_wsi"] * ref_terms["loss_align_wsi"]
                 + hp["recon_weight"] * ref_terms["loss_recon"])
    assert abs(terms["total"] - ref_total) <= 1e-5 * max(1.0, abs(ref_total))
    n_compared, grad_pairs = 0, {}
    for name, mine, theirs in R.paired_tensors(ours, ref):
        row = None
        if name.startswith("memory.slots["):
            row, mine_grad = int(name[-2]), ours_grads[id(ours.memory.slots)]
            mine_grad = mine_grad[row]
        else:
            mine_grad = ours_grads[id(mine)]
        ref_param = dict(ref.named_parameters())[R.MEMORY[row] if row is not None else R.reference_name(name)]
        ref_grad = ref_grads[id(ref_param)].reshape(mine_grad.shape)
        close(mine_grad, ref_grad, 1e-5, f"gradient of {name}")
        grad_pairs[name] = (mine_grad, ref_grad)
        n_compared += 1
    assert n_compared == len(list(ref.parameters())) == len(list(ours.parameters())) + 1  # slots: two rows
    assert ours_grads[id(ours.memory.slots)][label].abs().sum() > 0

    # one optimiser step later (AdamW 2e-4 / 1e-4, clipping at 16 in both): the same weights, to 1e-5 wherever the
    # step is well conditioned. AdamW's first step is lr * g / (|g| + eps), eps = 1e-8: where |g| is ~1e-8 (seen on
    # lin_r of the fully connected P <= k graphs) it amplifies fp32 rounding of g into up to 2 lr; there the two
    # weights may differ by exactly what that formula makes of the two (equal to 1e-5) gradients, no more.
    lr, eps = cfg.train.lr, 1e-8
    for name, mine, theirs in R.paired_tensors(ours, ref):
        g_ours, g_ref = grad_pairs[name]
        amplified = lr * (g_ours / (g_ours.abs() + eps) - g_ref / (g_ref.abs() + eps)).abs()
        diff = (mine - theirs).abs()
        assert bool((diff <= 1e-5 + 1.01 * amplified).all()), (name, float((diff - amplified).max()))
        well = (g_ours.abs() > 1e-6) & (g_ref.abs() > 1e-6)
        close(mine[well], theirs[well], 1e-5, f"{name} after one step")

    # histology-only inference: our eval forward without genomics vs the reference's forward_inference
    ours.eval()
    ref.eval()
    with torch.no_grad():
        out = ours(bag.features, bag.neighbors)
        logits, attention = ref.forward_inference((bag.features, ei))
    close(out.logits, logits, 1e-5, "inference logits")
    close(out.attention, attention, 1e-5, "inference attention")


def test_mapping_covers_every_parameter_once():
    ours, ref = models(seed=0, init="ours")
    pairs = R.paired_tensors(ours, ref)
    assert len(pairs) == len(list(ref.parameters())) == len(list(ours.parameters())) + 1
    assert all(tuple(a.shape) == tuple(b.shape) for _, a, b in pairs)
    assert np.all([torch.equal(a, b) for _, a, b in pairs])


def test_three_epochs_of_our_engine_equal_the_reference_loop():
    """Training, not one step: the same initial weights (the reference's own), the same class-balanced slide order
    (the generator draws engine.fit makes), dropout off, three epochs of six slides; after 18 AdamW steps with
    clipping every weight of ours equals the reference's."""
    torch.set_num_threads(1)
    cfg = configs()
    ours, ref = models(seed=7, init="reference")
    bags = [make_bag(p, label, seed=200 + i) for i, (p, label) in enumerate([(20, 1), (33, 0), (57, 1), (25, 0),
                                                                             (41, 1), (30, 0)])]
    _, tu = R.load_reference()
    start = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    ours_opt, ref_opt = make_optimizer(ours, cfg.train), torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr,
                                                                          weight_decay=cfg.train.weight_decay)
    # the settings directly: a weight-decay change of 1e-4 moves these weights by < 1e-6 in 18 steps (below the
    # tolerance), a 10% lr change fails the loss check below
    assert [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} for g in ours_opt.param_groups] == \
        [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} for g in ref_opt.param_groups]
    hp = R.hparams(cfg.loss, cfg.train.grad_clip)
    ours_gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for epoch in range(3):
        order = sample_order(bags, cfg.train.balanced_sampling, ref_gen)  # what train_epoch draws from its generator
        loader = [((bags[i].features, R.edge_index(bags[i].neighbors)), bags[i].omics.unsqueeze(0),
                   torch.tensor([bags[i].label]), bags[i].slide_id) for i in order]
        ref_terms = tu.mkd_train_loop(epoch, ref, loader, ref_opt, hp, "cpu")
        terms = train_epoch(ours, bags, ours_opt, cfg, generator=ours_gen, device=torch.device("cpu"))
        assert abs(terms["ce"] - ref_terms["loss_task"]) <= 1e-4, (epoch, terms["ce"], ref_terms["loss_task"])
    with torch.no_grad():
        diffs = {name: float((mine - theirs).abs().max()) for name, mine, theirs in R.paired_tensors(ours, ref)}
        moved = max(float((v - start[k]).abs().max()) for k, v in ours.state_dict().items())
    assert moved > 10 * cfg.train.lr  # the weights did move (18 steps of lr 2e-4)
    assert max(diffs.values()) <= 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
