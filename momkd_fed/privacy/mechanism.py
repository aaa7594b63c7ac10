"""The Gaussian mechanism on what a site releases, and the minimum counts a slot needs before it leaves a site.

Minimum counts (always on): a slot aggregate leaves a site only if it summarises at least
``federation.min_slot_count`` slides **and** at least ``privacy.min_slot_embeddings`` embeddings; a withheld slot
is sent as zeros (sums, counts, slides), which the server treats as unused. :func:`withhold_small_slots` does it
and says which slots were withheld and why.

Differential privacy of the memory (``privacy.enabled``; ema mode): the site clips each slide's contribution
(:class:`~.clipping.SlotAccumulator`, sensitivity C of the concatenated (sums, counts)) and adds, **before
sending**, independent Gaussian noise of standard deviation ``sigma * C`` to every coordinate of the sums
(2, K, S) and of the counts (2, K), for every slot whether used or not (which slots are empty is private too).
One release is then (alpha, alpha / (2 sigma^2))-RDP with respect to adding or removing one slide of this site
(:mod:`.accountant`). Everything after the noise is post-processing and costs nothing more:

- withholding uses the *noisy* counts: a slot is sent only if its noisy count reaches :func:`noisy_threshold`
  (a function of public settings only); thresholding the true counts would leak whether a slot holds one slide
  or none;
- ``slides`` is **not** released exactly (one slide changes it in up to K slots): the reply's ``slides`` field
  carries the noisy count of the slot (clipped mass, the best public stand-in), so the server's
  ``min_slot_count`` check acts on it.

Trust model: the noise is added at the site, so the coordinator, the other sites and anyone who sees the global
memory only ever see noised memory aggregates ("local" DP of each site's release, at the granularity of one slide).
The guarantee covers the memory release of each training round only; the k-means initialisation queries and the
genomic moments are separate releases (see the package docstring).

Noise source: never seed DP noise from the run config (the coordinator knows it and could subtract the noise):
:func:`secret_generator` seeds a ``torch.Generator`` from the OS's CSPRNG. Floating-point Gaussian sampling is
known to leak in theory (Mironov 2012); that caveat applies here as to every float DP library.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..federation.memory_merge import MemoryAggregate, SlotUsage

NOISE_THRESHOLD_SIGMAS = 3.0  # DP mode: a slot is sent only if its noisy count exceeds this many noise stds


def secret_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with 63 bits from ``secrets`` (unknown to the coordinator)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_gaussian_noise(tensors: Mapping[str, torch.Tensor], std: float,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Add independent N(0, std^2) noise to every coordinate of every tensor.

    Parameters
    ----------
    tensors : mapping str -> Tensor
        Floating tensors (moved to CPU float32).
    std : float
        Noise standard deviation (>= 0; 0 returns float32 copies).
    generator : torch.Generator, optional
        CPU generator; default :func:`secret_generator` (tests pass a seeded one).

    Returns
    -------
    dict[str, Tensor]
        float32 noised copies, same keys and shapes.
    """
    if not std >= 0.0:
        raise ValueError(f"add_gaussian_noise: std must be >= 0, got {std}")
    gen = generator if generator is not None else secret_generator()
    out = {}
    for k, t in tensors.items():
        t32 = t.detach().float().cpu()  # (*shape)
        out[k] = t32 + std * torch.randn(t32.shape, generator=gen) if std > 0 else t32.clone()
    return out


@dataclass
class Withheld:
    """Which slots were withheld from a reply, and why (for the audit log).

    Attributes
    ----------
    few_slides : list of [class, slot]
        Used slots (count > 0) behind fewer than ``min_slot_count`` slides.
    few_embeddings : list of [class, slot]
        Used slots with enough slides but fewer than ``min_slot_embeddings`` embeddings.
    below_noisy_threshold : list of [class, slot]
        DP mode: slots whose noisy count fell below the threshold (used or not: the site cannot tell publicly).
    sent : int
        Slots sent.
    """

    few_slides: list[list[int]] = field(default_factory=list)
    few_embeddings: list[list[int]] = field(default_factory=list)
    below_noisy_threshold: list[list[int]] = field(default_factory=list)
    sent: int = 0

    def as_dict(self) -> dict:
        return {"few_slides": self.few_slides, "few_embeddings": self.few_embeddings,
                "below_noisy_threshold": self.below_noisy_threshold, "sent": self.sent,
                "withheld": len(self.few_slides) + len(self.few_embeddings) + len(self.below_noisy_threshold)}


def _pairs(mask: torch.Tensor) -> list[list[int]]:
    return [[int(c), int(k)] for c, k in mask.nonzero().tolist()]


def _zero_where(agg: MemoryAggregate, keep: torch.Tensor) -> MemoryAggregate:
    return MemoryAggregate(sums=torch.where(keep.unsqueeze(-1), agg.sums.float(), 0.0),  # (2, K, S)
                           counts=torch.where(keep, agg.counts.float(), 0.0),  # (2, K)
                           slides=torch.where(keep, agg.slides.float(), 0.0))  # (2, K)


def withhold_small_slots(agg: MemoryAggregate, min_slot_count: int, min_slot_embeddings: int
                         ) -> tuple[MemoryAggregate, Withheld]:
    """Zero every slot behind fewer than ``min_slot_count`` slides or ``min_slot_embeddings`` embeddings.

    Parameters
    ----------
    agg : MemoryAggregate
        Exact (not noised) aggregates: sums (2,K,S), counts (2,K), slides (2,K). Counts may be clipped mass
        (:class:`~.clipping.SlotAccumulator`); the embeddings threshold then applies to that mass.
    min_slot_count, min_slot_embeddings : int
        ``federation.min_slot_count`` and ``privacy.min_slot_embeddings`` (values below 1 act as 1).

    Returns
    -------
    MemoryAggregate
        float32; withheld and unused slots are all zeros.
    Withheld
    """
    counts, slides = agg.counts.float(), agg.slides.float()  # (2, K), (2, K)
    used = counts > 0  # (2, K)
    enough_slides = slides >= max(int(min_slot_count), 1)  # (2, K)
    enough_emb = counts >= max(float(min_slot_embeddings), 1e-12)  # (2, K)
    keep = used & enough_slides & enough_emb  # (2, K)
    info = Withheld(few_slides=_pairs(used & ~enough_slides), few_embeddings=_pairs(used & enough_slides & ~enough_emb),
                    sent=int(keep.sum()))
    return _zero_where(agg, keep), info


def withhold_small_usage(usage: SlotUsage, min_slot_count: int, min_slot_embeddings: int
                         ) -> tuple[SlotUsage, Withheld]:
    """gradient mode: the same minimum counts on trained slots (usage = embeddings assigned to the slot)."""
    agg, info = withhold_small_slots(MemoryAggregate(usage.slots, usage.usage, usage.slides), min_slot_count,
                                     min_slot_embeddings)
    return SlotUsage(slots=agg.sums, usage=agg.counts, slides=agg.slides), info


def noisy_threshold(min_slot_count: int, min_slot_embeddings: int, clip_norm: float,
                    noise_multiplier: float) -> float:
    """The noisy-count threshold of DP mode (a function of public settings only, so free of privacy cost)::

        max( max(min_slot_count, min_slot_embeddings, 1),  NOISE_THRESHOLD_SIGMAS * sigma * C )

    The first term asks for at least ``min_slot_count`` of count mass (a slide adds at most ``C`` to a slot, so at
    least ``min_slot_count / C`` slides must be behind it; the server's own ``min_slot_count`` check on the
    released ``slides`` therefore always passes); the second keeps slots that are pure noise out (an empty slot
    passes with probability ``1 - Phi(3)`` = 0.13 %), since their noisy sums would only drag the global slot
    around.
    """
    mass = float(max(int(min_slot_count), int(min_slot_embeddings), 1))
    return max(mass, NOISE_THRESHOLD_SIGMAS * float(noise_multiplier) * float(clip_norm))


def privatize_memory(agg: MemoryAggregate, noise_multiplier: float, clip_norm: float, threshold: float,
                     generator: torch.Generator | None = None) -> tuple[MemoryAggregate, Withheld]:
    """The Gaussian mechanism on clipped memory aggregates, then post-processing for the reply.

    Parameters
    ----------
    agg : MemoryAggregate
        Clipped aggregates (``SlotAccumulator.aggregate()``); every slide's concatenated (sums, counts)
        contribution must have L2 norm <= ``clip_norm``. ``agg.slides`` is not released.
    noise_multiplier : float
        sigma > 0: noise std ``sigma * clip_norm`` on every sum and count coordinate.
    clip_norm : float
        C.
    threshold : float
        Slots whose noisy count is below this are withheld (:func:`noisy_threshold`).
    generator : torch.Generator, optional
        Default: :func:`secret_generator`.

    Returns
    -------
    MemoryAggregate
        Noisy sums and counts of the sent slots, zeros elsewhere; ``slides`` = the noisy count of sent slots
        (post-processed stand-in for the slide count), 0 elsewhere. Counts of sent slots are >= threshold > 0.
    Withheld
        ``below_noisy_threshold`` lists every slot not sent.
    """
    if not noise_multiplier > 0.0:
        raise ValueError(f"privatize_memory: privacy.noise_multiplier must be > 0, got {noise_multiplier}")
    if not threshold > 0.0:
        raise ValueError(f"privatize_memory: threshold must be > 0, got {threshold}")
    noisy = add_gaussian_noise({"sums": agg.sums, "counts": agg.counts}, noise_multiplier * clip_norm, generator)
    keep = noisy["counts"] >= threshold  # (2, K) post-processing of the noisy counts only
    out = _zero_where(MemoryAggregate(noisy["sums"], noisy["counts"], noisy["counts"]), keep)
    return out, Withheld(below_noisy_threshold=_pairs(~keep), sent=int(keep.sum()))
