"""Where and how tensors compute: device choice, bf16 autocast, CPU threads and seeding."""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from .config import TrainConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(train_cfg: TrainConfig) -> torch.device:
    """Return the torch device named by ``train.device`` ("auto" = CUDA when present, else CPU).

    Raises
    ------
    ConfigError
        ``train.device: cuda`` on a machine without a usable CUDA device.
    """
    want = train_cfg.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available "
                          "(fix: set train.device to 'auto' or 'cpu')")
    return torch.device(want)


def autocast_context(device: torch.device, precision: str):
    """Context manager for the forward pass and loss.

    ``bf16``: torch autocast to bfloat16 on CPU or CUDA; parameters (master weights), gradients and optimiser
    state stay float32. ``fp32``: a null context.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.precision: {precision!r} is not allowed; allowed values: 'fp32', 'bf16'")


def set_threads(n: int) -> None:
    """Set torch's intra-op CPU threads; 0 keeps torch's default."""
    if n < 0:
        raise ConfigError(f"train.threads: must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) global generators.

    On CPU this makes training bit-for-bit repeatable (the ops used are deterministic there); on CUDA,
    scatter-based reductions may still differ in the last bits between runs.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
