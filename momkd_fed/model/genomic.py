"""The genomic branch: an MLP encoder g -> z and its symmetric decoder z -> g (method.md)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class GenomicEncoder(nn.Module):
    """Linear(G -> hidden), LayerNorm, ReLU, Dropout, Linear(hidden -> E).

    Parameters
    ----------
    n_genes : int
        G.
    hidden, embed_dim : int
        Hidden width and E.
    dropout : float
        Dropout after the ReLU (0.25).
    """

    def __init__(self, n_genes: int, hidden: int = 512, embed_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = _mlp(n_genes, hidden, embed_dim, dropout)

    def forward(self, g: Tensor) -> Tensor:
        """(N, G) -> (N, E)."""
        return self.net(g)


class GenomicDecoder(nn.Module):
    """The encoder's mirror: Linear(E -> hidden), LayerNorm, ReLU, Dropout, Linear(hidden -> G)."""

    def __init__(self, n_genes: int, hidden: int = 512, embed_dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = _mlp(embed_dim, hidden, n_genes, dropout)

    def forward(self, z: Tensor) -> Tensor:
        """(N, E) -> (N, G)."""
        return self.net(z)
