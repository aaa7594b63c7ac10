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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .precision import compute_dtype, full_precision

# per-edge elements (rows * (k+1) * H * C) processed at once; bounds the temporary memory of the attention.
# CPU: speed is flat below ~4M elements (measured), so keep temporaries small; CUDA: larger, fewer launches.
EDGE_CHUNK_ELEMENTS = 1 << 20
EDGE_CHUNK_ELEMENTS_CUDA = 1 << 23


def _chunk_rows(device: torch.device, n_nbrs: int, width: int) -> int:
    budget = EDGE_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else EDGE_CHUNK_ELEMENTS
    return max(1, budget // max(1, n_nbrs * width))


class _GATv2Attention(torch.autograd.Function):
    """Fused GATv2 edge scoring, neighbour softmax, attention dropout and aggregation (see module docstring)."""

    @staticmethod
    def forward(ctx, xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, keep: Tensor | None,
                slope: float) -> Tensor:
        with full_precision(xl):
            out, alpha = _GATv2Attention._forward(xl, xr, att, neighbors, keep, slope)  # (P,H,C), (P,k+1,H)
        ctx.save_for_backward(xl, xr, att, neighbors, alpha, keep)
        ctx.slope = slope
        return out.to(xl.dtype)

    @staticmethod
    def _forward(xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, keep: Tensor | None,
                 slope: float) -> tuple[Tensor, Tensor]:
        p, h, c = xl.shape
        k1 = neighbors.shape[1]
        dt = compute_dtype(xl)
        att_c = att.to(dt)  # (H, C)
        out = torch.empty(p, h, c, dtype=dt, device=xl.device)  # (P, H, C)
        alpha = torch.empty(p, k1, h, dtype=dt, device=xl.device)  # (P, k+1, H)
        step = _chunk_rows(xl.device, k1, h * c)
        for s in range(0, p, step):
            e = min(p, s + step)
            nb = neighbors[s:e]  # (n, k+1)
            g = xl[nb].to(dt)  # (n, k+1, H, C)  W_l x_j (a fresh tensor: indexing copies)
            z = g + xr[s:e].to(dt).unsqueeze(1)  # (n, k+1, H, C)
            F.leaky_relu_(z, slope)
            logits = z.mul_(att_c).sum(-1)  # (n, k+1, H)
            del z
            a = torch.softmax(logits, dim=1)  # (n, k+1, H)
            alpha[s:e] = a
            ad = a if keep is None else a * keep[s:e]  # (n, k+1, H)
            out[s:e] = g.mul_(ad.unsqueeze(-1)).sum(1)  # (n, H, C)
        return out, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        xl, xr, att, neighbors, alpha, keep = ctx.saved_tensors
        with full_precision(xl):
            grads = _GATv2Attention._backward(grad_out, xl, xr, att, neighbors, alpha, keep, ctx.slope)
        return (*grads, None, None, None)

    @staticmethod
    def _backward(grad_out: Tensor, xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, alpha: Tensor,
                  keep: Tensor | None, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        p, h, c = xl.shape
        k1 = neighbors.shape[1]
        dt = alpha.dtype
        att_c = att.to(dt)  # (H, C)
        grad_xl = torch.zeros(p, h, c, dtype=dt, device=xl.device)  # (P, H, C)
        grad_xr = torch.empty(p, h, c, dtype=dt, device=xl.device)  # (P, H, C)
        grad_att = torch.zeros(h, c, dtype=dt, device=xl.device)  # (H, C)
        step = _chunk_rows(xl.device, k1, h * c)
        for s in range(0, p, step):
            e = min(p, s + step)
            nb = neighbors[s:e]  # (n, k+1)
            go = grad_out[s:e].to(dt)  # (n, H, C)
            g = xl[nb].to(dt)  # (n, k+1, H, C)
            a = alpha[s:e]  # (n, k+1, H)
            ad = a if keep is None else a * keep[s:e]  # (n, k+1, H)
            # d out_i / d alpha_ij = <go_i, W_l x_j>, through the dropout mask, then the softmax Jacobian
            ga = torch.einsum("nkhc,nhc->nkh", g, go)  # (n, k+1, H)
            if keep is not None:
                ga = ga * keep[s:e]
            ge = a * (ga - (ga * a).sum(1, keepdim=True))  # (n, k+1, H)  d loss / d e_ij
            z = g.add_(xr[s:e].to(dt).unsqueeze(1))  # (n, k+1, H, C)  pre-activation (reuses g)
            pos = z > 0  # (n, k+1, H, C)
            F.leaky_relu_(z, slope)
            grad_att += torch.einsum("nkh,nkhc->hc", ge, z)
            d = torch.where(pos, 1.0, slope).to(dt)  # (n, k+1, H, C)  LeakyReLU'
            del z, pos
            d.mul_(att_c).mul_(ge.unsqueeze(-1))  # (n, k+1, H, C)  d loss / d (W_l x_j + W_r x_i)
            grad_xr[s:e] = d.sum(1)
            d.addcmul_(ad.unsqueeze(-1), go.unsqueeze(1))  # + aggregation path into W_l x_j
            grad_xl.index_add_(0, nb.reshape(-1), d.reshape(-1, h, c))
        return grad_xl.to(xl.dtype), grad_xr.to(xr.dtype), grad_att.to(att.dtype)


def gatv2_attention(xl: Tensor, xr: Tensor, att: Tensor, neighbors: Tensor, slope: float = 0.2,
                    dropout: float = 0.0, training: bool = False, keep: Tensor | None = None) -> Tensor:
    """GATv2 attention and aggregation over a dense neighbour index (no bias).

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

    Returns
    -------
    Tensor
        (P, H, C) sum_j alpha_ij W_l x_j.
    """
    if keep is None and training and dropout > 0.0:
        shape = (xl.shape[0], neighbors.shape[1], xl.shape[1])
        keep = torch.empty(shape, dtype=compute_dtype(xl), device=xl.device).bernoulli_(1.0 - dropout)
        keep.div_(1.0 - dropout)  # (P, k+1, H)
    return _GATv2Attention.apply(xl, xr, att, neighbors, keep, slope)


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
        out = gatv2_attention(xl, xr, self.att, neighbors, self.slope, self.attn_dropout, self.training)
        return out.reshape(p, -1) + self.bias  # (P, H*C)


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
        h = x
        out: Tensor | None = None
        for i, (gat, norm) in enumerate(zip(self.gats, self.norms)):
            res = self.res_proj(h) if i == 0 else h  # (P, D)
            h = self.dropout(F.elu(norm(gat(h, neighbors)))) + res  # (P, D)
            out = h if out is None else torch.maximum(out, h)  # (P, D) jumping knowledge: max
        return out
