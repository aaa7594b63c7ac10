"""What leaves a site: sort a model state dict into shared, memory and site-private parts.

The policy is a list of key prefixes in :class:`~momkd_fed.config.FederationConfig`:

- ``memory.*`` keys (slots and the aggregate buffers) always form the **memory** group: they are never averaged as
  weights; they travel as memory aggregates (``memory_merge``).
- keys matching a ``fed.shared`` prefix form the **shared** group (averaged by the server);
- everything else is **private** (by default: ``classifier.``, ``log_tau``, ``omics_decoder.``) and never leaves
  the site.

``fed.paired_only`` names the shared prefixes averaged over paired (genomics-holding) sites only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..config import FederationConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

MEMORY_PREFIX = "memory."  # every state-dict key of the prototype memory starts with this


@dataclass
class SharedPartition:
    """A state dict split into three disjoint groups (values are the original tensors, not copies).

    Attributes
    ----------
    shared : dict[str, Tensor]
        Keys matching ``fed.shared``: sent to and averaged by the server.
    memory : dict[str, Tensor]
        ``memory.*`` keys: merged by ``memory_merge`` from aggregates, never averaged as weights.
    private : dict[str, Tensor]
        Everything else: stays on the site.
    """

    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    private: dict[str, torch.Tensor] = field(default_factory=dict)


def _prefix_hits_memory(prefix: str) -> bool:
    """True when ``prefix`` could match a ``memory.*`` key (it is a prefix of, or lies inside, ``memory.``)."""
    return MEMORY_PREFIX.startswith(prefix) or prefix.startswith(MEMORY_PREFIX)


def check_prefixes(fed: FederationConfig) -> None:
    """Reject sharing prefixes that would send the memory as averaged weights.

    Raises
    ------
    ConfigError
        If a ``federation.shared`` or ``federation.paired_only`` prefix is empty or matches ``memory.*`` keys.
    """
    for name, prefixes in (("federation.shared", fed.shared), ("federation.paired_only", fed.paired_only)):
        for p in prefixes:
            if _prefix_hits_memory(p):
                raise ConfigError(
                    f"{name}: prefix {p!r} matches the memory keys ({MEMORY_PREFIX}*); the memory is always merged "
                    f"from its aggregates, never averaged as weights (fix: remove {p!r} or make it more specific)"
                )


def validate_sharing(keys: Iterable[str], fed: FederationConfig) -> list[str]:
    """Check the sharing policy against a model's state-dict keys; call once at start-up.

    Parameters
    ----------
    keys : iterable of str
        The model's state-dict keys.
    fed : FederationConfig

    Returns
    -------
    list of str
        Warnings (also logged): shared prefixes matching no key, paired-only prefixes matching no shared key.

    Raises
    ------
    ConfigError
        As :func:`check_prefixes`.
    """
    check_prefixes(fed)
    keys = list(keys)
    shared = [k for k in keys if not k.startswith(MEMORY_PREFIX) and _matches(k, fed.shared)]
    warnings = []
    for p in fed.shared:
        if not any(k.startswith(p) for k in keys):
            warnings.append(f"federation.shared: prefix {p!r} matches no model parameter; it shares nothing")
    for p in fed.paired_only:
        if not any(k.startswith(p) for k in shared):
            warnings.append(
                f"federation.paired_only: prefix {p!r} matches no shared parameter; it has no effect "
                f"(a paired-only prefix must also be covered by federation.shared)"
            )
    for w in warnings:
        log.warning(w)
    return warnings


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def partition_state(state: Mapping[str, torch.Tensor], fed: FederationConfig) -> SharedPartition:
    """Sort a state dict into shared / memory / private; every key lands in exactly one group.

    Parameters
    ----------
    state : mapping str -> Tensor
        A model ``state_dict()`` (order is preserved within each group).
    fed : FederationConfig
        ``fed.shared`` prefixes select the shared group.

    Returns
    -------
    SharedPartition

    Raises
    ------
    ConfigError
        If a prefix would match the memory keys (:func:`check_prefixes`).
    """
    check_prefixes(fed)
    part = SharedPartition()
    for key, value in state.items():
        if key.startswith(MEMORY_PREFIX):
            part.memory[key] = value
        elif _matches(key, fed.shared):
            part.shared[key] = value
        else:
            part.private[key] = value
    return part


def paired_only_keys(keys: Iterable[str], fed: FederationConfig) -> list[str]:
    """The keys (among ``keys``) averaged over paired sites only: those matching a ``fed.paired_only`` prefix.

    Memory keys are never paired-only (they are not averaged as weights at all).
    """
    return [k for k in keys if not k.startswith(MEMORY_PREFIX) and _matches(k, fed.paired_only)]


def histology_only_part(shared: Mapping[str, torch.Tensor], fed: FederationConfig) -> dict[str, torch.Tensor]:
    """``shared`` without the paired-only keys: what a histology-only site sends and is sent."""
    drop = set(paired_only_keys(shared, fed))
    return {k: v for k, v in shared.items() if k not in drop}


def classifier_shared(shared_prefixes: Iterable[str]) -> bool:
    """Whether the classifier head is shared (the global model then has a trained classifier)."""
    return any(p.startswith("classifier") for p in shared_prefixes)


def overlay_state(
    local: Mapping[str, torch.Tensor], incoming: Mapping[str, torch.Tensor], what: str = "shared weights",
    allow_missing: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Return a copy of ``local`` with the ``incoming`` tensors put in place (site-private keys kept).

    Use it on a site to load the server's shared weights and memory into the local state before
    ``model.load_state_dict``; values are cast to the local dtype. ``allow_missing`` names incoming keys the
    local model may lack (e.g. :func:`paired_only_keys` for a model built without genomics); they are skipped.

    Raises
    ------
    ConfigError
        If an incoming key is unknown locally or its shape differs: the site's model settings differ from the
        federation's.
    """
    out = dict(local)
    skip = set(allow_missing)
    for key, value in incoming.items():
        if key not in local and key in skip:
            continue
        if key not in local:
            raise ConfigError(
                f"{what}: the server sent {key!r}, which this site's model does not have "
                f"(fix: use the federation's model.* settings at every site)"
            )
        if tuple(value.shape) != tuple(local[key].shape):
            raise ConfigError(
                f"{what}: {key!r} has shape {tuple(value.shape)} at the server but {tuple(local[key].shape)} here "
                f"(fix: use the federation's model.* settings at every site)"
            )
        out[key] = value.detach().to(dtype=local[key].dtype, device=local[key].device).clone()
    return out
