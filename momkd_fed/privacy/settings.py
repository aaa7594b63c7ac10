"""Cross-field checks of ``privacy.*`` and what the reported epsilon covers (call once at start-up, server and site).

Types and unknown keys are checked by ``momkd_fed.config``; this adds the rules that combine sections.
"""

from __future__ import annotations

import math

from ..config import Config
from ..errors import ConfigError


def check_privacy(cfg: Config) -> None:
    """Reject privacy settings that would not mean what they say.

    Raises
    ------
    ConfigError
        Naming the key and the fix, when: a bound or multiplier is out of range; ``privacy.enabled`` with
        ``memory.update: gradient`` (trained slot vectors have no bounded per-slide sensitivity, so no DP
        guarantee could be given for them); update noise without update clipping; update noise with a robust
        aggregator (the noise is calibrated to the mean's sensitivity).
    """
    p = cfg.privacy
    if p.min_slot_embeddings < 0:
        raise ConfigError(f"privacy.min_slot_embeddings: must be >= 0, got {p.min_slot_embeddings}")
    for name in ("clip_norm", "noise_multiplier"):
        v = getattr(p, name)
        if not (v > 0.0 and math.isfinite(v)):
            raise ConfigError(f"privacy.{name}: must be a finite number > 0, got {v}")
    if not 0.0 < p.delta < 1.0:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {p.delta} (fix: use a value well below 1 / number "
                          f"of slides, e.g. 1e-5)")
    for name in ("update_clip_norm", "update_noise_multiplier", "max_update_norm_factor", "update_norm_floor"):
        v = getattr(p, name)
        if not (v >= 0.0 and math.isfinite(v)):
            raise ConfigError(f"privacy.{name}: must be a finite number >= 0 (0 = off), got {v}")
    if not 0.0 <= p.trim_fraction < 0.5:
        raise ConfigError(f"privacy.trim_fraction: must be in [0, 0.5), got {p.trim_fraction}")
    if p.enabled and cfg.memory.update == "gradient":
        raise ConfigError("privacy.enabled: differential privacy of the memory needs memory.update 'ema' (sites then "
                          "send clipped, noised slot sums) or 'frozen'; in 'gradient' mode the trained slot vectors "
                          "have no bounded per-slide sensitivity (fix: set memory.update: ema, or privacy.enabled: "
                          "false)")
    if p.update_noise_multiplier > 0.0 and p.update_clip_norm <= 0.0:
        raise ConfigError("privacy.update_noise_multiplier: update noise needs privacy.update_clip_norm > 0 (the noise "
                          "is calibrated to the clip bound)")
    if p.enabled and p.update_noise_multiplier > 0.0 and p.aggregator != "mean":
        raise ConfigError(f"privacy.aggregator: {p.aggregator!r} cannot be combined with update noise "
                          f"(privacy.update_noise_multiplier > 0), which is calibrated to the mean (fix: aggregator: "
                          f"mean, or update_noise_multiplier: 0)")


def update_dp(cfg: Config) -> bool:
    """True when the server adds DP noise to the mean of the clipped shared-weight updates."""
    return cfg.privacy.enabled and cfg.privacy.update_noise_multiplier > 0.0


def memory_dp(cfg: Config) -> bool:
    """True when sites release clipped, noised memory aggregates."""
    return cfg.privacy.enabled and cfg.memory.update == "ema"


def dp_covers(cfg: Config) -> list[str]:
    """What the reported epsilons cover, for logs and the audit: a subset of ``["memory", "shared_weights"]``.

    Everything else a site sends (metrics, k-means initialisation statistics, genomic moments, and the shared
    weights when update noise is off) is *not* covered.
    """
    out = []
    if memory_dp(cfg):
        out.append("memory")
    if update_dp(cfg):
        out.append("shared_weights")
    return out
