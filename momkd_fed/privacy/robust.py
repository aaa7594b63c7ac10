"""Averaging the shared weights, behind one interface: FedAvg, robust (median, trimmed mean), or with DP noise.

An :class:`Aggregator` turns the good replies' shared weights into the round's average; the server then applies
its FedAvgM step to it. Every implementation keeps the contract of
``momkd_fed.federation.aggregate.aggregate_shared``: paired-only keys (the genomic encoder) are combined over
paired sites only and stay frozen when none replied; non-floating keys keep the global value.

- :class:`MeanAggregator` (``privacy.aggregator: mean``, default): FedAvg weighted by training slides
  (``aggregate_shared`` itself).
- :class:`MedianAggregator`: coordinate-wise median over sites (unweighted; an even count averages the two middle
  values). With one poisoned site among n >= 3, every coordinate stays within the honest sites' range.
- :class:`TrimmedMeanAggregator`: per coordinate, drop the ``t = min(ceil(trim_fraction * n), (n - 1) // 2)``
  lowest and highest values, average the rest (unweighted). Tolerates t poisoned sites.
- :class:`DPMeanAggregator` (``privacy.enabled`` with ``update_noise_multiplier > 0``): central DP in the style of
  DP-FedAvg (McMahan et al. 2018). Each site's update ``d_i = w_i - w_global`` is clipped to L2 norm C_w **by the
  server** (sites may clip too; the server's clip is authoritative), averaged **uniformly** with the fixed
  denominator n (the number of replies used; weighting by slides would let one site's slide count move the
  sensitivity), and N(0, (z C_w / n)^2) noise is added to every coordinate; for paired-only keys n is the number
  of paired replies. Adding or removing one site moves the concatenated (common mean, paired-only mean) by at most
  C_w / n per group with noise z C_w / n per group, so each round is (alpha, alpha / (2 z^2))-RDP at the
  granularity of **one whole site** (which implies every slide of it). Trust model: the server is honest but
  curious; it sees each site's clipped update in the clear, and the guarantee protects the sites against
  everyone who sees the global model (other sites, users of the released model), not against the server. Use a
  secure sum (package docstring) to hide individual updates from the server as well.

Secure aggregation hook: an implementation that only ever needs the *sum* of per-site vectors (e.g. a SecAgg
protocol) can replace these, because :class:`MeanAggregator` and :class:`DPMeanAggregator` only use
``sum_i n_i w_i``, ``sum_i n_i`` (resp. ``sum_i clip(d_i)`` and n); the robust ones need per-site values and cannot.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..config import Config
from ..federation.aggregate import SharedAverage, SharedUpdate, aggregate_shared
from ..federation.memory_merge import MemoryAggregate
from .clipping import clip_update, update_delta
from .mechanism import add_gaussian_noise
from .settings import update_dp


@runtime_checkable
class Aggregator(Protocol):
    """Combines the round's good replies' shared weights (the server then steps FedAvgM on the result)."""

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[SharedUpdate],
                  paired_only: Collection[str]) -> SharedAverage:
        """Same contract as ``federation.aggregate.aggregate_shared``."""
        ...


@runtime_checkable
class MemorySum(Protocol):
    """Sums the sites' memory aggregates per slot (the only thing the server's memory merge needs)."""

    def total(self, aggregates: Sequence[MemoryAggregate]) -> MemoryAggregate:
        ...


class PlainMemorySum:
    """Elementwise sum of the replies' sums, counts and slides (in the clear)."""

    def total(self, aggregates: Sequence[MemoryAggregate]) -> MemoryAggregate:
        if not aggregates:
            raise ValueError("PlainMemorySum: no aggregates")
        return MemoryAggregate(sums=sum(a.sums.float() for a in aggregates),
                               counts=sum(a.counts.float() for a in aggregates),
                               slides=sum(a.slides.float() for a in aggregates))


class MeanAggregator:
    """FedAvg weighted by training slides (``aggregate_shared``)."""

    def aggregate(self, global_weights, updates, paired_only) -> SharedAverage:
        return aggregate_shared(global_weights, updates, paired_only)


def _groups(global_weights: Mapping[str, torch.Tensor], updates: Sequence[SharedUpdate],
            paired_only: Collection[str]) -> tuple[list[str], list[str], list[SharedUpdate]]:
    # aggregate_shared validates keys and shapes; run it for that (cheap) before combining per coordinate
    aggregate_shared(global_weights, updates, paired_only)
    po = set(paired_only)
    floats = [k for k, v in global_weights.items() if torch.is_floating_point(v)]
    return [k for k in floats if k not in po], [k for k in floats if k in po], [u for u in updates if u.paired]


def _combine_groups(global_weights, updates, paired_only, per_group, groups=None) -> SharedAverage:
    """Apply ``per_group(keys, sites) -> {key: float tensor}`` to the common keys over all sites and to the genomic
    keys over the paired sites; a group nobody sent keeps the global value (frozen), as do integer buffers."""
    common, genomic, paired = groups or _groups(global_weights, updates, paired_only)
    out = dict(global_weights)
    frozen = [k for k, v in global_weights.items() if not torch.is_floating_point(v)]
    for keys, group in ((common, updates), (genomic, paired)):
        if not keys:
            continue
        if not group:
            frozen += keys
            continue
        for k, v in per_group(keys, group).items():
            out[k] = v.to(global_weights[k].dtype)
    return SharedAverage(weights={k: out[k] for k in global_weights}, frozen=frozen,
                         num_examples=float(sum(u.num_examples for u in updates)), paired_sites=len(paired))


def _combine(global_weights, updates, paired_only, per_key) -> SharedAverage:
    """Coordinate-wise: ``per_key`` reduces each key's (n_sites, *shape) stack."""
    def per_group(keys, group):
        return {k: per_key(torch.stack([u.weights[k].detach().float().cpu() for u in group]))  # (n, *shape)
                for k in keys}

    return _combine_groups(global_weights, updates, paired_only, per_group)


class MedianAggregator:
    """Coordinate-wise median over sites (mean of the two middle values for an even count)."""

    def aggregate(self, global_weights, updates, paired_only) -> SharedAverage:
        def median(stack: torch.Tensor) -> torch.Tensor:  # (n, *shape) -> (*shape)
            srt = stack.sort(dim=0).values
            n = srt.shape[0]
            return srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])

        return _combine(global_weights, updates, paired_only, median)


def trim_count(n: int, trim_fraction: float) -> int:
    """Values dropped at each end: ``min(ceil(trim_fraction * n), (n - 1) // 2)`` (0 for n <= 2)."""
    return min(math.ceil(trim_fraction * n - 1e-12), (n - 1) // 2) if n > 0 else 0


class TrimmedMeanAggregator:
    """Coordinate-wise trimmed mean (:func:`trim_count` values dropped at each end)."""

    def __init__(self, trim_fraction: float) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"privacy.trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = float(trim_fraction)

    def aggregate(self, global_weights, updates, paired_only) -> SharedAverage:
        def trimmed(stack: torch.Tensor) -> torch.Tensor:  # (n, *shape) -> (*shape)
            n = stack.shape[0]
            t = trim_count(n, self.trim_fraction)
            return stack.sort(dim=0).values[t:n - t].mean(dim=0)

        return _combine(global_weights, updates, paired_only, trimmed)


class DPMeanAggregator:
    """Clipped, uniformly averaged, noised updates (module docstring: trust model and sensitivity).

    Parameters
    ----------
    clip_norm : float
        C_w (``privacy.update_clip_norm``).
    noise_multiplier : float
        z (``privacy.update_noise_multiplier``); 0 = clipping and uniform mean only.
    generator : torch.Generator, optional
        Default: a secret one per call.

    Attributes
    ----------
    last_norms : dict[str, float]
        Site -> update norm before clipping, from the last call (for logs).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, generator: torch.Generator | None = None) -> None:
        if not clip_norm > 0.0:
            raise ValueError(f"DPMeanAggregator: privacy.update_clip_norm must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0.0:
            raise ValueError(f"DPMeanAggregator: noise multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator
        self.last_norms: dict[str, float] = {}

    def aggregate(self, global_weights, updates, paired_only) -> SharedAverage:
        common, genomic, paired = _groups(global_weights, updates, paired_only)
        clipped: dict[str, dict[str, torch.Tensor]] = {}
        self.last_norms = {}
        for u in updates:
            keys = common + ([k for k in genomic if k in u.weights] if u.paired else [])
            delta = update_delta({k: u.weights[k] for k in keys}, global_weights)
            clipped[u.site], self.last_norms[u.site] = clip_update(delta, self.clip_norm)

        def per_group(keys, group):
            n = len(group)
            mean = {k: sum(clipped[u.site][k] for u in group) / n for k in keys}  # (*shape) each
            mean = add_gaussian_noise(mean, self.noise_multiplier * self.clip_norm / n, self.generator)
            return {k: global_weights[k].detach().float().cpu() + mean[k] for k in keys}

        return _combine_groups(global_weights, updates, paired_only, per_group, (common, genomic, paired))


def make_aggregator(cfg: Config, generator: torch.Generator | None = None) -> Aggregator:
    """The aggregator the config asks for (call ``settings.check_privacy`` first).

    Update DP (``privacy.enabled`` and ``update_noise_multiplier > 0``) -> :class:`DPMeanAggregator`; update
    clipping alone (``update_clip_norm > 0``) with ``aggregator: mean`` -> :class:`DPMeanAggregator` with no noise
    (clipped, uniform mean); otherwise by ``privacy.aggregator``.
    """
    p = cfg.privacy
    if update_dp(cfg):
        return DPMeanAggregator(p.update_clip_norm, p.update_noise_multiplier, generator)
    if p.aggregator == "median":
        return MedianAggregator()
    if p.aggregator == "trimmed_mean":
        return TrimmedMeanAggregator(p.trim_fraction)
    if p.update_clip_norm > 0.0:
        return DPMeanAggregator(p.update_clip_norm, 0.0, generator)
    return MeanAggregator()
