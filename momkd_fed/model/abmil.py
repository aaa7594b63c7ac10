"""Gated-attention MIL baseline (Ilse et al., 2018): histology only, no graph, no memory."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import losses as L
from ..config import ModelConfig
from .momkd import check_bag
from .outputs import ModelOutput
from .precision import full_precision


class ABMIL(nn.Module):
    """h = dropout(ReLU(W x)); a = softmax(w^T (tanh(V h) * sigmoid(U h))); logits = Linear(sum_i a_i h_i).

    Parameters
    ----------
    model : ModelConfig
        ``abmil_hidden`` (hidden width) and ``dropout``.
    feature_dim : int
        D_in.

    ``neighbors`` and ``omics`` are accepted and ignored, so the engine drives it like MoMKD.
    """

    has_memory: bool = False

    def __init__(self, model: ModelConfig, feature_dim: int) -> None:
        super().__init__()
        hid = model.abmil_hidden
        self.embed = nn.Sequential(nn.Linear(feature_dim, hid), nn.ReLU(), nn.Dropout(model.dropout))
        self.attn_v = nn.Linear(hid, hid)
        self.attn_u = nn.Linear(hid, hid)
        self.attn_w = nn.Linear(hid, 1)
        self.classifier = nn.Linear(hid, 2)

    def forward(self, features: Tensor, neighbors: Tensor | None = None, omics: Tensor | None = None) -> ModelOutput:
        """(P, D_in) -> logits (2,) and attention (P,)."""
        if neighbors is None:
            neighbors = torch.arange(features.shape[0], device=features.device).unsqueeze(1)  # (P, 1)
        check_bag(features, neighbors)
        h = self.embed(features)  # (P, hid)
        gate = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))  # (P, hid)
        scores = self.attn_w(gate).squeeze(-1)  # (P,)
        with full_precision(h):
            attention = torch.softmax(scores.float(), dim=0)  # (P,)
            v = attention @ h.float()  # (hid,)
            logits = self.classifier(v)  # (2,)
        return ModelOutput(logits=logits, attention=attention)

    def loss(self, out: ModelOutput, label: int, omics: Tensor | None = None) -> L.LossBreakdown:
        """Cross-entropy only; the other terms are zeros (``total = ce``: the baseline has no loss weights)."""
        if label not in (0, 1):
            raise ValueError(f"label: expected 0 or 1, got {label!r}")
        ce = L.classification_loss(out.logits, label)
        zero = ce.new_zeros(())
        return L.LossBreakdown(total=ce, ce=ce, mem=zero, commit=zero, ortho=zero, align_omics=zero,
                               align_wsi=zero, recon=zero)

    @torch.no_grad()
    def after_step(self, out: ModelOutput, label: int) -> None:
        """Nothing to update (no memory)."""
