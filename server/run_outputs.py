"""Per-round checkpoints of the federation, the final ``global_model.pt`` and the best round's ``best_model.pt``
(resume reads them back).

A round checkpoint is a regular momkd-fed checkpoint (``momkd_fed.checkpoint``: weights, config, dims, versions)
of the *global model* -- the seeded initial model with the global shared weights and the global memory put in
place (site-private parts at their initial values) -- plus, under ``extra``, everything the server needs to
continue: the FedAvgM momentum, the genomic statistics, the run key, the round's metrics and the privacy budget
spent so far (the server's update-DP accountant and each site's last reported memory epsilon) and the best round so
far (``federation.selection.BestRound``). Like every checkpoint it says which heads are trained
(``heads.global_model_heads``: the memory head; the classifier only where ``federation.shared`` shares it), its
``primary_head``, and the calibration of each trained head fitted on the round's pooled validation histograms
(``calibration.calibrate_pooled``), which ``predict`` applies. It is therefore both resumable and loadable by
``momkd-fed predict``; ``best_model.pt`` and ``global_model.pt`` carry the calibration of their own round.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from momkd_fed.calibration import DEFAULT_THRESHOLD
from momkd_fed.checkpoint import read_checkpoint, save_checkpoint
from momkd_fed.config import Config
from momkd_fed.errors import CheckpointError
from momkd_fed.federation.aggregate import FedAvgMState
from momkd_fed.federation.memory_merge import SLOTS_KEY
from momkd_fed.federation.selection import BestRound
from momkd_fed.heads import global_model_heads, primary_head
from momkd_fed.privacy import PrivacyAccountant, update_dp
from momkd_fed.run_log import BEST_MODEL_FILE, CHECKPOINT_DIR, GLOBAL_MODEL_FILE

from client.site_runtime import build_initial_model
from .server_opt import FlowerServerOpt, server_optimizer

log = logging.getLogger(__name__)

KEEP = 3  # round checkpoints kept (the final model is also in global_model.pt)
_NAME = re.compile(r"^round_(\d{4,})\.pt$")


@dataclass
class ServerState:
    """Everything the coordinator carries from round to round.

    Attributes
    ----------
    round : int
        Last completed round (0 after setup).
    shared : dict[str, Tensor]
        Global shared weights.
    slots : Tensor or None
        (2, K, S) global memory (None for a model without memory).
    momentum : FedAvgMState or FlowerServerOpt
        Server optimiser state (``server_opt.server_optimizer``).
    n_genes : int
        Genes of the federation's genomic branch (0 = none).
    omics_mean, omics_std : ndarray or None
        (G,) pooled z-score statistics.
    run_key : str
        Identifies the run across a resume (sites key their private state by it).
    sites : dict[str, dict]
        What each site said about itself at setup (paired, slides).
    accountant : PrivacyAccountant or None
        The server's accountant of the shared-weight update noise (update DP only; stepped once per round).
    site_epsilon : dict[str, float]
        Site -> its cumulated memory-DP epsilon as last reported (``privacy_epsilon`` train metric).
    best : BestRound
        The round with the best pooled validation AUC so far (its model is in ``best_model.pt``).
    calibration : dict[str, dict]
        Head -> ``Calibration.to_dict()`` of the global model of ``round``, fitted on that round's pooled
        validation histograms ({} before round 1, or when no site sent usable counts).
    """

    round: int
    shared: dict[str, torch.Tensor]
    slots: torch.Tensor | None
    momentum: FedAvgMState | FlowerServerOpt
    n_genes: int
    omics_mean: np.ndarray | None
    omics_std: np.ndarray | None
    run_key: str
    sites: dict[str, dict] = field(default_factory=dict)
    accountant: PrivacyAccountant | None = None
    site_epsilon: dict[str, float] = field(default_factory=dict)
    best: BestRound = field(default_factory=BestRound)
    calibration: dict[str, dict] = field(default_factory=dict)


def new_accountant(cfg: Config) -> PrivacyAccountant | None:
    """The server's update-DP accountant (None unless ``privacy.enabled`` with update noise)."""
    if not update_dp(cfg):
        return None
    return PrivacyAccountant(cfg.privacy.update_noise_multiplier, cfg.privacy.delta)


def global_model(cfg: Config, state: ServerState) -> torch.nn.Module:
    """The global model: seeded initial model <- shared weights <- global memory."""
    model = build_initial_model(cfg, state.n_genes)
    sd = model.state_dict()
    sd.update({k: v.to(sd[k].dtype) for k, v in state.shared.items()})
    if state.slots is not None and SLOTS_KEY in sd:
        sd[SLOTS_KEY] = state.slots.to(sd[SLOTS_KEY].dtype)
    model.load_state_dict(sd)
    return model


def _save(path: Path, cfg: Config, state: ServerState, metrics: dict | None, kind: str) -> Path:
    heads = global_model_heads(cfg)
    norm = None
    if state.omics_mean is not None and state.omics_std is not None:
        norm = (torch.from_numpy(state.omics_mean), torch.from_numpy(state.omics_std))
    return save_checkpoint(
        path, global_model(cfg, state), cfg, feature_dim=cfg.data.feature_dim, n_genes=state.n_genes,
        omics_norm=norm,
        extra={"round": state.round, "metrics": metrics or {}, "kind": kind, "run_key": state.run_key,
               "server_momentum": state.momentum.state_dict(), "sites": state.sites,
               "privacy": {"update_accountant": state.accountant.state_dict() if state.accountant else None,
                           "site_epsilon": dict(state.site_epsilon)},
               "best_round": state.best.state_dict(),
               "heads": heads, "primary_head": primary_head(heads), "calibration": dict(state.calibration),
               "threshold": {h: float(state.calibration[h]["threshold"]) if h in state.calibration
                             else DEFAULT_THRESHOLD[h] for h in DEFAULT_THRESHOLD}})


def save_round(run_dir: str | Path, cfg: Config, state: ServerState, metrics: dict | None = None) -> Path:
    """Write ``checkpoints/round_NNNN.pt``; keep the newest :data:`KEEP`."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    path = _save(ckpt_dir / f"round_{state.round:04d}.pt", cfg, state, metrics, "federated-round")
    for r in checkpoint_rounds(run_dir)[:-KEEP]:
        (ckpt_dir / f"round_{r:04d}.pt").unlink(missing_ok=True)
    return path


def save_global_model(run_dir: str | Path, cfg: Config, state: ServerState, metrics: dict | None = None) -> Path:
    """Write ``global_model.pt`` (loadable by ``momkd-fed predict``)."""
    return _save(Path(run_dir) / GLOBAL_MODEL_FILE, cfg, state, metrics, "federated-global")


def save_best_model(run_dir: str | Path, cfg: Config, state: ServerState, metrics: dict | None = None) -> Path:
    """Write ``best_model.pt``: the global model of ``state`` (call it when ``state.best`` has just taken the
    current round)."""
    return _save(Path(run_dir) / BEST_MODEL_FILE, cfg, state, metrics, "federated-best")


def restore_best_model(run_dir: str | Path, cfg: Config, state: ServerState) -> None:
    """On resume: rewrite ``best_model.pt`` from ``state`` (the newest round checkpoint) when that round is the
    best one but the run stopped before ``best_model.pt`` was written (it is written just after the checkpoint)."""
    path = Path(run_dir) / BEST_MODEL_FILE
    if state.best.round != state.round or state.round == 0:
        return
    if path.is_file() and read_checkpoint(path).get("round") == state.round:
        return
    log.warning("resume: %s was not written for round %d; writing it from the round checkpoint", path, state.round)
    save_best_model(run_dir, cfg, state)


def checkpoint_rounds(run_dir: str | Path) -> list[int]:
    """Rounds with a checkpoint in the run folder, ascending."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name)))


def load_latest(run_dir: str | Path, cfg: Config) -> ServerState | None:
    """The :class:`ServerState` of the newest round checkpoint, or None if the folder has none.

    Raises
    ------
    CheckpointError
        The checkpoint was made with another model or sharing config.
    """
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        return None
    path = Path(run_dir) / CHECKPOINT_DIR / f"round_{rounds[-1]:04d}.pt"
    ckpt = read_checkpoint(path)
    extra = ckpt.get("extra") or {}
    if "run_key" not in extra:
        raise CheckpointError(f"{path}: not a federated round checkpoint (no run_key)")
    from momkd_fed.federation.sharing import partition_state

    sd = ckpt["state_dict"]
    part = partition_state(sd, cfg.federation)
    template = build_initial_model(cfg, int(ckpt["n_genes"])).state_dict()
    bad = sorted(set(template) ^ set(sd))
    if bad:
        raise CheckpointError(f"{path}: made with another model config (keys differ: {bad[:5]}); resume with "
                              f"the run's config.yaml")
    norm = ckpt.get("omics_norm")
    mom = extra.get("server_momentum") or {}
    privacy = extra.get("privacy") or {}
    accountant = new_accountant(cfg)
    if accountant is not None and privacy.get("update_accountant"):
        accountant.load_state_dict(privacy["update_accountant"])  # the budget already spent is kept
        accountant.noise_multiplier = cfg.privacy.update_noise_multiplier  # future steps: current settings
        accountant.delta = cfg.privacy.delta
    return ServerState(
        round=int(ckpt["round"]), shared=dict(part.shared), slots=sd.get(SLOTS_KEY),
        momentum=server_optimizer(cfg, mom or None),
        n_genes=int(ckpt["n_genes"]),
        omics_mean=None if norm is None else norm["mean"].numpy(),
        omics_std=None if norm is None else norm["std"].numpy(),
        run_key=str(extra["run_key"]), sites=dict(extra.get("sites") or {}), accountant=accountant,
        site_epsilon={str(k): float(v) for k, v in (privacy.get("site_epsilon") or {}).items()},
        best=BestRound.from_state_dict(extra.get("best_round")),
        calibration=dict(ckpt.get("calibration") or {}))


def clear_run_outputs(run_dir: str | Path) -> None:
    """Remove a previous run's checkpoints and logs from ``run_dir`` (a fresh, non-resumed run)."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    for name in ("rounds.jsonl", "summary.json", GLOBAL_MODEL_FILE, BEST_MODEL_FILE):
        p = run_dir / name
        if p.exists():
            os.remove(p)
