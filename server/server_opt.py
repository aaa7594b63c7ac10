"""The server's step on the averaged shared weights (``federation.server_optimizer``).

- ``fedavgm`` (default): ``momkd_fed.federation.aggregate.FedAvgMState``, Flower's FedAvgM rule re-stated in torch
  (server momentum 0 and server lr 1 = plain FedAvg).
- ``fedadam`` / ``fedyogi``: Flower's own ``FedAdam`` / ``FedYogi`` (Reddi et al., ICLR 2021, "Adaptive
  Federated Optimization"). Their maths is reused as Flower ships it, not re-written: Flower's ``aggregate_train``
  first averages the replies (``FedAvg``) and then takes the adaptive step; :class:`_Averaged` stands in for the
  averaging in the method resolution order, so Flower's step runs on *our* average (slide-weighted, the genomic
  encoder over paired sites only, robust or DP aggregators) unchanged. ``federation.server_lr`` is Flower's
  ``eta``, ``server_beta1`` / ``server_beta2`` / ``server_tau`` its ``beta_1`` / ``beta_2`` / ``tau``. Keys no
  reply updated this round (``frozen``) keep their weight and their moments, as FedAvgMState does.

Both kinds expose ``step(global_weights, averaged, frozen, server_round)``, ``state_dict()`` and are rebuilt from a
round checkpoint by :func:`server_optimizer` (the moments are checkpointed, so a resumed run continues exactly).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from momkd_fed.config import Config
from momkd_fed.errors import CheckpointError
from momkd_fed.federation.aggregate import FedAvgMState


class _Averaged(FedOpt):
    """Takes the place of Flower's averaging: ``aggregate_train(round, arrays)`` returns ``arrays`` as the average."""

    def aggregate_train(self, server_round, replies):  # type: ignore[override]
        return replies, None


class _FedAdam(FedAdam, _Averaged):
    """Flower's FedAdam step on an average computed elsewhere (MRO: FedAdam -> _Averaged -> FedOpt)."""


class _FedYogi(FedYogi, _Averaged):
    """Flower's FedYogi step on an average computed elsewhere (MRO: FedYogi -> _Averaged -> FedOpt)."""


_FLOWER = {"fedadam": _FedAdam, "fedyogi": _FedYogi}


class FlowerServerOpt:
    """FedAdam or FedYogi on the shared weights, by Flower's strategies (see the module docstring).

    Parameters
    ----------
    kind : str
        ``"fedadam"`` or ``"fedyogi"``.
    eta, beta_1, beta_2, tau : float
        Flower's parameters (``federation.server_lr``, ``server_beta1``, ``server_beta2``, ``server_tau``).
    """

    def __init__(self, kind: str, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        if kind not in _FLOWER:
            raise ValueError(f"server optimiser: unknown kind {kind!r}; allowed: {', '.join(_FLOWER)}")
        self.kind = kind
        self.opt = _FLOWER[kind](eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step(self, global_weights: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor],
             frozen: Collection[str] = (), server_round: int = 1) -> dict[str, torch.Tensor]:
        """One adaptive server step; returns the new global weights (every key, in its dtype).

        ``server_round`` enters Flower's bias correction (as in a Flower run, where it is the round number).
        """
        if set(averaged) != set(global_weights):
            raise ValueError(f"server step: averaged keys differ from the global keys: "
                             f"{sorted(set(averaged) ^ set(global_weights))[:5]}")
        frozen = set(frozen)
        keys = [k for k, w in global_weights.items() if torch.is_floating_point(w)]
        old_m = {k: self.opt.m_t[k].copy() for k in frozen if self.opt.m_t and k in self.opt.m_t}
        old_v = {k: self.opt.v_t[k].copy() for k in frozen if self.opt.v_t and k in self.opt.v_t}
        current = {k: global_weights[k].detach().float().cpu().numpy() for k in keys}
        avg = {k: (current[k] if k in frozen else averaged[k].detach().float().cpu().numpy()) for k in keys}
        self.opt.current_arrays = current
        record, _ = self.opt.aggregate_train(server_round, ArrayRecord({k: _array(v) for k, v in avg.items()}))
        self.opt.m_t.update(old_m)  # frozen keys keep their moments
        if self.opt.v_t is not None:
            self.opt.v_t.update(old_v)
        new = {k: w for k, w in global_weights.items()}
        for k in keys:
            if k not in frozen:
                new[k] = torch.from_numpy(np.asarray(record[k].numpy(), dtype=np.float32)).to(global_weights[k].dtype)
        return new

    def state_dict(self) -> dict:
        """Plain data for a checkpoint: the kind, the settings and Flower's moments (float32 tensors)."""
        def tensors(d):
            return None if not d else {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in d.items()}

        o = self.opt
        return {"kind": self.kind, "server_lr": o.eta, "beta_1": o.beta_1, "beta_2": o.beta_2, "tau": o.tau,
                "m_t": tensors(o.m_t), "v_t": tensors(o.v_t)}

    def load_moments(self, state: Mapping) -> None:
        """Restore the moments of :meth:`state_dict` (settings come from the config)."""
        for name in ("m_t", "v_t"):
            d = state.get(name)
            setattr(self.opt, name, None if not d else {k: v.float().numpy().copy() for k, v in d.items()})


def _array(x: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(x, dtype=np.float32))


def server_optimizer(cfg: Config, state: Mapping | None = None) -> FedAvgMState | FlowerServerOpt:
    """The configured server optimiser, fresh or (``state``: a checkpoint's ``server_momentum``) restored.

    Raises
    ------
    CheckpointError
        The checkpoint was made with another ``federation.server_optimizer``.
    """
    fed = cfg.federation
    saved_kind = (state or {}).get("kind", "fedavgm") if state else None
    if saved_kind is not None and saved_kind != fed.server_optimizer:
        raise CheckpointError(f"the round checkpoint was made with federation.server_optimizer: {saved_kind}, the "
                              f"config says {fed.server_optimizer} (fix: resume with the run's config.yaml)")
    if fed.server_optimizer == "fedavgm":
        return FedAvgMState.from_state_dict(state) if state else FedAvgMState(fed.server_lr, fed.server_momentum)
    opt = FlowerServerOpt(fed.server_optimizer, fed.server_lr, fed.server_beta1, fed.server_beta2, fed.server_tau)
    if state:
        opt.load_moments(state)
    return opt
