"""Mixed precision: where the model leaves autocast and computes in float32."""

from __future__ import annotations

import torch
from torch import Tensor


def full_precision(like: Tensor) -> torch.autocast:
    """Context that disables autocast on ``like``'s device type (run the enclosed ops in their input dtype).

    The histology encoder is the only part that benefits from bf16; heads, memory scoring, softmax, normalisation
    and losses are cheap and run in float32 inside this context so that their results are exact.
    """
    return torch.autocast(device_type=like.device.type, enabled=False)


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (so gradcheck in double stays double)."""
    return torch.promote_types(t.dtype, torch.float32)
