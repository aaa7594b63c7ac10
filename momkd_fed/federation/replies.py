"""Site replies as the server's federation maths sees them, and the filter that keeps only usable ones.

The Flower glue turns each reply ``Message`` into a :class:`SiteReply` (an error reply, ``msg.has_error()``,
becomes ``SiteReply(site, error=...)``), calls :func:`usable_replies`, and passes only the kept replies on to
``aggregate.aggregate_shared`` and ``memory_merge.merge_memory`` / ``merge_memory_slots``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MomkdError
from . import contract


class ReplyError(MomkdError):
    """A site's reply breaks the reply contract (missing key, wrong shape, non-finite values)."""

    def __init__(self, site: str, problem: str) -> None:
        self.site = site
        self.problem = problem
        super().__init__(f"reply from site {site!r}: {problem} (fix: run the same momkd-fed version and model "
                         f"config at every site)")


@dataclass
class SiteReply:
    """One site's train reply, unpacked from Flower records.

    Attributes
    ----------
    site : str
        Site name (or node id as text).
    shared : dict[str, Tensor]
        The ``"arrays"`` record.
    memory : dict[str, Tensor]
        The ``"memory"`` record (keys of :data:`contract.MEMORY_KEYS_BY_MODE`); empty in frozen mode.
    metrics : dict[str, float]
        The ``"metrics"`` record.
    error : str or None
        Set for an error reply (the site raised, or the node was unavailable).
    """

    site: str
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def num_examples(self) -> float:
        return float(self.metrics[contract.NUM_EXAMPLES])

    @property
    def paired(self) -> bool:
        return bool(self.metrics[contract.PAIRED])


def _problem(reply: SiteReply, shared_shapes: Mapping[str, tuple] | None, paired_only: set[str],
             memory_mode: str, memory_shape: tuple[int, int, int] | None) -> str | None:
    """Why ``reply`` is unusable, or None."""
    if reply.error is not None:
        return f"error reply: {reply.error}"
    try:
        contract.check_metrics(reply.metrics, "train")
    except (KeyError, TypeError, ValueError) as exc:
        return str(exc)
    n = reply.metrics[contract.NUM_EXAMPLES]
    if not n > 0:
        return f"{contract.NUM_EXAMPLES} is {n}: no training slides"
    if shared_shapes is not None:
        unknown = [k for k in reply.shared if k not in shared_shapes]
        if unknown:
            return f"shared weights: unknown keys {unknown[:5]}"
        need = [k for k in shared_shapes if k not in reply.shared and (reply.paired or k not in paired_only)]
        if need:
            return f"shared weights: missing keys {need[:5]}"
        for k, t in reply.shared.items():
            if tuple(t.shape) != tuple(shared_shapes[k]):
                return f"shared weights: {k!r} has shape {tuple(t.shape)}, expected {tuple(shared_shapes[k])}"
    for k, t in reply.shared.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            return f"shared weights: non-finite values in {k!r}"
    keys = contract.MEMORY_KEYS_BY_MODE[memory_mode]
    if set(reply.memory) != set(keys):
        return f"memory ({memory_mode} mode): got keys {sorted(reply.memory)}, expected {sorted(keys)}"
    if memory_shape is not None and keys:
        two, k_, s = memory_shape
        want = {contract.SUMS: (two, k_, s), contract.SLOTS: (two, k_, s), contract.COUNTS: (two, k_),
                contract.USAGE: (two, k_), contract.SLIDES: (two, k_)}
        for key in keys:
            if tuple(reply.memory[key].shape) != want[key]:
                return f"memory: {key!r} has shape {tuple(reply.memory[key].shape)}, expected {want[key]}"
    for key in keys:
        t = reply.memory[key].float()
        if not bool(torch.isfinite(t).all()):
            return f"memory: non-finite values in {key!r}"
        if key in (contract.COUNTS, contract.USAGE, contract.SLIDES) and bool((t < 0).any()):
            return f"memory: negative values in {key!r}"
    return None


def usable_replies(
    replies: Sequence[SiteReply],
    memory_mode: str,
    shared_shapes: Mapping[str, tuple] | None = None,
    paired_only: Sequence[str] = (),
    memory_shape: tuple[int, int, int] | None = None,
) -> tuple[list[SiteReply], list[tuple[str, str]]]:
    """Keep the replies the federation maths can use; say why each other one was dropped.

    A reply is dropped when it is an error reply, its metrics break the contract, it trained on no slides, its
    shared weights have unknown/missing keys (a non-paired site may omit paired-only keys), wrong shapes or
    non-finite values, or its memory record does not match ``memory_mode`` and ``memory_shape`` (non-finite or
    negative counts included).

    Parameters
    ----------
    replies : sequence of SiteReply
    memory_mode : str
        ``memory.update``: "ema", "gradient" or "frozen".
    shared_shapes : mapping key -> shape, optional
        The global shared weights' shapes; None skips the key/shape check.
    paired_only : sequence of str
        Paired-only keys (``sharing.paired_only_keys``).
    memory_shape : (2, K, S), optional
        The global memory's shape; None skips the memory shape check.

    Returns
    -------
    kept : list of SiteReply
    dropped : list of (site, reason)
    """
    if memory_mode not in contract.MEMORY_KEYS_BY_MODE:
        raise ValueError(f"memory_mode must be one of {sorted(contract.MEMORY_KEYS_BY_MODE)}, got {memory_mode!r}")
    kept, dropped = [], []
    po = set(paired_only)
    for r in replies:
        why = _problem(r, shared_shapes, po, memory_mode, memory_shape)
        if why is None:
            kept.append(r)
        else:
            dropped.append((r.site, why))
    return kept, dropped

