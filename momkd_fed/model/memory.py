"""The class-conditional prototype memory C- / C+ and spherical k-means for its initialisation.

Slots are stored as one (2, K, S) tensor ``slots`` (row 0 = class 0 = C-, row 1 = class 1 = C+) and always used
L2-normalised. How they move is ``MemoryConfig.update``:

- ``gradient``: ``slots`` is an ``nn.Parameter`` trained by the optimiser through the alignment and
  orthogonality losses;
- ``ema``: ``slots`` is a buffer; after each step, each slot of the slide's class moves toward the mean of the
  embeddings assigned to it (nearest slot by cosine): ``c <- normalise(mu*c + (1-mu)*mean)``;
- ``frozen``: ``slots`` is a buffer that never moves (exclude it from the optimiser: it is not a parameter).

Since the last :meth:`ClassMemory.reset_aggregates` the memory accumulates, per class and slot, what a site
shares with the coordinator: ``agg_sums`` (2, K, S) sums of assigned embeddings, ``agg_counts`` (2, K) numbers
of assigned embeddings and ``agg_slides`` (2, K) numbers of slides that assigned anything to the slot. These
buffers are not persistent (not in ``state_dict``): they are per-round accounting, not model state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import MemoryConfig

N_CLASSES = 2
# N < k in spherical_kmeans: standard deviation of the Gaussian jitter added to the duplicated seeds
DUPLICATE_JITTER = 1e-2


def assign_sums(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Assign points to their nearest centroid by cosine; per-centroid sums and counts.

    This is one site's share of a federated spherical k-means step: the coordinator adds sums and counts over
    sites and sets ``centroid = normalise(sum)`` where ``count > 0``.

    Parameters
    ----------
    x : Tensor
        (N, S) points (normalised here).
    centroids : Tensor
        (k, S) centroids (normalised here).

    Returns
    -------
    sums : Tensor
        (k, S) float32 sums of the unit-norm points assigned to each centroid.
    counts : Tensor
        (k,) int64 number of points assigned to each centroid.
    """
    xn = F.normalize(x.float(), dim=-1)  # (N, S)
    cn = F.normalize(centroids.float(), dim=-1)  # (k, S)
    k = cn.shape[0]
    idx = (xn @ cn.T).argmax(dim=1)  # (N,)
    sums = torch.zeros(k, xn.shape[1], dtype=xn.dtype, device=xn.device).index_add_(0, idx, xn)  # (k, S)
    counts = torch.bincount(idx, minlength=k)  # (k,)
    return sums, counts


def _seed_centroids(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding on the sphere (distance 2 - 2 cos); N < k: every point, then jittered duplicates."""
    n = x.shape[0]
    if n < k:
        # documented rule: the N points seed the first N centroids; centroid i >= N is a copy of point i mod N
        # plus N(0, DUPLICATE_JITTER^2) noise, renormalised, so all k centroids are distinct
        idx = torch.arange(k) % n  # (k,)
        noise = torch.randn(k, x.shape[1], generator=gen) * DUPLICATE_JITTER  # (k, S)
        noise[:n] = 0.0
        return F.normalize(x[idx] + noise, dim=-1)  # (k, S)
    trials = 2 + int(math.log(k))  # greedy k-means++ (as scikit-learn): best of a few sampled candidates
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = x @ x[chosen[0]]  # (N,) cosine to the nearest chosen centroid
    for _ in range(1, k):
        dist = (2.0 - 2.0 * best).clamp_min(0.0)  # (N,)
        if float(dist.sum()) <= 0.0:
            cand = torch.randint(n, (trials,), generator=gen)  # (T,) all points coincide
        else:
            cand = torch.multinomial(dist, trials, replacement=True, generator=gen)  # (T,)
        new_best = torch.maximum(best.unsqueeze(0), x[cand] @ x.T)  # (T, N)
        pick = int((2.0 - 2.0 * new_best).clamp_min(0.0).sum(1).argmin())
        chosen.append(int(cand[pick]))
        best = new_best[pick]
    return x[torch.tensor(chosen)].clone()  # (k, S)


def spherical_kmeans(x: Tensor, k: int, iters: int = 20, seed: int = 0, init: Tensor | None = None) -> Tensor:
    """Spherical k-means (cosine similarity, unit-norm centroids), deterministic for a given seed.

    Seeding is k-means++ on the sphere with a ``torch.Generator`` seeded by ``seed`` (computation on CPU, so the
    result does not depend on the device). An empty cluster keeps its previous centroid. With N < k, the N
    points seed the first N centroids and the rest are jittered copies (see ``_seed_centroids``).

    Parameters
    ----------
    x : Tensor
        (N, S) points, N >= 1 (normalised here).
    k : int
        Number of centroids.
    iters : int
        Lloyd iterations.
    seed : int
        Seed of the seeding.
    init : Tensor, optional
        (k, S) starting centroids instead of k-means++ seeding.

    Returns
    -------
    Tensor
        (k, S) unit-norm centroids on ``x``'s device, float32.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"spherical_kmeans: need a non-empty (N, S) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"spherical_kmeans: k must be >= 1, got {k}")
    xn = F.normalize(x.detach().float().cpu(), dim=-1)  # (N, S)
    if init is not None:
        cent = F.normalize(init.detach().float().cpu(), dim=-1)  # (k, S)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        cent = _seed_centroids(xn, k, gen)  # (k, S)
    for _ in range(iters):
        sums, counts = assign_sums(xn, cent)  # (k, S), (k,)
        new = F.normalize(sums, dim=-1)  # (k, S)
        cent = torch.where((counts > 0).unsqueeze(1), new, cent)  # (k, S)
    return cent.to(x.device)


class ClassMemory(nn.Module):
    """Two slot tables (one per class) of K unit vectors in S dims, with EMA update and usage accounting.

    Parameters
    ----------
    cfg : MemoryConfig
        Slots per class, update mode, momentum, EMA source, k-means settings.
    dim : int
        S.
    """

    def __init__(self, cfg: MemoryConfig, dim: int) -> None:
        super().__init__()
        if cfg.slots < 1:
            raise ValueError(f"memory.slots: must be >= 1, got {cfg.slots}")
        self.cfg = cfg
        init = F.normalize(torch.randn(N_CLASSES, cfg.slots, dim), dim=-1)  # (2, K, S)
        if cfg.update == "gradient":
            self.slots = nn.Parameter(init)
        else:
            self.register_buffer("slots", init)
        self.register_buffer("agg_sums", torch.zeros(N_CLASSES, cfg.slots, dim), persistent=False)
        self.register_buffer("agg_counts", torch.zeros(N_CLASSES, cfg.slots), persistent=False)
        self.register_buffer("agg_slides", torch.zeros(N_CLASSES, cfg.slots), persistent=False)

    @property
    def num_slots(self) -> int:
        return int(self.slots.shape[1])

    @property
    def trainable(self) -> bool:
        """True when the optimiser moves the slots (``gradient`` mode)."""
        return isinstance(self.slots, nn.Parameter)

    def normalized(self) -> Tensor:
        """(2, K, S) float32 unit-norm slots (differentiable in gradient mode)."""
        return F.normalize(self.slots.float(), dim=-1)

    def scores(self, emb: Tensor) -> Tensor:
        """Max cosine of each embedding to each class's slots, memory DETACHED.

        Parameters
        ----------
        emb : Tensor
            (N, S) unit-norm embeddings.

        Returns
        -------
        Tensor
            (2, N): row c is max_j <emb, c_j> over the slots of class c.
        """
        c = self.normalized().detach()  # (2, K, S)
        return torch.einsum("ns,cks->cnk", emb.float(), c).amax(dim=-1)  # (2, N)

    @torch.no_grad()
    def set_slots(self, slots: Tensor) -> None:
        """Overwrite all slots (normalised) with a (2, K, S) tensor, e.g. the coordinator's global memory."""
        if tuple(slots.shape) != tuple(self.slots.shape):
            raise ValueError(f"memory.set_slots: expected shape {tuple(self.slots.shape)}, got {tuple(slots.shape)}")
        self.slots.copy_(F.normalize(slots.float(), dim=-1))

    @torch.no_grad()
    def reset_aggregates(self) -> None:
        """Zero ``agg_sums``, ``agg_counts`` and ``agg_slides`` (call at the start of a round)."""
        self.agg_sums.zero_()
        self.agg_counts.zero_()
        self.agg_slides.zero_()

    def aggregates(self) -> dict[str, Tensor]:
        """Copies of the per-slot aggregates: ``sums`` (2, K, S), ``counts`` (2, K), ``slides`` (2, K)."""
        return {"sums": self.agg_sums.clone(), "counts": self.agg_counts.clone(), "slides": self.agg_slides.clone()}

    def assigned(self, patch_emb: Tensor | None, omics_emb: Tensor | None) -> Tensor | None:
        """The embeddings :meth:`update` assigns to slots after a step: EMA source in ema mode, patches otherwise.

        Parameters
        ----------
        patch_emb : Tensor or None
            (P, S) patch projections.
        omics_emb : Tensor or None
            (S,) F_omics, None for a histology-only slide.

        Returns
        -------
        Tensor or None
            (N, S) detached float32 embeddings (N = P, 1 or P + 1 by ``ema_source``), None when nothing is
            assigned (e.g. ``ema_source: omics`` at a histology-only slide).
        """
        parts: list[Tensor] = []
        source = self.cfg.ema_source if self.cfg.update == "ema" else "patches"
        if source in ("omics", "both") and omics_emb is not None:
            parts.append(omics_emb.reshape(-1, omics_emb.shape[-1]))
        if source in ("patches", "both") and patch_emb is not None:
            parts.append(patch_emb.reshape(-1, patch_emb.shape[-1]))
        if not parts:
            return None
        return torch.cat([p.detach().float() for p in parts], dim=0)  # (N, S)

    @torch.no_grad()
    def update(self, label: int, patch_emb: Tensor | None, omics_emb: Tensor | None = None) -> None:
        """After an optimiser step: accumulate aggregates for class ``label`` and, in ema mode, move its slots.

        In ema mode the assigned embeddings follow ``MemoryConfig.ema_source`` (F_omics is used only when the
        slide is paired); in gradient and frozen modes the patch projections are assigned (usage counts).

        Parameters
        ----------
        label : int
            The slide's class y (only C_y is touched).
        patch_emb : Tensor or None
            (P, S) unit-norm patch projections.
        omics_emb : Tensor or None
            (S,) unit-norm F_omics, None for a histology-only slide.
        """
        x = self.assigned(patch_emb, omics_emb)  # (N, S)
        if x is None:
            return
        x = x.to(self.slots.device)
        c = self.normalized()[label]  # (K, S)
        sums, counts = assign_sums(x, c)  # (K, S), (K,)
        used = counts > 0  # (K,)
        self.agg_sums[label] += sums
        self.agg_counts[label] += counts.to(self.agg_counts.dtype)
        self.agg_slides[label] += used.to(self.agg_slides.dtype)
        if self.cfg.update == "ema":
            mu = self.cfg.momentum
            mean = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)  # (K, S)
            moved = F.normalize(mu * c + (1.0 - mu) * mean, dim=-1)  # (K, S)
            self.slots[label] = torch.where(used.unsqueeze(1), moved, c).to(self.slots.dtype)

    @torch.no_grad()
    def init_from_kmeans(self, proj_by_class: dict[int, Tensor], seed: int) -> None:
        """Set each class's slots by spherical k-means on (up to ``kmeans_max_points``) embeddings of that class.

        Parameters
        ----------
        proj_by_class : dict[int, Tensor]
            {0: (N0, S), 1: (N1, S)} patch projections of the initial network, per class.
        seed : int
            Seed of the subsampling and the k-means seeding (class c uses seed + c).
        """
        for cls in range(N_CLASSES):
            x = proj_by_class.get(cls)
            if x is None or x.ndim != 2 or x.shape[0] == 0:
                raise ValueError(f"memory init: no patch projections for class {cls}; k-means initialisation "
                                 "needs training slides of both classes")
            gen = torch.Generator().manual_seed(int(seed) + cls)
            if x.shape[0] > self.cfg.kmeans_max_points:
                pick = torch.randperm(x.shape[0], generator=gen)[: self.cfg.kmeans_max_points]  # (M,)
                x = x[pick.to(x.device)]
            cent = spherical_kmeans(x, self.num_slots, self.cfg.kmeans_iters, int(seed) + cls)  # (K, S)
            self.slots[cls] = cent.to(self.slots.device, self.slots.dtype)
        self.reset_aggregates()
