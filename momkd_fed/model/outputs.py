"""What a model's forward pass returns: one named record shared by MoMKD and the ABMIL baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """Outputs of one slide's forward pass.

    Attributes
    ----------
    logits : Tensor
        (2,) float32 class logits.
    attention : Tensor
        (P,) float32 attention over patches, sums to 1, row-aligned with the bag's features and coordinates.
    patch_emb : Tensor or None
        (P, S) unit-norm patch projections p_i (MoMKD only).
    slide_emb : Tensor or None
        (S,) unit-norm slide projection F_wsi (MoMKD only).
    omics_emb : Tensor or None
        (S,) unit-norm genomic projection F_omics (paired slides only).
    omics_z : Tensor or None
        (E,) genomic embedding z (paired slides only).
    omics_recon : Tensor or None
        (G,) reconstruction of the genomic vector from z (paired slides only).
    memory_score : Tensor or None
        () head-free memory score delta(F_wsi) = phi(F_wsi, C+) - phi(F_wsi, C-) (MoMKD only).
    """

    logits: Tensor
    attention: Tensor
    patch_emb: Tensor | None = None
    slide_emb: Tensor | None = None
    omics_emb: Tensor | None = None
    omics_z: Tensor | None = None
    omics_recon: Tensor | None = None
    memory_score: Tensor | None = None
