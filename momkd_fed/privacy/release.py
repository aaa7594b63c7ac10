"""Site side: the memory aggregate a site sends this round, built from the privacy settings (one call).

``memory_release`` composes :mod:`.clipping`, :mod:`.mechanism` and :mod:`.accountant`:

- ``privacy.enabled`` and ema mode: per-slide clipped aggregates from a :class:`~.clipping.SlotAccumulator`,
  Gaussian noise, withholding on the noisy counts, one accountant step;
- otherwise: the memory's exact aggregates (``ClassMemory.aggregates()``) with the minimum counts
  (``federation.min_slot_count`` slides and ``privacy.min_slot_embeddings`` embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import Config
from ..federation import contract
from ..federation.memory_merge import MemoryAggregate
from .accountant import PrivacyAccountant
from .clipping import ClipStats, SlotAccumulator
from .mechanism import Withheld, noisy_threshold, privatize_memory, withhold_small_slots
from .settings import memory_dp


@dataclass
class MemoryRelease:
    """What :func:`memory_release` decided.

    Attributes
    ----------
    aggregate : MemoryAggregate
        What to send (``aggregate.to_arrays()`` or its tensors under :data:`contract.EMA_MEMORY_KEYS`).
    withheld : Withheld
    clip : ClipStats or None
        None when no clipping happened (DP off).
    dp : bool
        True when the aggregate is noised.
    privacy : dict or None
        ``accountant.report()`` after this release (epsilon this round and cumulated), DP only.
    """

    aggregate: MemoryAggregate
    withheld: Withheld
    clip: ClipStats | None = None
    dp: bool = False
    privacy: dict | None = None

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The reply's memory record, keyed by :data:`contract.EMA_MEMORY_KEYS`."""
        a = self.aggregate
        return {contract.SUMS: a.sums, contract.COUNTS: a.counts, contract.SLIDES: a.slides}


def memory_release(cfg: Config, aggregates: Mapping[str, torch.Tensor] | None = None,
                   accumulator: SlotAccumulator | None = None, accountant: PrivacyAccountant | None = None,
                   generator: torch.Generator | None = None) -> MemoryRelease:
    """The ema-mode memory aggregate to send this round.

    Parameters
    ----------
    cfg : Config
        ``federation.min_slot_count``, ``privacy.*``, ``memory.update``.
    aggregates : mapping, optional
        ``model.memory.aggregates()`` (sums (2,K,S), counts (2,K), slides (2,K)); used when DP is off.
    accumulator : SlotAccumulator, optional
        This round's per-slide accumulator; required when DP is on.
    accountant : PrivacyAccountant, optional
        The site's accountant (persisted in its state folder); required when DP is on; stepped once here.
    generator : torch.Generator, optional
        Noise source; default a secret one (never pass a config-seeded generator outside tests).

    Raises
    ------
    ValueError
        When DP is on and the accumulator or accountant is missing, or DP is off and ``aggregates`` is missing.
    """
    p = cfg.privacy
    if memory_dp(cfg):
        if accumulator is None or accountant is None:
            raise ValueError("memory_release: privacy.enabled needs the round's SlotAccumulator and the site's "
                             "PrivacyAccountant")
        clipped, stats = accumulator.aggregate()
        thr = noisy_threshold(cfg.federation.min_slot_count, p.min_slot_embeddings, p.clip_norm, p.noise_multiplier)
        agg, withheld = privatize_memory(clipped, p.noise_multiplier, p.clip_norm, thr, generator)
        accountant.step(1, p.noise_multiplier)
        return MemoryRelease(agg, withheld, stats, True, accountant.report())
    if aggregates is None:
        raise ValueError("memory_release: pass the memory's aggregates (model.memory.aggregates())")
    t = {k: aggregates[k].detach().float().cpu() for k in contract.EMA_MEMORY_KEYS}
    agg, withheld = withhold_small_slots(MemoryAggregate(t[contract.SUMS], t[contract.COUNTS], t[contract.SLIDES]),
                                         cfg.federation.min_slot_count, p.min_slot_embeddings)
    return MemoryRelease(agg, withheld)
