"""Models: MoMKD (histology GATv2 encoder, genomic branch, class memory) and the ABMIL baseline."""

from __future__ import annotations

import torch.nn as nn

from ..config import Config, ConfigError
from ..losses import LossBreakdown
from .abmil import ABMIL
from .memory import ClassMemory, assign_sums, spherical_kmeans
from .momkd import MoMKD
from .outputs import ModelOutput

__all__ = ["ABMIL", "ClassMemory", "LossBreakdown", "ModelOutput", "MoMKD", "assign_sums", "build_model",
           "spherical_kmeans"]


def build_model(cfg: Config, feature_dim: int, n_genes: int) -> nn.Module:
    """The model named by ``cfg.model.name`` ("momkd" or "abmil"); ABMIL ignores ``n_genes``."""
    name = cfg.model.name
    if name == "momkd":
        return MoMKD(cfg.model, cfg.memory, cfg.loss, feature_dim, n_genes)
    if name == "abmil":
        return ABMIL(cfg.model, feature_dim)
    raise ConfigError(f"model.name: {name!r} is not allowed; allowed values: 'momkd', 'abmil'")
