"""The plain-torch GATv2 equals torch_geometric's GATv2Conv (forward and backward), chunking included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from momkd_fed.model import gatv2
from momkd_fed.model.gatv2 import GATv2Layer, HistologyEncoder, gatv2_attention

pyg = pytest.importorskip("torch_geometric.nn", reason="torch_geometric is a test-only dependency")


def knn_index(coords: torch.Tensor, k: int) -> torch.Tensor:
    """(P, 2) -> (P, k_eff + 1) brute-force kNN, column 0 = self, k_eff = min(k, P - 1)."""
    p = coords.shape[0]
    k_eff = min(k, p - 1)
    d = torch.cdist(coords.float(), coords.float())  # (P, P)
    d.fill_diagonal_(float("inf"))
    nn_idx = d.topk(k_eff, dim=1, largest=False).indices if k_eff > 0 else torch.empty(p, 0, dtype=torch.long)
    return torch.cat([torch.arange(p).unsqueeze(1), nn_idx], dim=1)  # (P, k_eff + 1)


def edge_index_of(neighbors: torch.Tensor) -> torch.Tensor:
    """Dense (P, k+1) index -> (2, E) edge_index with edges j -> i (source row 0, target row 1)."""
    p, k1 = neighbors.shape
    return torch.stack([neighbors.reshape(-1), torch.arange(p).repeat_interleave(k1)])  # (2, P*(k+1))


def pyg_layer_like(layer: GATv2Layer, in_dim: int) -> nn.Module:
    conv = pyg.GATv2Conv(in_dim, layer.head_dim, heads=layer.heads, concat=True, share_weights=False,
                         add_self_loops=False, dropout=0.0)
    with torch.no_grad():
        conv.lin_l.weight.copy_(layer.lin_l.weight)
        conv.lin_l.bias.copy_(layer.lin_l.bias)
        conv.lin_r.weight.copy_(layer.lin_r.weight)
        conv.lin_r.bias.copy_(layer.lin_r.bias)
        conv.att.copy_(layer.att.unsqueeze(0))
        conv.bias.copy_(layer.bias)
    return conv


class PygEncoder(nn.Module):
    """The reference encoder built from GATv2Conv (as the reference code does), for comparison."""

    def __init__(self, enc: HistologyEncoder, in_dim: int) -> None:
        super().__init__()
        self.gats = nn.ModuleList(pyg_layer_like(g, in_dim if i == 0 else g.lin_l.in_features)
                                  for i, g in enumerate(enc.gats))
        self.enc = enc  # LayerNorms and the residual projection are shared, not copied

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h, out = x, None
        for i, (gat, norm) in enumerate(zip(self.gats, self.enc.norms)):
            res = self.enc.res_proj(h) if i == 0 else h
            h = self.enc.dropout(F.elu(norm(gat(h, edge_index)))) + res
            out = h if out is None else torch.maximum(out, h)
        return out


@pytest.mark.parametrize("p", [1, 2, 5, 9, 60])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_layer_matches_pyg_forward_and_backward(p, small_chunks, monkeypatch):
    if small_chunks:  # force many chunks, including a ragged last one
        monkeypatch.setattr(gatv2, "EDGE_CHUNK_ELEMENTS", 7 * 9 * 16)
    torch.manual_seed(p)
    in_dim, out_dim = 24, 16
    layer = GATv2Layer(in_dim, out_dim, heads=2).eval()
    with torch.no_grad():
        layer.bias.normal_()  # non-zero biases so they are compared too
        layer.lin_l.bias.normal_()
        layer.lin_r.bias.normal_()
    conv = pyg_layer_like(layer, in_dim).eval()
    neighbors = knn_index(torch.rand(p, 2) * 1000, k=8)
    assert neighbors.shape == (p, min(8, p - 1) + 1)
    x1 = torch.randn(p, in_dim, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ours = layer(x1, neighbors)
    ref = conv(x2, edge_index_of(neighbors))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name, mine, theirs in [("lin_l.weight", layer.lin_l.weight, conv.lin_l.weight),
                               ("lin_l.bias", layer.lin_l.bias, conv.lin_l.bias),
                               ("lin_r.weight", layer.lin_r.weight, conv.lin_r.weight),
                               ("lin_r.bias", layer.lin_r.bias, conv.lin_r.bias),
                               ("bias", layer.bias, conv.bias)]:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(layer.att.grad, conv.att.grad.squeeze(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [1, 5, 80])
def test_encoder_matches_pyg_encoder(p):
    torch.manual_seed(10 + p)
    enc = HistologyEncoder(32, 16, heads=2, attn_dropout=0.5, dropout=0.5).eval()
    ref = PygEncoder(enc, 32).eval()
    neighbors = knn_index(torch.rand(p, 2) * 500, k=8)
    x = torch.randn(p, 32)
    torch.testing.assert_close(enc(x, neighbors), ref(x, edge_index_of(neighbors)), atol=1e-5, rtol=1e-5)


def naive_attention(xl, xr, att, neighbors, keep, slope=0.2):
    """Textbook GATv2 over the dense index with plain autograd (materialises every per-edge tensor)."""
    g = xl[neighbors]  # (P, k+1, H, C)
    e = (F.leaky_relu(g + xr.unsqueeze(1), slope) * att).sum(-1)  # (P, k+1, H)
    a = torch.softmax(e, dim=1) * keep  # (P, k+1, H)
    return (a.unsqueeze(-1) * g).sum(1)  # (P, H, C)


def test_attention_dropout_gradients_match_naive_autograd(monkeypatch):
    monkeypatch.setattr(gatv2, "EDGE_CHUNK_ELEMENTS", 5 * 6 * 8)
    torch.manual_seed(3)
    p, h, c = 23, 2, 4
    neighbors = knn_index(torch.rand(p, 2), k=5)
    keep = (torch.rand(p, 6, h) > 0.5).double() / 0.5  # a fixed dropout mask
    args = [torch.randn(p, h, c, dtype=torch.double, requires_grad=True),
            torch.randn(p, h, c, dtype=torch.double, requires_grad=True),
            torch.randn(h, c, dtype=torch.double, requires_grad=True)]
    ours = gatv2_attention(*args, neighbors, keep=keep)
    ref = naive_attention(*args, neighbors, keep)
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * w).sum(), args)
    g_ref = torch.autograd.grad((ref * w).sum(), args)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda xl, xr, at: gatv2_attention(xl, xr, at, neighbors, keep=keep), args)


def test_attention_dropout_is_active_only_in_training():
    torch.manual_seed(4)
    layer = GATv2Layer(8, 8, heads=2, attn_dropout=0.5)
    neighbors = knn_index(torch.rand(30, 2), k=4)
    x = torch.randn(30, 8)
    layer.eval()
    assert torch.equal(layer(x, neighbors), layer(x, neighbors))
    layer.train()
    assert not torch.allclose(layer(x, neighbors), layer(x, neighbors))


def test_encoder_runs_under_bf16_autocast():
    torch.manual_seed(5)
    enc = HistologyEncoder(32, 16, heads=2).eval()
    neighbors = knn_index(torch.rand(50, 2), k=8)
    x = torch.randn(50, 32)
    ref = enc(x, neighbors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x, neighbors)
        out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.15  # bf16 matmuls, fp32 attention
    for name, prm in enc.named_parameters():
        assert prm.grad is not None and prm.grad.dtype == torch.float32 and torch.isfinite(prm.grad).all(), name


def test_fast_dropout_is_inverted_dropout():
    torch.manual_seed(6)
    x = torch.randn(400, 300, requires_grad=True)
    assert gatv2.fast_dropout(x, 0.5, training=False) is x
    y = gatv2.fast_dropout(x, 0.25, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 120k draws: std ~0.0013
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert torch.equal(gatv2.fast_dropout(x, 1.0, training=True), torch.zeros_like(x))


def test_encoder_inference_in_place_path_matches_autograd_path():
    torch.manual_seed(7)
    enc = HistologyEncoder(24, 16, heads=2, layers=3).eval()
    neighbors = knn_index(torch.rand(40, 2), k=6)
    x = torch.randn(40, 24)
    with_grad = enc(x, neighbors)
    with torch.no_grad():
        no_grad = enc(x, neighbors)
    torch.testing.assert_close(no_grad, with_grad, atol=0, rtol=0)


def test_jk_maximum_gradient_equals_torch_maximum_ties_included():
    torch.manual_seed(8)
    a = torch.randn(300, 40)
    b = torch.where(torch.rand(300, 40) < 0.5, a, torch.randn(300, 40))  # half the elements tie (dropout zeros)
    g = torch.randn(300, 40)
    ours = [t.clone().requires_grad_(True) for t in (a, b)]
    ref = [t.clone().requires_grad_(True) for t in (a, b)]
    out = gatv2._Maximum.apply(*ours)
    assert torch.equal(out, torch.maximum(*ref))
    out.backward(g)
    torch.maximum(*ref).backward(g)
    for x, y in zip(ours, ref):
        assert torch.equal(x.grad, y.grad)  # bit for bit: grad, grad / 2 on ties, 0
