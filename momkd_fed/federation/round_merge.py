"""One server-side merge step of a round, composed from the pure pieces (what the ServerApp calls).

``merge_round`` = ``usable_replies`` -> ``aggregate_shared`` (paired-only aware) -> ``FedAvgMState.step`` ->
``merge_memory`` (ema) / ``merge_memory_slots`` (gradient) / nothing (frozen) -> a flat metrics summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..config import FederationConfig
from . import contract
from .aggregate import FedAvgMState, SharedUpdate, aggregate_shared
from .memory_merge import MemoryAggregate, SlotUsage, merge_memory, merge_memory_slots, server_memory_momentum
from .replies import SiteReply, usable_replies
from .sharing import paired_only_keys


@dataclass
class RoundMerge:
    """Result of :func:`merge_round`.

    Attributes
    ----------
    shared : dict[str, Tensor]
        New global shared weights (unchanged when no reply was usable).
    slots : Tensor
        (2, K, S) new global memory.
    metrics : dict[str, float]
        Slide-weighted mean of every train metric over the used replies (NaNs skipped), plus merge counters.
    dropped : list of (site, reason)
        Replies left out, and why.
    """

    shared: dict[str, torch.Tensor]
    slots: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)


def weighted_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Weighted mean per metric key, skipping NaN values (NaN when no site has a finite value).

    ``num-examples`` is summed and ``paired`` counts the paired sites.
    """
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    for k in keys:
        if k == contract.NUM_EXAMPLES:
            out[k] = float(sum(m.get(k, 0) for m in metrics))
            continue
        if k == contract.PAIRED:
            out[k] = float(sum(bool(m.get(k, 0)) for m in metrics))
            continue
        pairs = [(float(m[k]), w) for m, w in zip(metrics, weights) if k in m and math.isfinite(float(m[k]))]
        tot = sum(w for _, w in pairs)
        out[k] = sum(v * w for v, w in pairs) / tot if pairs and tot > 0 else math.nan
    return out


def merge_round(
    global_shared: Mapping[str, torch.Tensor],
    global_slots: torch.Tensor,
    replies: Sequence[SiteReply],
    fed: FederationConfig,
    memory_mode: str,
    opt: FedAvgMState,
) -> RoundMerge:
    """Merge one round's train replies into the new global shared weights and memory.

    Parameters
    ----------
    global_shared : mapping
        Global shared weights at the start of the round.
    global_slots : Tensor
        (2, K, S) global memory at the start of the round.
    replies : sequence of SiteReply
        Every reply, error replies included (they are filtered here).
    fed : FederationConfig
        ``paired_only``, ``memory_momentum`` / ``slot_momentum``, ``min_slot_count``.
    memory_mode : str
        ``memory.update``: "gradient", "ema" or "frozen".
    opt : FedAvgMState
        Server optimiser state; updated in place.

    Returns
    -------
    RoundMerge
    """
    paired_only = paired_only_keys(global_shared, fed)
    kept, dropped = usable_replies(replies, memory_mode, {k: tuple(v.shape) for k, v in global_shared.items()},
                                   paired_only, tuple(global_slots.shape))
    info: dict[str, float] = {"sites_replied": len(replies), "sites_used": len(kept), "sites_dropped": len(dropped)}
    if not kept:
        return RoundMerge(dict(global_shared), global_slots, info, dropped)
    avg = aggregate_shared(global_shared, [SharedUpdate(r.site, r.shared, r.num_examples, r.paired) for r in kept],
                           paired_only)
    new_shared = opt.step(global_shared, avg.weights, avg.frozen)
    info["shared_keys_frozen"] = len(avg.frozen)
    slots = global_slots
    if memory_mode == "ema":
        aggs = [MemoryAggregate(r.memory[contract.SUMS], r.memory[contract.COUNTS], r.memory[contract.SLIDES])
                for r in kept]
        slots, minfo = merge_memory(global_slots, aggs, server_memory_momentum(fed, memory_mode), fed.min_slot_count)
        info.update(minfo.as_metrics())
    elif memory_mode == "gradient":
        sus = [SlotUsage(r.memory[contract.SLOTS], r.memory[contract.USAGE], r.memory[contract.SLIDES]) for r in kept]
        slots, minfo = merge_memory_slots(global_slots, sus, server_memory_momentum(fed, memory_mode), fed.min_slot_count)
        info.update(minfo.as_metrics())
    metrics = weighted_metrics([r.metrics for r in kept], [r.num_examples for r in kept])
    metrics.update(info)
    return RoundMerge(new_shared, slots, metrics, dropped)
