"""Self-describing checkpoints: weights (memory included), the full config, dims, versions and metrics.

A checkpoint is rebuilt from its own contents alone (nanoGPT style): ``load_model(path)`` needs nothing else.
Files are written atomically (a temp file renamed into place), so a crash never leaves a half-written one.
Loading uses ``torch.load(weights_only=True)``: only tensors and plain data are unpickled.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import Config, config_from_dict, to_dict
from .errors import CheckpointError, MomkdError

FORMAT = "momkd-fed-checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of momkd-fed, torch and Python that wrote a checkpoint."""
    return {"momkd_fed": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def _plain(value: Any) -> Any:
    """Make ``value`` loadable with ``weights_only=True``: numpy -> tensors/floats, tuples -> lists."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: Config,
    *,
    feature_dim: int,
    n_genes: int,
    omics_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` and everything needed to rebuild it to ``path`` (atomic).

    Parameters
    ----------
    feature_dim, n_genes : int
        The dims ``build_model`` needs (``n_genes = 0``: no genomic branch).
    omics_norm : (mean (G,), std (G,)), optional
        Genomic z-score statistics used in training (informational: inference is histology-only).
    extra : dict, optional
        Plain data stored alongside, e.g. ``round``, ``epoch``, ``metrics``, ``threshold``, ``genes``. Keys
        ``round``, ``epoch``, ``metrics``, ``threshold``, ``heads``, ``primary_head`` and ``calibration`` are
        lifted to the top level of the metadata: ``heads`` = ``{"classifier": "trained" | "untrained"[,
        "memory": "trained"]}`` and ``primary_head`` (the head ``predict`` answers with) as
        :mod:`momkd_fed.heads` defines them; ``calibration`` = ``{head: Calibration.to_dict()}``
        (:mod:`momkd_fed.calibration`), the calibrated probability and decision threshold of each trained head.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": to_dict(cfg),
        "feature_dim": int(feature_dim),
        "n_genes": int(n_genes),
        "omics_norm": None if omics_norm is None else {
            "mean": torch.as_tensor(omics_norm[0], dtype=torch.float32).cpu(),
            "std": torch.as_tensor(omics_norm[1], dtype=torch.float32).cpu(),
        },
        "versions": versions(),
        "round": extra.pop("round", None),
        "epoch": extra.pop("epoch", None),
        "metrics": _plain(extra.pop("metrics", {})),
        "threshold": _plain(extra.pop("threshold", None)),
        "heads": _plain(extra.pop("heads", None)),
        "primary_head": extra.pop("primary_head", None),
        "calibration": _plain(extra.pop("calibration", None)),
        "extra": _plain(extra),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint's raw contents (dict with ``state_dict``, ``config``, ...).

    Raises
    ------
    CheckpointError
        Missing file, unreadable file, or not a momkd-fed checkpoint (naming the file and the problem).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files; re-raise as one typed error
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a momkd-fed checkpoint (no format tag {FORMAT!r}); "
                              "was it written by save_checkpoint?")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')!r}, this "
                              f"momkd-fed reads version {FORMAT_VERSION}")
    missing = [k for k in ("state_dict", "config", "feature_dim", "n_genes") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return ckpt


def load_state(model: nn.Module, state_dict: dict, source: str | Path) -> None:
    """``model.load_state_dict(strict=True)``, turning key/shape mismatches into a CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Rebuild the model from a checkpoint's embedded config and load its weights (eval mode).

    Returns
    -------
    model : nn.Module on ``map_location``, in eval mode
    cfg : Config, the config it was trained with
    meta : dict, everything in the checkpoint except the weights (``versions``, ``round``, ``epoch``,
        ``metrics``, ``threshold``, ``heads``, ``primary_head``, ``calibration``, ``feature_dim``, ``n_genes``,
        ``omics_norm``, ``extra``, ``config``; files written before heads were recorded lack those three)
    """
    from .model import build_model

    ckpt = read_checkpoint(path, map_location)
    try:
        cfg = config_from_dict(ckpt["config"])
    except MomkdError as exc:
        raise CheckpointError(f"{path}: embedded config is invalid for this momkd-fed: {exc}") from exc
    try:
        model = build_model(cfg, int(ckpt["feature_dim"]), int(ckpt["n_genes"]))
    except MomkdError as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from its config: {exc}") from exc
    load_state(model, ckpt["state_dict"], path)
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, cfg, meta

