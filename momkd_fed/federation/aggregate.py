"""Averaging the sites' shared weights and the server's momentum step (FedAvgM), as pure functions.

:func:`aggregate_shared` is FedAvg weighted by training slides, except that paired-only keys (the genomic encoder
and projection) are averaged over paired sites only and keep the global value when no paired site replied.
:func:`fedavgm_step` then applies server momentum exactly as ``flwr.serverapp.strategy.FedAvgM`` (flwr 1.42):

    d = w - avg                     (pseudo-gradient; "updates are the opposite of gradients")
    m = d            in the first step, then  m = beta * m + d      (PyTorch SGD convention, no dampening)
    w = w - lr * m                  (no Nesterov)

With ``beta == 0`` and ``lr == 1`` Flower turns server optimisation off and returns the average itself; so do we.
Differences from Flower, on purpose: keys that no reply updated this round (``frozen``, e.g. paired-only keys
in a round without paired sites) keep both their weight and their momentum unchanged instead of coasting on
momentum; non-floating tensors (e.g. ``num_batches_tracked``) are never averaged or stepped: they keep the
global value. All arithmetic is float32 (Flower's numpy arrays are float32 too); results are cast back to each
key's dtype.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .replies import ReplyError


@dataclass
class SharedUpdate:
    """One site's shared weights as used by :func:`aggregate_shared`.

    Attributes
    ----------
    site : str
        Site name (for error messages).
    weights : dict[str, Tensor]
        Trained shared weights (a histology-only site may omit paired-only keys).
    num_examples : float
        Training slides this round (the averaging weight).
    paired : bool
        Whether the site holds genomics (its paired-only keys count).
    """

    site: str
    weights: dict[str, torch.Tensor]
    num_examples: float
    paired: bool


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def weighted_average(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts: ``sum_i w_i x_i / sum_i w_i`` per key (Flower's ``aggregate_arrayrecords``).

    Parameters
    ----------
    updates : sequence of (weights, weight)
        Every dict must hold the same keys and shapes; weights must be finite, >= 0, with a positive sum.

    Returns
    -------
    dict[str, Tensor]
        The floating-point keys only (in the first dict's order), float32 math, cast back to the input dtype.
        Non-floating tensors are not averaged and are left out.

    Raises
    ------
    ValueError
        If there are no updates, the weights are invalid, or the key sets or shapes differ.
    """
    if not updates:
        raise ValueError("weighted_average: no updates to average")
    ws = [float(w) for _, w in updates]
    if any(not (w >= 0.0) or w == float("inf") for w in ws):
        raise ValueError(f"weighted_average: weights must be finite and >= 0, got {ws}")
    total = sum(ws)
    if total <= 0.0:
        raise ValueError(f"weighted_average: the weights sum to {total}; nothing to average")
    first = updates[0][0]
    keys = [k for k, v in first.items() if _is_float(v)]
    for i, (d, _) in enumerate(updates):
        if set(d) != set(first):
            raise ValueError(f"weighted_average: update {i} has keys {sorted(set(d) ^ set(first))} not shared "
                             f"by update 0")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        acc = torch.zeros(first[k].shape, dtype=torch.float32)  # (*shape)
        for (d, _), w in zip(updates, ws):
            if d[k].shape != first[k].shape:
                raise ValueError(f"weighted_average: {k!r} has shape {tuple(d[k].shape)} in one update and "
                                 f"{tuple(first[k].shape)} in another")
            acc += d[k].detach().float().cpu() * (w / total)
        out[k] = acc.to(first[k].dtype)
    return out


@dataclass
class SharedAverage:
    """Result of :func:`aggregate_shared`.

    Attributes
    ----------
    weights : dict[str, Tensor]
        The averaged shared weights, every global key present.
    frozen : list[str]
        Keys no reply updated (paired-only keys without a paired reply; non-floating keys).
    num_examples : float
        Total training slides averaged over.
    paired_sites : int
        Replies whose paired-only keys were used.
    """

    weights: dict[str, torch.Tensor]
    frozen: list[str] = field(default_factory=list)
    num_examples: float = 0.0
    paired_sites: int = 0


def aggregate_shared(
    global_weights: Mapping[str, torch.Tensor], updates: Sequence[SharedUpdate], paired_only: Collection[str]
) -> SharedAverage:
    """FedAvg of the shared weights, with paired-only keys averaged over paired sites only.

    Parameters
    ----------
    global_weights : mapping
        The current global shared weights (defines the keys and shapes).
    updates : sequence of SharedUpdate
        Good replies only (``replies.usable_replies``), at least one.
    paired_only : collection of str
        Keys averaged over replies with ``paired=True`` (``sharing.paired_only_keys``).

    Returns
    -------
    SharedAverage

    Raises
    ------
    ReplyError
        If a reply misses a key it must send, sends an unknown key or a wrong shape.
    ValueError
        If there are no updates or the example counts sum to zero.
    """
    if not updates:
        raise ValueError("aggregate_shared: no replies to aggregate")
    paired_only = set(paired_only)
    for u in updates:
        for k, v in u.weights.items():
            if k not in global_weights:
                raise ReplyError(u.site, f"shared weights: unknown key {k!r}")
            if tuple(v.shape) != tuple(global_weights[k].shape):
                raise ReplyError(u.site, f"shared weights: {k!r} has shape {tuple(v.shape)}, expected "
                                         f"{tuple(global_weights[k].shape)}")
        need = [k for k in global_weights if (u.paired or k not in paired_only) and k not in u.weights]
        if need:
            raise ReplyError(u.site, f"shared weights: missing keys {need[:5]}{'...' if len(need) > 5 else ''}")
    floats = [k for k, v in global_weights.items() if _is_float(v)]
    common = [k for k in floats if k not in paired_only]
    genomic = [k for k in floats if k in paired_only]
    out = {k: v for k, v in global_weights.items()}
    frozen = [k for k, v in global_weights.items() if not _is_float(v)]
    if common:
        out.update(weighted_average([({k: u.weights[k] for k in common}, u.num_examples) for u in updates]))
    paired = [u for u in updates if u.paired]
    if genomic:
        if paired and sum(u.num_examples for u in paired) > 0:
            out.update(weighted_average([({k: u.weights[k] for k in genomic}, u.num_examples) for u in paired]))
        else:
            frozen += genomic
    return SharedAverage(weights={k: out[k] for k in global_weights}, frozen=frozen,
                         num_examples=float(sum(u.num_examples for u in updates)), paired_sites=len(paired))


@dataclass
class FedAvgMState:
    """Server optimiser state, checkpointed with the global model.

    Attributes
    ----------
    server_lr, server_momentum : float
        ``federation.server_lr`` and ``federation.server_momentum``.
    momentum : dict[str, Tensor] or None
        Float32 momentum buffer per floating key; None before the first step (and always when momentum is 0).
    """

    server_lr: float  # no defaults here: the config states them once
    server_momentum: float
    momentum: dict[str, torch.Tensor] | None = None

    def step(self, global_weights: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor],
             frozen: Collection[str] = (), server_round: int = 1) -> dict[str, torch.Tensor]:
        """Apply :func:`fedavgm_step`, keep the new momentum, return the new global weights (``server_round``:
        unused, FedAvgM's rule does not depend on it; the adaptive server optimisers' step does)."""
        new, self.momentum = fedavgm_step(global_weights, averaged, self.momentum, self.server_lr,
                                          self.server_momentum, frozen)
        return new

    def state_dict(self) -> dict:
        """Plain data for a checkpoint."""
        return {"kind": "fedavgm", "server_lr": self.server_lr, "server_momentum": self.server_momentum,
                "momentum": None if self.momentum is None else {k: v.clone() for k, v in self.momentum.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "FedAvgMState":
        """Inverse of :meth:`state_dict`."""
        return cls(float(state["server_lr"]), float(state["server_momentum"]), state.get("momentum"))


def fedavgm_step(
    global_weights: Mapping[str, torch.Tensor],
    averaged: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    server_lr: float,
    server_momentum: float,
    frozen: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One server step of FedAvgM (see the module docstring for the exact rule and its Flower equivalence).

    Parameters
    ----------
    global_weights : mapping
        w, the global shared weights the round started from.
    averaged : mapping
        The averaged replies (same keys; ``SharedAverage.weights``).
    momentum : mapping or None
        The momentum buffer from the previous step; None before the first.
    server_lr, server_momentum : float
        lr and beta.
    frozen : collection of str
        Keys that keep their weight and momentum this step.

    Returns
    -------
    new_weights : dict[str, Tensor]
        Every key of ``global_weights``, in its dtype.
    new_momentum : dict[str, Tensor] or None
        Float32 buffers for the floating keys; None when ``server_momentum == 0``.

    Raises
    ------
    ConfigError
        If the momentum buffer's keys or shapes do not match the weights (a checkpoint from another sharing policy).
    """
    if set(averaged) != set(global_weights):
        raise ValueError(f"fedavgm_step: averaged keys differ from the global keys: "
                         f"{sorted(set(averaged) ^ set(global_weights))[:5]}")
    if server_momentum < 0.0 or server_lr <= 0.0:
        raise ConfigError(f"federation.server_momentum must be >= 0 and federation.server_lr > 0, got "
                          f"{server_momentum} and {server_lr}")
    frozen = set(frozen)
    new: dict[str, torch.Tensor] = {}
    new_m: dict[str, torch.Tensor] | None = {} if server_momentum > 0.0 else None
    server_opt = server_momentum != 0.0 or server_lr != 1.0
    for k, w in global_weights.items():
        if not _is_float(w) or k in frozen:
            new[k] = w
            if new_m is not None and _is_float(w):
                old = None if momentum is None else momentum.get(k)
                new_m[k] = torch.zeros(w.shape) if old is None else old
            continue
        if not server_opt:
            new[k] = averaged[k].to(w.dtype)
            continue
        w32 = w.detach().float().cpu()  # (*shape)
        d = w32 - averaged[k].detach().float().cpu()  # (*shape) pseudo-gradient
        if new_m is not None:
            if momentum is None:
                m = d  # Flower initialises the buffer with the first pseudo-gradient
            else:
                if k not in momentum or tuple(momentum[k].shape) != tuple(w.shape):
                    raise ConfigError(f"server momentum buffer has no matching entry for {k!r}: the checkpoint was "
                                      f"made with another federation.shared policy or model (fix: resume with the "
                                      f"same config)")
                m = server_momentum * momentum[k].float() + d
            new_m[k] = m
            d = m
        new[k] = (w32 - server_lr * d).to(w.dtype)
    return new, new_m
