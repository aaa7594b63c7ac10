"""Server side: check every train reply before aggregation; a rejected reply is logged and the round goes on.

:func:`validate_replies` first applies ``federation.replies.usable_replies`` (error replies, metric contract,
no training slides, unknown/missing keys, shapes, non-finite values, negative counts) and then:

- **update norm** (when ``privacy.max_update_norm_factor > 0``): ``r_i = ||w_i - w_global||`` over the floating
  shared keys the site sent must satisfy ``r_i <= max(privacy.update_norm_floor, factor * median_{j != i} r_j)``.
  The median is over the *other* kept replies (leave-one-out), so with two sites a poisoned one is still compared
  with the honest one (a two-value median including itself would always pass); with a single reply the check is
  skipped. Sites train different numbers of slides, so honest norms differ; the default factor (20) is lenient on
  purpose and catches scaled model-replacement updates, not subtle poisoning (use a robust aggregator for that).
- **memory, exact mode** (DP off): ``counts`` and ``slides`` (``usage`` in gradient mode) integral; ``slides <=
  counts`` (a slide that uses a slot adds at least one embedding); ``counts > 0`` implies ``slides >= 1``; sums
  consistent with unit vectors: ``||sums[c, k]|| <= counts[c, k] * (1 + 1e-4) + 1e-4``.
- **memory, DP mode** (``memory_noised=True``): noise makes counts fractional and sums inconsistent, so only:
  counts of sent slots >= 0 (already checked), and zero counts carry zero sums (a site withholds a slot entirely).

Rejections are returned as ``(site, reason)`` pairs, the same shape as ``usable_replies``' dropped list, and are
logged at WARNING with the site's name.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from ..config import PrivacyConfig
from ..federation import contract
from ..federation.replies import SiteReply, usable_replies
from .clipping import tensor_norm, update_delta

log = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-4  # relative and absolute slack of the ||sum|| <= count check (float32 accumulation)


def update_norms(replies: Sequence[SiteReply], global_shared: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Site -> ``||w_site - w_global||`` over the floating keys the site sent."""
    return {r.site: tensor_norm(update_delta(r.shared, global_shared)) for r in replies}


def _integral(t: torch.Tensor) -> bool:
    return bool((t == t.round()).all())


def memory_problem(memory: Mapping[str, torch.Tensor], memory_mode: str, noised: bool) -> str | None:
    """Why a (shape-checked, finite) memory record is implausible, or None."""
    if memory_mode == "frozen":
        return None
    weight_key = contract.COUNTS if memory_mode == "ema" else contract.USAGE
    w = memory[weight_key].double()  # (2, K)
    if noised:
        if memory_mode == "ema":
            zero = w == 0  # (2, K)
            if bool((memory[contract.SUMS].double().abs().sum(dim=-1)[zero] > 0).any()):
                return "memory: a slot with zero count carries a non-zero sum"
        return None
    slides = memory[contract.SLIDES].double()  # (2, K)
    for key, t in ((weight_key, w), (contract.SLIDES, slides)):
        if not _integral(t):
            return f"memory: {key!r} must be whole numbers without privacy noise"
    if bool((slides > w).any()):
        return f"memory: more slides than {weight_key} in a slot (each slide adds at least one embedding)"
    if bool(((w > 0) & (slides < 1)).any()):
        return f"memory: a slot with {weight_key} > 0 but no slide behind it"
    if memory_mode == "ema":
        norms = memory[contract.SUMS].double().norm(dim=-1)  # (2, K)
        if bool((norms > w * (1 + SUM_TOLERANCE) + SUM_TOLERANCE).any()):
            return "memory: a slot sum is longer than its count allows for unit-length embeddings"
    return None


def validate_replies(
    replies: Sequence[SiteReply],
    global_shared: Mapping[str, torch.Tensor],
    memory_mode: str,
    paired_only: Sequence[str],
    memory_shape: tuple[int, int, int] | None,
    privacy: PrivacyConfig,
    memory_noised: bool = False,
) -> tuple[list[SiteReply], list[tuple[str, str]]]:
    """``usable_replies`` plus the plausibility checks of the module docstring.

    Parameters
    ----------
    replies : sequence of SiteReply
        Every reply of the round, error replies included.
    global_shared : mapping
        The global shared weights the round started from (keys, shapes, and the reference of update norms).
    memory_mode : str
        ``"ema"``, ``"gradient"`` or ``"frozen"``.
    paired_only : sequence of str
        Paired-only keys.
    memory_shape : (2, K, S) or None
    privacy : PrivacyConfig
        ``max_update_norm_factor``, ``update_norm_floor``.
    memory_noised : bool
        True when sites send noised memory (``settings.memory_dp(cfg)``).

    Returns
    -------
    kept : list of SiteReply
    rejected : list of (site, reason)
        Logged at WARNING.
    """
    kept, rejected = usable_replies(replies, memory_mode, {k: tuple(v.shape) for k, v in global_shared.items()},
                                    paired_only, memory_shape)
    plausible = []
    for r in kept:
        why = memory_problem(r.memory, memory_mode, memory_noised)
        if why is None:
            plausible.append(r)
        else:
            rejected.append((r.site, why))
    kept = plausible
    if privacy.max_update_norm_factor > 0.0 and len(kept) >= 2:
        norms = update_norms(kept, global_shared)
        ok = []
        for r in kept:
            others = [v for s, v in norms.items() if s != r.site]
            bound = max(privacy.update_norm_floor, privacy.max_update_norm_factor * statistics.median(others))
            if not norms[r.site] <= bound or not math.isfinite(norms[r.site]):
                rejected.append((r.site, f"update norm {norms[r.site]:.4g} exceeds {bound:.4g} = max(floor "
                                         f"{privacy.update_norm_floor:g}, {privacy.max_update_norm_factor:g} x median "
                                         f"of the other sites' norms)"))
            else:
                ok.append(r)
        kept = ok
    for site, why in rejected:
        log.warning("reply from site %s rejected: %s", site, why)
    return kept, rejected
