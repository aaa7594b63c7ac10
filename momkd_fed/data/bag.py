"""In-memory form of one slide and of one site's data: the contract between the data layer and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPLITS = ("train", "val", "test")


@dataclass
class Bag:
    """One slide, ready for the model.

    Attributes
    ----------
    slide_id, case_id : str
        Slide (= feature file stem) and patient.
    label : int
        Class 0/1 (slides without a usable label never become a Bag).
    features : torch.Tensor
        (P, D) float32 patch features.
    coords : torch.Tensor
        (P, 2) int64 top-left level-0 pixel coordinates, row-aligned with ``features``.
    neighbors : torch.Tensor
        (P, k_eff + 1) int64 kNN neighbour index; column 0 is the patch itself; k_eff = min(k, P - 1).
    omics : torch.Tensor or None
        (G,) float32 genomic vector of the case (as read; normalised by the engine's statistics), or None for a
        histology-only slide.
    patch_size_level0 : int
        Patch side in level-0 pixels (for heat maps); 0 when unknown.
    split : str
        "train", "val" or "test".
    """

    slide_id: str
    case_id: str
    label: int
    features: torch.Tensor
    coords: torch.Tensor
    neighbors: torch.Tensor
    omics: torch.Tensor | None = None
    patch_size_level0: int = 0
    split: str = "train"

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])


@dataclass
class SiteData:
    """All usable slides of one site plus what was excluded and why."""

    name: str
    bags: list[Bag]
    genes: list[str] = field(default_factory=list)  # gene panel of the omics vectors ([] = no genomics)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (slide_id or case_id, reason)

    def split(self, name: str) -> list[Bag]:
        """Bags of split ``name`` ("train", "val", "test")."""
        return [b for b in self.bags if b.split == name]

    @property
    def has_omics(self) -> bool:
        return any(b.omics is not None for b in self.bags)
