"""MoMKD: histology and genomic branches bridged only by a class-conditional memory (method.md).

Reading order: forward (encoder -> patch projections -> memory-guided attention pooling -> classifier and slide
projection; genomic branch when omics are given), then loss (the terms of momkd_fed.losses), then after_step
(EMA memory update and usage accounting).

Precision: the histology encoder runs in the ambient precision (bf16 under autocast); everything after it --
projections, memory scores, softmax, pooling, classifier, genomic branch and losses -- runs in float32 with
autocast disabled (cheap, and exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import losses as L
from ..config import LossConfig, MemoryConfig, ModelConfig
from .gatv2 import HistologyEncoder
from .genomic import GenomicDecoder, GenomicEncoder
from .memory import ClassMemory
from .outputs import ModelOutput
from .precision import full_precision


def check_bag(features: Tensor, neighbors: Tensor) -> None:
    """Raise ValueError unless ``features`` is (P, D), P >= 1, and ``neighbors`` a valid (P, k+1) index."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features: expected a (P, D) tensor with P >= 1, got shape {tuple(features.shape)}")
    p = features.shape[0]
    if neighbors.ndim != 2 or neighbors.shape[0] != p or neighbors.shape[1] < 1:
        raise ValueError(f"neighbors: expected shape ({p}, k+1), got {tuple(neighbors.shape)}")
    if neighbors.dtype != torch.long:
        raise ValueError(f"neighbors: expected int64 indices, got {neighbors.dtype}")
    if int(neighbors.min()) < 0 or int(neighbors.max()) >= p:
        raise ValueError(f"neighbors: indices must lie in [0, {p - 1}]")


class MoMKD(nn.Module):
    """The MoMKD model.

    Parameters
    ----------
    model, memory, loss : ModelConfig, MemoryConfig, LossConfig
        Architecture, memory and loss settings.
    feature_dim : int
        D_in of the patch features.
    n_genes : int
        G; 0 builds no genomic branch (a histology-only site).

    Attributes (state-dict prefixes used by the sharing policy)
    ----------
    histology_encoder, patch_proj (D -> S), slide_proj (D -> S), omics_encoder, omics_proj (E -> S),
    omics_decoder, classifier, log_tau (theta), memory (ClassMemory).
    """

    has_memory: bool = True

    def __init__(self, model: ModelConfig, memory: MemoryConfig, loss: LossConfig, feature_dim: int,
                 n_genes: int) -> None:
        super().__init__()
        if n_genes < 0:
            raise ValueError(f"n_genes: must be >= 0, got {n_genes}")
        self.model_cfg, self.memory_cfg, self.loss_cfg = model, memory, loss
        self.feature_dim, self.n_genes = feature_dim, n_genes
        d, s = model.hidden_dim, model.shared_dim
        self.histology_encoder = HistologyEncoder(feature_dim, d, model.heads, model.attn_dropout, model.dropout,
                                                  model.gat_layers)
        self.patch_proj = nn.Linear(d, s)
        self.slide_proj = nn.Linear(d, s)
        self.omics_encoder: GenomicEncoder | None = None
        self.omics_proj: nn.Linear | None = None
        self.omics_decoder: GenomicDecoder | None = None
        if n_genes > 0:
            e = model.omics_embed_dim
            self.omics_encoder = GenomicEncoder(n_genes, model.omics_hidden, e, model.omics_dropout)
            self.omics_proj = nn.Linear(e, s)
            self.omics_decoder = GenomicDecoder(n_genes, model.omics_hidden, e, model.omics_dropout)
        self.classifier = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, model.cls_hidden),
            nn.ReLU(),
            nn.Dropout(model.dropout),
            nn.Linear(model.cls_hidden, 2),
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(model.tau_init)))
        self.memory = ClassMemory(memory, s)

    # ----------------------------------------------------------------------------------------------------------
    def tau(self) -> Tensor:
        """() attention temperature exp(theta) clamped to [tau_min, tau_max]."""
        return self.log_tau.float().exp().clamp(self.model_cfg.tau_min, self.model_cfg.tau_max)

    def _project_patches(self, h: Tensor) -> Tensor:
        return F.normalize(self.patch_proj(h), dim=-1)  # (P, S)

    def forward(self, features: Tensor, neighbors: Tensor, omics: Tensor | None = None) -> ModelOutput:
        """One slide.

        Parameters
        ----------
        features : Tensor
            (P, D_in) patch features.
        neighbors : Tensor
            (P, k+1) int64 kNN index, column 0 = self.
        omics : Tensor, optional
            (G,) normalised genomic vector of a paired slide; None for histology-only.
        """
        check_bag(features, neighbors)
        h = self.histology_encoder(features, neighbors)  # (P, D)
        with full_precision(h):
            h = h.float()  # (P, D)
            p = self._project_patches(h)  # (P, S)
            sc = self.memory.scores(p)  # (2, P)  memory detached
            attention = torch.softmax((sc[1] - sc[0]) / self.tau(), dim=0)  # (P,)
            v = attention @ h  # (D,)
            logits = self.classifier(v.unsqueeze(0)).squeeze(0)  # (2,)
            f_wsi = F.normalize(self.slide_proj(v), dim=-1)  # (S,)
            score = L.memory_delta(f_wsi, self.memory.normalized(), self.loss_cfg.align_t)  # ()
            out = ModelOutput(logits=logits, attention=attention, patch_emb=p, slide_emb=f_wsi, memory_score=score)
            if omics is not None:
                self._encode_omics(omics, out)
        return out

    def _encode_omics(self, omics: Tensor, out: ModelOutput) -> None:
        if self.omics_encoder is None or self.omics_proj is None or self.omics_decoder is None:
            raise ValueError("omics: this model has no genomic branch (built with n_genes=0) but omics were given")
        if omics.ndim != 1 or omics.shape[0] != self.n_genes:
            raise ValueError(f"omics: expected shape ({self.n_genes},), got {tuple(omics.shape)}")
        z = self.omics_encoder(omics.float().unsqueeze(0))  # (1, E)
        out.omics_z = z.squeeze(0)  # (E,)
        out.omics_emb = F.normalize(self.omics_proj(z), dim=-1).squeeze(0)  # (S,)
        out.omics_recon = self.omics_decoder(z).squeeze(0)  # (G,)

    # ----------------------------------------------------------------------------------------------------------
    def loss(self, out: ModelOutput, label: int, omics: Tensor | None = None) -> L.LossBreakdown:
        """The MoMKD loss of one slide (method.md, "Losses"); genomic terms are zero for histology-only slides.

        Parameters
        ----------
        out : ModelOutput
            This slide's forward output.
        label : int
            0 or 1.
        omics : Tensor, optional
            (G,) the genomic vector given to forward (the reconstruction target); required iff out has omics.
        """
        if label not in (0, 1):
            raise ValueError(f"label: expected 0 or 1, got {label!r}")
        lc = self.loss_cfg
        with full_precision(out.logits):
            mem = self.memory.normalized()  # (2, K, S)  live: gradients reach the slots
            zero = out.logits.new_zeros(())
            ce = L.classification_loss(out.logits, label)
            mem_loss, commit, ortho = L.memory_loss(out.patch_emb, self.memory.slots[label], lc.commit_slot,
                                                    lc.ortho_weight)  # raw slots of class y
            align_wsi = L.alignment_loss(out.slide_emb, mem, label, lc.align_t, lc.align_beta, lc.align_margin)
            align_omics, recon = zero, zero
            if out.omics_emb is not None:
                if omics is None or out.omics_recon is None:
                    raise ValueError("loss: the output carries a genomic embedding but no omics target was given")
                align_omics = L.alignment_loss(out.omics_emb, mem, label, lc.align_t, lc.align_beta,
                                               lc.align_margin)
                recon = L.reconstruction_loss(out.omics_recon, omics.to(out.omics_recon.device))
            total = (lc.w_ce * ce + lc.w_mem * mem_loss + lc.w_align_omics * align_omics
                     + lc.w_align_wsi * align_wsi + lc.w_recon * recon)
        return L.LossBreakdown(total=total, ce=ce, mem=mem_loss, commit=commit, ortho=ortho,
                               align_omics=align_omics, align_wsi=align_wsi, recon=recon)

    @torch.no_grad()
    def after_step(self, out: ModelOutput, label: int) -> None:
        """After the optimiser step: EMA memory update (ema mode) and per-slot usage/aggregate accounting."""
        self.memory.update(label, out.patch_emb, out.omics_emb)

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def patch_projections(self, features: Tensor, neighbors: Tensor) -> Tensor:
        """(P, S) float32 unit-norm patch projections in eval mode (for the memory's k-means initialisation)."""
        check_bag(features, neighbors)
        was_training = self.training
        self.eval()
        try:
            h = self.histology_encoder(features, neighbors)  # (P, D)
            with full_precision(h):
                return self._project_patches(h.float())  # (P, S)
        finally:
            self.train(was_training)

    def init_memory(self, proj_by_class: dict[int, Tensor], seed: int) -> None:
        """Spherical k-means per class on patch projections ({0: (N0, S), 1: (N1, S)}); resets aggregates."""
        self.memory.init_from_kmeans(proj_by_class, seed)
