"""GATv2 over a dense kNN neighbour index, in plain torch, and the two-layer histology encoder built from it.

The graph of a slide is a (P, k+1) index whose row i lists the neighbours j of patch i, column 0 being i itself.
For an edge j -> i (method.md, after Brody et al. 2022 and torch_geometric's ``GATv2Conv``)::

    e_ij     = a^T LeakyReLU(W_l x_j + W_r x_i)          (slope 0.2, per head)
    alpha_ij = softmax_j(e_ij)                            (over the k+1 neighbours of i, self included)
    h_i      = sum_j dropout(alpha_ij) W_l x_j + bias     (heads concatenated)

``W_l`` and ``W_r`` carry biases, as in ``GATv2Conv(bias=True)``, so weights load one-to-one from it.

Memory: the per-edge tensors (P, k+1, H, C) are what make graph attention expensive (torch_geometric keeps
several of them for backward). Here the attention is one autograd function that keeps only W_l x, W_r x
(P, H, C), the attention weights (P, k+1, H) and the dropout mask, works through the nodes in chunks, and
recomputes the per-edge terms chunk by chunk in backward. The arithmetic is the same; only the peak differs.

Speed (CPU; benchmarks/step_speed.py): the per-edge work is memory-bound, so each chunk is small enough to stay in
cache and is worked through two buffers allocated once per call (fresh multi-MB temporaries cost page faults);
the per-head score a^T z is one matmul against a block-diagonal (H*C, H) matrix; the LeakyReLU derivative is
``leaky_relu_backward`` written in place; d a is one (H, n) x (n, H*C) matmul per chunk. All arithmetic stays in
float32 (float64 under gradcheck) whatever the autocast dtype of W_l x and W_r x.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .precision import compute_dtype, full_precision

# per-edge elements (rows * (k+1) * H * C) processed at once, per CPU thread. The per-edge work is memory-bound:
# on CPU each thread's share of the chunk's two work buffers (allocated once per call and reused, so no page
# faults per chunk) should stay in its L2 cache (measured, 1 thread: 2^17 fastest, 2^15 and 2^20 ~10-25% slower);
# on CUDA larger chunks mean fewer launches.
EDGE_CHUNK_ELEMENTS = 1 << 17
EDGE_CHUNK_ELEMENTS_CUDA = 1 << 23


def _chunk_rows(device: torch.device, n_nbrs: int, width: int) -> int:
    if device.type == "cuda":
        budget = EDGE_CHUNK_ELEMENTS_CUDA
    else:
        budget = EDGE_CHUNK_ELEMENTS * max(1, torch.get_num_threads())
    return max(1, budget // max(1, n_nbrs * width))


def _head_blocks(att: Tensor) -> Tensor:
    """(H, C) attention vectors -> (H*C, H) block-diagonal matrix: ``z.view(-1, H*C) @ A`` = per-head a^T z."""
    h, c = att.shape
    blocks = att.new_zeros(h, c, h)  # (H, C, H)
    idx = torch.arange(h, device=att.device)
    blocks[idx, :, idx] = att  # (H, C) on the diagonal blocks
    return blocks.view(h * c, h)


class _GATv2Attention(torch.autograd.Function):
    """Fused GATv2 edge scoring, neighbour softmax, attention dropout and aggregation (see module docstring)."""

    @staticmethod
    def forward(ctx, xl: Tensor, xr: Tensor, att: Tensor, bias: Tensor | None, neighbors: Tensor,
                keep: Tensor | None, slope: float) -> Tensor:
        with full_precision(xl):
            out, alpha = _GATv2Attention._forward(xl, xr, att, neighbors, keep, slope)  # (P,H,C), (P,k+1,H)
            if bias is not None:
                out.view(out.shape[0], -1).add_(bias.to(out.dtype))  # in place: one (P, H*C) tensor less
        ctx.save_for_backward(xl, xr, att, neighbors, alpha, keep)
        ctx.slope = slope
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out  # float32 (float64 for float64 inputs), also under autocast: LayerNorm follows

    @staticmethod
    def _forward(xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, keep: Tensor | None,
                 slope: float) -> tuple[Tensor, Tensor]:
        p, h, c = xl.shape
        k1 = neighbors.shape[1]
        dt = compute_dtype(xl)
        xl2 = xl.to(dt).reshape(p, h * c)  # (P, H*C)
        xr3 = xr.to(dt)  # (P, H, C)
        blocks = _head_blocks(att.to(dt))  # (H*C, H)
        out = torch.empty(p, h, c, dtype=dt, device=xl.device)  # (P, H, C)
        alpha = torch.empty(p, k1, h, dtype=dt, device=xl.device)  # (P, k+1, H)
        step = min(p, _chunk_rows(xl.device, k1, h * c))
        buf_g = torch.empty(step * k1, h * c, dtype=dt, device=xl.device)  # (n*(k+1), H*C) W_l x_j
        buf_z = torch.empty_like(buf_g)  # (n*(k+1), H*C) work
        for s in range(0, p, step):
            e = min(p, s + step)
            n = e - s
            nb = neighbors[s:e].reshape(-1)  # (n*(k+1),)
            g = torch.index_select(xl2, 0, nb, out=buf_g[: n * k1])  # (n*(k+1), H*C)
            z = buf_z[: n * k1]
            torch.add(g.view(n, k1, h, c), xr3[s:e].unsqueeze(1), out=z.view(n, k1, h, c))  # pre-activation
            F.leaky_relu(z, slope, inplace=True)
            logits = torch.mm(z, blocks).view(n, k1, h)  # (n, k+1, H)  a^T LeakyReLU(.) per head
            a = torch.softmax(logits, dim=1)  # (n, k+1, H)
            alpha[s:e] = a
            ad = a if keep is None else a * keep[s:e]  # (n, k+1, H)
            torch.mul(g.view(n, k1, h, c), ad.unsqueeze(-1), out=z.view(n, k1, h, c))
            torch.sum(z.view(n, k1, h, c), 1, out=out[s:e])  # (n, H, C)
        return out, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        xl, xr, att, neighbors, alpha, keep = ctx.saved_tensors
        with full_precision(xl):
            grads = _GATv2Attention._backward(grad_out, xl, xr, att, neighbors, alpha, keep, ctx.slope)
            grad_bias = None
            if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
                grad_bias = grad_out.reshape(grad_out.shape[0], -1).sum(0).to(ctx.bias_dtype)  # (H*C,)
        return (*grads, grad_bias, None, None, None)

    @staticmethod
    def _backward(grad_out: Tensor, xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, alpha: Tensor,
                  keep: Tensor | None, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        p, h, c = xl.shape
        k1 = neighbors.shape[1]
        dt = alpha.dtype
        xl2 = xl.to(dt).reshape(p, h * c)  # (P, H*C)
        xr3 = xr.to(dt)  # (P, H, C)
        go_all = grad_out.to(dt)  # (P, H, C)
        att_c = att.to(dt)  # (H, C)
        grad_xl = torch.zeros(p, h * c, dtype=dt, device=xl.device)  # (P, H*C)
        grad_xr = torch.empty(p, h, c, dtype=dt, device=xl.device)  # (P, H, C)
        grad_att_full = torch.zeros(h, h * c, dtype=dt, device=xl.device)  # (H, H*C); diagonal blocks used
        step = min(p, _chunk_rows(xl.device, k1, h * c))
        buf_g = torch.empty(step * k1, h * c, dtype=dt, device=xl.device)  # (n*(k+1), H*C)
        buf_z = torch.empty_like(buf_g)  # (n*(k+1), H*C)
        for s in range(0, p, step):
            e = min(p, s + step)
            n = e - s
            nb = neighbors[s:e].reshape(-1)  # (n*(k+1),)
            g = torch.index_select(xl2, 0, nb, out=buf_g[: n * k1]).view(n, k1, h, c)  # W_l x_j
            z = buf_z[: n * k1].view(n, k1, h, c)
            go = go_all[s:e]  # (n, H, C)
            a = alpha[s:e]  # (n, k+1, H)
            ad = a if keep is None else a * keep[s:e]  # (n, k+1, H)
            # d out_i / d alpha_ij = <go_i, W_l x_j>, through the dropout mask, then the softmax Jacobian
            ga = torch.mul(g, go.unsqueeze(1), out=z).sum(-1)  # (n, k+1, H)
            if keep is not None:
                ga = ga * keep[s:e]
            ge = a * (ga - (ga * a).sum(1, keepdim=True))  # (n, k+1, H)  d loss / d e_ij
            g.add_(xr3[s:e].unsqueeze(1))  # (n, k+1, H, C)  pre-activation (reuses g)
            torch.mul(ge.unsqueeze(-1), att_c, out=z)  # (n, k+1, H, C)  d loss / d LeakyReLU(.)
            torch.ops.aten.leaky_relu_backward.grad_input(z, g, slope, False, grad_input=z)  # d / d pre-activation
            F.leaky_relu(g, slope, inplace=True)
            grad_att_full.addmm_(ge.view(n * k1, h).T, g.view(n * k1, h * c))  # (H, H*C)
            torch.sum(z, 1, out=grad_xr[s:e])  # (n, H, C)
            z.addcmul_(ad.unsqueeze(-1), go.unsqueeze(1))  # + aggregation path into W_l x_j
            grad_xl.index_add_(0, nb, z.view(n * k1, h * c))
        idx = torch.arange(h, device=xl.device)
        grad_att = grad_att_full.view(h, h, c)[idx, idx]  # (H, C)
        return (grad_xl.view(p, h, c).to(xl.dtype), grad_xr.to(xr.dtype), grad_att.to(att.dtype))


class _Maximum(torch.autograd.Function):
    """``torch.maximum`` with torch's gradient (ties split evenly), its backward in plain arithmetic passes.

    torch's own backward (``where`` / ``masked_fill_`` over boolean masks, slow on CPU) cost ~11 ms of a ~190 ms
    training step at P = 1,000 (benchmarks/step_speed.py). Ties are common here: where dropout zeroes an element
    of layer 2, h2 = h1 exactly. The gradients equal torch's bit for bit for finite values (subnormal gradients
    aside, where grad * 0.5 rounds).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.maximum(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        half = grad * 0.5
        # sign(a - b) in {1, 0, -1} (a - b is 0 only where a == b) -> grad, grad/2 or 0, all exact
        grad_a = torch.sub(a, b).sign_().mul_(half).add_(half)
        return grad_a, grad - grad_a


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (as ``F.dropout``) with the mask drawn by ``torch.rand``.

    On CPU this is about 3x faster than ``F.dropout`` (whose ``bernoulli_`` is slow), and autograd keeps a 1-byte
    0/1 mask for backward instead of a float one. Same distribution; a different random stream.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    # the bool mask reinterpreted as uint8 0/1 (no copy): on CPU multiplying by uint8 is ~2x faster than by bool,
    # forward and backward
    keep = (torch.rand(x.shape, device=x.device) >= p).view(torch.uint8)  # (...) 0/1
    return x.mul(keep).mul_(1.0 / (1.0 - p))


def gatv2_attention(xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, slope: float = 0.2,
                    dropout: float = 0.0, training: bool = False, keep: Tensor | None = None,
                    bias: Tensor | None = None) -> Tensor:
    """GATv2 attention and aggregation over a dense neighbour index.

    Parameters
    ----------
    xl, xr : Tensor
        (P, H, C) W_l x and W_r x.
    att : Tensor
        (H, C) attention vectors a.
    neighbors : Tensor
        (P, k+1) int64; row i lists the sources j of the edges j -> i.
    slope : float
        LeakyReLU negative slope.
    dropout, training : float, bool
        Attention-coefficient dropout (applied to alpha after the softmax, as torch_geometric does).
    keep : Tensor, optional
        (P, k+1, H) explicit dropout multiplier (0 or 1/(1-p)); overrides ``dropout`` (for tests).
    bias : Tensor, optional
        (H*C,) output bias, added in place.

    Returns
    -------
    Tensor
        (P, H, C) sum_j alpha_ij W_l x_j (+ bias), in float32 (float64 for float64 inputs) whatever the dtype
        of ``xl`` under autocast.
    """
    if keep is None and training and dropout > 0.0:
        shape = (xl.shape[0], neighbors.shape[1], xl.shape[1])
        keep = (torch.rand(shape, device=xl.device) >= dropout).to(compute_dtype(xl))  # (P, k+1, H)
        keep.div_(1.0 - dropout)
    return _GATv2Attention.apply(xl, xr, att, bias, neighbors, keep, slope)


class GATv2Layer(nn.Module):
    """One GATv2 layer, heads concatenated (parameter names as in torch_geometric's ``GATv2Conv``).

    Parameters
    ----------
    in_dim : int
        Input width.
    out_dim : int
        Output width (heads concatenated); each head has ``out_dim // heads`` channels.
    heads : int
        Attention heads.
    attn_dropout : float
        Dropout on the attention coefficients.
    slope : float
        LeakyReLU negative slope.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int = 2, attn_dropout: float = 0.0,
                 slope: float = 0.2) -> None:
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"GATv2Layer: out_dim={out_dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = out_dim // heads
        self.attn_dropout = attn_dropout
        self.slope = slope
        self.lin_l = nn.Linear(in_dim, out_dim)
        self.lin_r = nn.Linear(in_dim, out_dim)
        self.att = nn.Parameter(torch.empty(heads, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot weights, zero biases (as torch_geometric)."""
        for lin in (self.lin_l, self.lin_r):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        bound = (6.0 / (self.heads + self.head_dim)) ** 0.5
        nn.init.uniform_(self.att, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """(P, in_dim), (P, k+1) -> (P, out_dim)."""
        p = x.shape[0]
        xl = self.lin_l(x).view(p, self.heads, self.head_dim)  # (P, H, C)
        xr = self.lin_r(x).view(p, self.heads, self.head_dim)  # (P, H, C)
        out = gatv2_attention(xl, xr, self.att, neighbors, self.slope, self.attn_dropout, self.training,
                              bias=self.bias)  # (P, H, C)
        return out.view(p, -1)  # (P, H*C)


class HistologyEncoder(nn.Module):
    """Two GATv2 layers with LayerNorm, ELU, dropout and residuals, jumping-knowledge max (method.md).

    ``h1 = dropout(ELU(LN(GAT1(x)))) + R x``; ``h2 = dropout(ELU(LN(GAT2(h1)))) + h1``; ``H = max(h1, h2)``.

    Parameters
    ----------
    in_dim : int
        Patch feature dimension D_in.
    hidden_dim : int
        D (heads concatenated).
    heads, attn_dropout, dropout : int, float, float
        As in ModelConfig.
    layers : int
        GATv2 layers (>= 1); every layer after the first has an identity residual; output = max over layers.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, heads: int = 2, attn_dropout: float = 0.5,
                 dropout: float = 0.5, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"HistologyEncoder: layers must be >= 1, got {layers}")
        dims = [in_dim] + [hidden_dim] * layers
        self.gats = nn.ModuleList(GATv2Layer(dims[i], hidden_dim, heads, attn_dropout) for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.res_proj = nn.Linear(in_dim, hidden_dim)  # residual of layer 1
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """(P, D_in), (P, k+1) -> (P, D)."""
        # In place where autograd allows it: every fresh (P, D) tensor costs page faults (tensors above glibc's
        # 32 MB mmap threshold, P > 16k at D = 512, are mapped afresh on every allocation).
        no_grad = not torch.is_grad_enabled()
        fresh_dropout = self.training and self.dropout.p > 0.0  # dropout returns a new tensor
        h = x
        out: Tensor | None = None
        for i, (gat, norm) in enumerate(zip(self.gats, self.norms)):
            res = self.res_proj(h) if i == 0 else h  # (P, D)
            a = F.elu(norm(gat(h, neighbors)), inplace=no_grad)  # (P, D)
            a = fast_dropout(a, self.dropout.p, self.training)  # (P, D)
            h = a.add_(res) if (no_grad or fresh_dropout) else a + res  # (P, D)
            if out is None:
                out = h
            elif no_grad:
                out = torch.maximum(out, h, out=out)  # jumping knowledge: max (earlier h's are used up)
            else:
                out = _Maximum.apply(out, h)  # (P, D)
        return out
