"""Merging the sites' memory aggregates into the global memory (pure functions on tensors).

Both modes end with the same server rule (design.md, "One round")::

    C <- normalise(mu_s * C + (1 - mu_s) * merged)        only for slots somebody used; the others keep C

``ema`` mode: sites send, per class and slot, the sum and count of the embeddings assigned to the slot and the
number of distinct slides behind them; ``merged = sum(sums) / sum(counts)``, the pooled mean of the assigned
embeddings.

``gradient`` mode: sites send their trained slot vectors and per-slot usage counts; ``merged`` is the
usage-weighted mean of the sites' slot vectors, each first L2-normalised (slots are only ever used normalised, so
their stored norm carries no meaning).

``merged`` is deliberately **not** normalised before mixing, exactly as the local ema rule of method.md
(``c <- mu*c + (1-mu)*mean(assigned)``, then renormalised): a mean of unit vectors is shorter than one, the more
so the more its members disagree, so a diffuse slot moves the global slot less than a tight one. Only the mixed
vector is normalised.

Privacy: a site withholds every slot aggregate that summarises fewer than ``min_slot_count`` slides (its sums,
counts and usage are sent as zeros, so the server treats it as unused); the server enforces the same minimum
again on what it receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import contract

SLOTS_KEY = "memory.slots"  # (2, K, S) the global memory's state-dict key (parameter or buffer by mode)
_EPS = 1e-12


@dataclass
class MemoryAggregate:
    """ema-mode memory reply of one site.

    Attributes
    ----------
    sums : Tensor
        (2, K, S) float32 sum of the embeddings assigned to each slot.
    counts : Tensor
        (2, K) float32 number of embeddings summed.
    slides : Tensor
        (2, K) float32 number of distinct slides behind each slot.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    slides: torch.Tensor

    def to_arrays(self) -> dict:
        """Record contents (:data:`contract.EMA_MEMORY_KEYS`) as numpy arrays."""
        return contract.to_numpy({contract.SUMS: self.sums, contract.COUNTS: self.counts,
                                  contract.SLIDES: self.slides})

    @classmethod
    def from_arrays(cls, arrays: Mapping) -> "MemoryAggregate":
        """Inverse of :meth:`to_arrays` (check shapes first with ``replies.usable_replies``)."""
        t = contract.from_numpy({k: arrays[k] for k in contract.EMA_MEMORY_KEYS})
        return cls(t[contract.SUMS].float(), t[contract.COUNTS].float(), t[contract.SLIDES].float())


@dataclass
class SlotUsage:
    """gradient-mode memory reply of one site.

    Attributes
    ----------
    slots : Tensor
        (2, K, S) float32 the site's trained slot vectors.
    usage : Tensor
        (2, K) float32 how many embeddings used each slot this round (its weight in the merge).
    slides : Tensor
        (2, K) float32 number of distinct slides behind each slot.
    """

    slots: torch.Tensor
    usage: torch.Tensor
    slides: torch.Tensor

    def to_arrays(self) -> dict:
        """Record contents (:data:`contract.GRADIENT_MEMORY_KEYS`) as numpy arrays."""
        return contract.to_numpy({contract.SLOTS: self.slots, contract.USAGE: self.usage,
                                  contract.SLIDES: self.slides})

    @classmethod
    def from_arrays(cls, arrays: Mapping) -> "SlotUsage":
        """Inverse of :meth:`to_arrays`."""
        t = contract.from_numpy({k: arrays[k] for k in contract.GRADIENT_MEMORY_KEYS})
        return cls(t[contract.SLOTS].float(), t[contract.USAGE].float(), t[contract.SLIDES].float())


@dataclass
class MergeInfo:
    """What a memory merge did (for the round log).

    Attributes
    ----------
    updated : Tensor
        (2, K) bool, slots that moved (somebody used them).
    weight : Tensor
        (2, K) float32 total count (ema) or usage (gradient) per slot after withholding.
    slides : Tensor
        (2, K) float32 total slides per slot after withholding.
    withheld : int
        Site-slot aggregates the server dropped for having fewer than ``min_slot_count`` slides.
    replies : int
        Replies merged.
    mean_cos : float
        Mean cosine between old and new slot over updated slots (1 = nothing moved; NaN if none updated).
    """

    updated: torch.Tensor
    weight: torch.Tensor
    slides: torch.Tensor
    withheld: int
    replies: int
    mean_cos: float

    def as_metrics(self) -> dict[str, float]:
        """Scalar summary for rounds.jsonl."""
        return {"memory_slots_updated": int(self.updated.sum()), "memory_slots_withheld": self.withheld,
                "memory_replies": self.replies, "memory_mean_cos": self.mean_cos}


def _check_slots(global_slots: torch.Tensor) -> tuple[int, int, int]:
    if global_slots.dim() != 3 or global_slots.shape[0] != 2:
        raise ValueError(f"global memory must have shape (2, K, S), got {tuple(global_slots.shape)}")
    return tuple(global_slots.shape)  # type: ignore[return-value]


def _mix(global_slots: torch.Tensor, merged: torch.Tensor, used: torch.Tensor, mu_s: float,
         weight: torch.Tensor, slides: torch.Tensor, withheld: int, replies: int) -> tuple[torch.Tensor, MergeInfo]:
    """C <- normalise(mu_s*C + (1-mu_s)*merged) where ``used``; keep C elsewhere (or where the mix vanishes)."""
    if not 0.0 <= mu_s < 1.0:
        raise ValueError(f"memory momentum mu_s must be in [0, 1), got {mu_s}")
    c = global_slots.float()  # (2, K, S)
    mixed = mu_s * c + (1.0 - mu_s) * merged  # (2, K, S)
    norm = mixed.norm(dim=-1, keepdim=True)  # (2, K, 1)
    used = used & (norm.squeeze(-1) > 1e-8)  # (2, K) a vanishing mix (antipodal) keeps the old slot
    new = torch.where(used.unsqueeze(-1), mixed / norm.clamp_min(_EPS), c)  # (2, K, S)
    if used.any():
        cos = torch.nn.functional.cosine_similarity(c, new, dim=-1, eps=_EPS)[used]  # (n_used,)
        mean_cos = float(cos.mean())
    else:
        mean_cos = float("nan")
    info = MergeInfo(updated=used, weight=weight, slides=slides, withheld=withheld, replies=replies,
                     mean_cos=mean_cos)
    return new.to(global_slots.dtype), info


def merge_memory(
    global_slots: torch.Tensor, replies: Sequence[MemoryAggregate], mu_s: float, min_slot_count: int = 1
) -> tuple[torch.Tensor, MergeInfo]:
    """ema mode: merge the sites' slot sums and counts into the global memory.

    Parameters
    ----------
    global_slots : Tensor
        (2, K, S) current global memory C (unit rows).
    replies : sequence of MemoryAggregate
        Good replies only (filter with ``replies.usable_replies`` first); may be empty (C is returned unchanged).
    mu_s : float
        Server memory momentum in [0, 1) (``federation.memory_momentum``).
    min_slot_count : int
        A site's slot aggregate with fewer slides than this is ignored (the site should already have withheld it).

    Returns
    -------
    new_slots : Tensor
        (2, K, S) ``normalise(mu_s*C + (1-mu_s)*sum(sums)/sum(counts))`` for slots with a total count > 0; the
        other slots keep their value exactly.
    info : MergeInfo
    """
    two, k, s = _check_slots(global_slots)
    sums = torch.zeros(two, k, s)  # (2, K, S)
    counts = torch.zeros(two, k)  # (2, K)
    slides = torch.zeros(two, k)  # (2, K)
    withheld = 0
    for r in replies:
        keep = (r.slides.float() >= min_slot_count) & (r.counts.float() > 0)  # (2, K)
        withheld += int(((r.slides.float() < min_slot_count) & (r.counts.float() > 0)).sum())
        sums += torch.where(keep.unsqueeze(-1), r.sums.float(), 0.0)
        counts += torch.where(keep, r.counts.float(), 0.0)
        slides += torch.where(keep, r.slides.float(), 0.0)
    used = counts > 0  # (2, K)
    merged = sums / counts.clamp_min(_EPS).unsqueeze(-1)  # (2, K, S) pooled mean of assigned embeddings
    return _mix(global_slots, merged, used, mu_s, counts, slides, withheld, len(replies))


def server_memory_momentum(fed, mode: str) -> float:
    """mu_s of the server's memory rule for ``mode``: ``federation.slot_momentum`` for the trained slots of
    ``gradient`` mode, ``federation.memory_momentum`` for the assigned-embedding means of ``ema`` mode."""
    return float(fed.slot_momentum if mode == "gradient" else fed.memory_momentum)


def merge_memory_slots(
    global_slots: torch.Tensor, replies: Sequence[SlotUsage], mu_s: float, min_slot_count: int = 1
) -> tuple[torch.Tensor, MergeInfo]:
    """gradient mode: merge the sites' trained slot vectors, weighted by per-slot usage.

    ``merged = sum_i usage_i * normalise(slots_i) / sum_i usage_i`` per slot; then the same momentum/normalise
    rule and keep-unused rule as :func:`merge_memory` (a slot with total usage 0 keeps its value).

    Parameters
    ----------
    global_slots : Tensor
        (2, K, S) current global memory.
    replies : sequence of SlotUsage
        Good replies only.
    mu_s : float
        Server memory momentum in [0, 1) (``federation.slot_momentum``; 0 = the usage-weighted average itself,
        as FedAvg takes the average of the encoders that were trained together with these slots).
    min_slot_count : int
        A site's slot with fewer slides than this is ignored.

    Returns
    -------
    new_slots : Tensor
        (2, K, S)
    info : MergeInfo
    """
    two, k, s = _check_slots(global_slots)
    acc = torch.zeros(two, k, s)  # (2, K, S)
    usage = torch.zeros(two, k)  # (2, K)
    slides = torch.zeros(two, k)  # (2, K)
    withheld = 0
    for r in replies:
        keep = (r.slides.float() >= min_slot_count) & (r.usage.float() > 0)  # (2, K)
        withheld += int(((r.slides.float() < min_slot_count) & (r.usage.float() > 0)).sum())
        w = torch.where(keep, r.usage.float(), 0.0)  # (2, K)
        unit = torch.nn.functional.normalize(r.slots.float(), dim=-1, eps=_EPS)  # (2, K, S)
        acc += w.unsqueeze(-1) * unit
        usage += w
        slides += torch.where(keep, r.slides.float(), 0.0)
    used = usage > 0  # (2, K)
    merged = acc / usage.clamp_min(_EPS).unsqueeze(-1)  # (2, K, S)
    return _mix(global_slots, merged, used, mu_s, usage, slides, withheld, len(replies))


def _withhold(min_slot_count: int, slides: torch.Tensor) -> torch.Tensor:
    """(2, K) bool mask of the slots that may leave the site."""
    return slides.float() >= max(int(min_slot_count), 1)


def _aggregates(aggregates: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return tuple(aggregates[k].detach().float().cpu() for k in (contract.SUMS, contract.COUNTS, contract.SLIDES))
    except KeyError as exc:
        raise KeyError(f"memory aggregates need keys {contract.EMA_MEMORY_KEYS} (ClassMemory.aggregates()), "
                       f"got {sorted(aggregates)}") from exc


def memory_aggregate_for_reply(aggregates: Mapping[str, torch.Tensor], min_slot_count: int) -> MemoryAggregate:
    """Site side, ema mode: the memory aggregate to send, with under-populated slots withheld.

    Parameters
    ----------
    aggregates : mapping
        ``model.memory.aggregates()`` after this round's local training: ``"sums"`` (2,K,S), ``"counts"`` (2,K),
        ``"slides"`` (2,K) (the non-persistent ``memory.agg_*`` buffers).
    min_slot_count : int
        Slots behind fewer slides than this (and at least 1) are sent as zero sums, counts and slides.

    Returns
    -------
    MemoryAggregate
        float32 copies, safe to send.
    """
    sums, counts, slides = _aggregates(aggregates)  # (2, K, S), (2, K), (2, K)
    ok = _withhold(min_slot_count, slides) & (counts > 0)  # (2, K)
    return MemoryAggregate(sums=torch.where(ok.unsqueeze(-1), sums, 0.0), counts=torch.where(ok, counts, 0.0),
                           slides=torch.where(ok, slides, 0.0))


def slot_usage_for_reply(slots: torch.Tensor, aggregates: Mapping[str, torch.Tensor],
                         min_slot_count: int) -> SlotUsage:
    """Site side, gradient mode: the trained slots with their usage, under-populated slots withheld.

    Parameters
    ----------
    slots : Tensor
        (2, K, S) the site's trained ``memory.slots``.
    aggregates : mapping
        ``model.memory.aggregates()``; usage = ``"counts"`` (patch projections assigned to each slot this round).
    min_slot_count : int
        A slot behind fewer slides is sent as a zero vector with usage 0 and slides 0.
    """
    _, usage, slides = _aggregates(aggregates)  # (2, K), (2, K)
    slots = slots.detach().float().cpu()  # (2, K, S)
    ok = _withhold(min_slot_count, slides) & (usage > 0)  # (2, K)
    return SlotUsage(slots=torch.where(ok.unsqueeze(-1), slots, 0.0), usage=torch.where(ok, usage, 0.0),
                     slides=torch.where(ok, slides, 0.0))
