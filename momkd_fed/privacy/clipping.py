"""Per-slide clipping of the memory aggregates a site releases, and L2 clipping of a shared-weight update.

The memory release (ema mode) is, per class c and slot k, a sum ``sums[c, k]`` (S,) and a count ``counts[c, k]``.
Without clipping one slide with many patches moves both by as much as its number of patches. Here each slide's
contribution is bounded first.

Definition (one slide i of class y, over the whole round — every visit of the slide in every local epoch):

- ``a_i`` (2, K, S): ``a_i[y, k] = sum of the slide's assigned unit embeddings whose nearest slot of C_y is k``
  (zero for the other class);
- ``b_i`` (2, K): ``b_i[y, k] = number of those embeddings`` (zero for the other class);
- ``x_i = concat(a_i, b_i)``, a vector of 2KS + 2K numbers, and its clip factor
  ``s_i = min(1, C / ||x_i||_2)`` with ``C = privacy.clip_norm``;
- the slide adds ``s_i * a_i`` to the sums and ``s_i * b_i`` to the counts.

Hence: **adding or removing one slide changes the concatenated (sums, counts) by at most C in L2** (in particular
the sums by at most C and the counts by at most C), whatever the slide's size — the sensitivity the Gaussian
mechanism of :mod:`.mechanism` is calibrated to. Because sums and counts are scaled by the same factor, the
server's ``sum(sums) / sum(counts)`` stays a weighted mean of unit vectors (norm <= 1): a clipped slide weighs
less, it does not bias the direction. Counts become "clipped embedding mass" (not integers); a big slide adds
mass of at most ``C`` per slot and at most ``C * sqrt(K)`` over its K slots. ``||a_i[y, k]|| <= b_i[y, k]``
(triangle inequality), so ``||b_i|| <= ||x_i|| <= sqrt(2) ||b_i||``.

A slide visited several times in one round (``local_epochs > 1``) must be identified by ``slide_id`` so that its
visits are summed *before* clipping; otherwise every visit counts as a separate slide and the bound above holds
per visit only (the sensitivity would be ``local_epochs * C``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..federation.memory_merge import MemoryAggregate

N_CLASSES = 2


def assign_slots(embeddings: torch.Tensor, slots_y: torch.Tensor) -> torch.Tensor:
    """Nearest slot by cosine, the rule of ``ClassMemory.update`` (``assign_sums``).

    Parameters
    ----------
    embeddings : Tensor
        (n, S) embeddings.
    slots_y : Tensor
        (K, S) the slots of the slide's class.

    Returns
    -------
    Tensor
        (n,) int64 slot index per embedding.
    """
    xn = F.normalize(embeddings.detach().float(), dim=-1)  # (n, S)
    cn = F.normalize(slots_y.detach().float().to(xn.device), dim=-1)  # (K, S)
    return (xn @ cn.T).argmax(dim=1)  # (n,)


@dataclass
class SlideContribution:
    """One slide's clipped contribution.

    Attributes
    ----------
    sums : Tensor
        (2, K, S) ``s * a``.
    counts : Tensor
        (2, K) ``s * b``.
    scale : float
        The clip factor s in (0, 1] (1 = not clipped).
    raw_norm : float
        ``||concat(a, b)||`` before clipping.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    scale: float
    raw_norm: float


@dataclass
class ClipStats:
    """What clipping did over a round (for the audit log)."""

    slides: int  # slides accumulated
    clipped: int  # slides whose contribution was scaled down (s < 1)
    mean_scale: float  # mean clip factor over slides (NaN without slides)

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.slides if self.slides else math.nan

    def as_dict(self) -> dict[str, float]:
        return {"slides": self.slides, "clipped": self.clipped, "clip_fraction": self.clip_fraction,
                "mean_scale": self.mean_scale}


class SlotAccumulator:
    """Per-slide clipped memory aggregates of one round (module docstring has the exact definition).

    Parameters
    ----------
    num_slots : int
        K.
    dim : int
        S.
    clip_norm : float
        C > 0; ``math.inf`` keeps the raw aggregates (no clipping; counts stay integral).

    Notes
    -----
    The raw per-slide aggregates are kept until :meth:`aggregate` (K*S + K floats per slide, ~4 KB at K=16,
    S=64), because a slide's visits must be summed before it is clipped.
    """

    def __init__(self, num_slots: int, dim: int, clip_norm: float) -> None:
        if num_slots < 1 or dim < 1:
            raise ValueError(f"SlotAccumulator: need num_slots >= 1 and dim >= 1, got {num_slots}, {dim}")
        if not clip_norm > 0.0:
            raise ValueError(f"SlotAccumulator: privacy.clip_norm must be > 0, got {clip_norm}")
        self.num_slots = int(num_slots)
        self.dim = int(dim)
        self.clip_norm = float(clip_norm)
        self._slides: dict[Hashable, tuple[int, torch.Tensor, torch.Tensor]] = {}  # id -> (y, (K,S), (K,))
        self._anon = 0

    def __len__(self) -> int:
        return len(self._slides)

    def reset(self) -> None:
        """Forget every slide (call at the start of a round)."""
        self._slides.clear()
        self._anon = 0

    def add_slide(self, slot_ids: torch.Tensor, y: int, embeddings: torch.Tensor,
                  slide_id: Hashable | None = None) -> SlideContribution:
        """Add one visit of a slide: its assigned embeddings and their slots.

        Parameters
        ----------
        slot_ids : Tensor
            (n,) int slot of C_y assigned to each embedding (:func:`assign_slots`).
        y : int
            The slide's class (0 or 1).
        embeddings : Tensor
            (n, S) the assigned embeddings (normalised here to unit length, as the memory uses them).
        slide_id : hashable, optional
            Identifies the slide across visits (pass the slide id when ``local_epochs > 1``); None = a new slide.

        Returns
        -------
        SlideContribution
            The slide's clipped contribution so far (all its visits).

        Raises
        ------
        ValueError
            On bad shapes, a slot index out of range, a class other than 0/1, non-finite embeddings, or a
            ``slide_id`` seen before with another class.
        """
        if y not in (0, 1):
            raise ValueError(f"SlotAccumulator.add_slide: class y must be 0 or 1, got {y!r}")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or slot_ids.shape != (embeddings.shape[0],):
            raise ValueError(f"SlotAccumulator.add_slide: need slot_ids (n,) and embeddings (n, {self.dim}), got "
                             f"{tuple(slot_ids.shape)} and {tuple(embeddings.shape)}")
        x = F.normalize(embeddings.detach().float().cpu(), dim=-1)  # (n, S)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("SlotAccumulator.add_slide: non-finite embeddings")
        idx = slot_ids.detach().long().cpu()  # (n,)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_slots):
            raise ValueError(f"SlotAccumulator.add_slide: slot ids must be in [0, {self.num_slots}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        sums = torch.zeros(self.num_slots, self.dim).index_add_(0, idx, x)  # (K, S)
        counts = torch.bincount(idx, minlength=self.num_slots).float()  # (K,)
        if slide_id is None:
            slide_id = ("__anonymous__", self._anon)
            self._anon += 1
        if slide_id in self._slides:
            y0, s0, c0 = self._slides[slide_id]
            if y0 != y:
                raise ValueError(f"SlotAccumulator.add_slide: slide {slide_id!r} was added with class {y0}, now {y}")
            sums, counts = s0 + sums, c0 + counts
        self._slides[slide_id] = (int(y), sums, counts)
        return self._contribution(int(y), sums, counts)

    def _contribution(self, y: int, sums: torch.Tensor, counts: torch.Tensor) -> SlideContribution:
        raw = math.sqrt(float(sums.pow(2).sum()) + float(counts.pow(2).sum()))  # ||concat(a, b)||
        scale = 1.0 if raw <= self.clip_norm else self.clip_norm / raw
        out_s = torch.zeros(N_CLASSES, self.num_slots, self.dim)  # (2, K, S)
        out_c = torch.zeros(N_CLASSES, self.num_slots)  # (2, K)
        out_s[y] = sums * scale
        out_c[y] = counts * scale
        return SlideContribution(out_s, out_c, scale, raw)

    def contributions(self) -> dict[Hashable, SlideContribution]:
        """Every slide's clipped contribution, by slide id."""
        return {sid: self._contribution(y, s, c) for sid, (y, s, c) in self._slides.items()}

    def aggregate(self) -> tuple[MemoryAggregate, ClipStats]:
        """Sum of the clipped contributions.

        Returns
        -------
        MemoryAggregate
            ``sums`` (2, K, S), ``counts`` (2, K) clipped as defined above, ``slides`` (2, K) = number of slides
            that assigned at least one embedding to the slot (exact; never released under DP, see
            :mod:`.mechanism`).
        ClipStats
        """
        sums = torch.zeros(N_CLASSES, self.num_slots, self.dim)  # (2, K, S)
        counts = torch.zeros(N_CLASSES, self.num_slots)  # (2, K)
        slides = torch.zeros(N_CLASSES, self.num_slots)  # (2, K)
        scales = []
        for y, s, c in self._slides.values():
            contrib = self._contribution(y, s, c)
            sums += contrib.sums
            counts += contrib.counts
            slides[y] += (c > 0).float()
            scales.append(contrib.scale)
        stats = ClipStats(slides=len(scales), clipped=sum(1 for s in scales if s < 1.0),
                          mean_scale=sum(scales) / len(scales) if scales else math.nan)
        return MemoryAggregate(sums=sums, counts=counts, slides=slides), stats


# ---- shared-weight updates ---------------------------------------------------------------------------------------
def update_delta(site: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """``site - global`` (float32) for the floating keys the site sent (non-floating keys are left out)."""
    out = {}
    for k, v in site.items():
        if k not in global_weights:
            raise KeyError(f"update_delta: {k!r} is not a global shared key")
        if torch.is_floating_point(v):
            out[k] = v.detach().float().cpu() - global_weights[k].detach().float().cpu()  # (*shape)
    return out


def tensor_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a dict of tensors taken as one concatenated vector (float64 accumulation)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors.values()))


def clip_update(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale a whole update (every key together) to L2 norm at most ``bound``.

    Parameters
    ----------
    delta : mapping str -> Tensor
        An update (e.g. :func:`update_delta`); floating tensors.
    bound : float
        C_w > 0 (``math.inf`` = no clipping).

    Returns
    -------
    clipped : dict[str, Tensor]
        ``delta * min(1, bound / ||delta||)``, float32 copies.
    norm : float
        ``||delta||`` before clipping.
    """
    if not bound > 0.0:
        raise ValueError(f"clip_update: bound must be > 0, got {bound}")
    norm = tensor_norm(delta)
    scale = 1.0 if norm <= bound else bound / norm
    return {k: v.detach().float().cpu() * scale for k, v in delta.items()}, norm


def clip_shared_weights(shared: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor],
                        bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """Site side: the shared weights to send, with the update ``shared - global`` clipped to L2 norm ``bound``.

    Floating keys become ``global + clip(shared - global)`` (cast back to each key's dtype); other keys are sent
    unchanged. Returns the weights and the update norm before clipping.
    """
    clipped, norm = clip_update(update_delta(shared, global_weights), bound)
    out = {}
    for k, v in shared.items():
        out[k] = ((global_weights[k].detach().float().cpu() + clipped[k]).to(v.dtype) if k in clipped
                  else v.detach().cpu().clone())
    return out, norm
