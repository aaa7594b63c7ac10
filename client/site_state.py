"""A site's private state between rounds, kept on the site's own disk.

Flower starts a fresh ClientApp process for every message in a deployment, and a new run (a resume) gets an
empty ``context.state``; so the site-private parameters (classifier head, attention temperature, genomic decoder
by default) and the optimiser state are written after every local training round to
``<state_dir>/round_NNNN.pt`` and read back at the next message:

- train in round r reads the newest state of a round < r (the site may have skipped rounds);
- evaluate in round r reads the newest state of a round <= r.

A resumed run that restarts round N+1 therefore reads exactly what round N left, whatever a crashed round N+1
may have written. The last :data:`KEEP` states are kept. Nothing here ever leaves the site.

It also holds :data:`GLOBAL_CACHE_FILE`: the global weights and memory of the last evaluate message. The next
round's train message carries the very same tensors, so the server sends them only once per round: a train
message with ``contract.CFG_CACHED_ROUND = r`` and no ``"arrays"`` / ``"memory"`` records means "the global model
of round r's evaluate message" (:func:`load_global_cache`; a site without it says so and is sent them in full).

It holds the site's personal model too: :data:`PERSONAL_MODEL_FILE`, the global encoders and memory of one round
with the site's own classifier and temperature, calibrated on the site's validation split (a regular momkd-fed
checkpoint, loadable by ``momkd-fed predict``; it never leaves the site): the last round evaluated, or with
``federation.personal_round: best_validation`` the round the site judges best on its own validation split; and
:data:`PERSONAL_ROUNDS_FILE`, the personal validation and test AUC of every round evaluated, from which that best
round is chosen (``federation.selection.BestRound``; a resumed run re-evaluating round r forgets the rounds >= r
first).

The same folder holds the site's privacy files (``momkd_fed.privacy``): :data:`ACCOUNTANT_FILE`, the memory-DP
budget spent in this run (saved before each train reply leaves; a re-run round is counted again, which only
over-states the budget), and the audit log ``privacy_audit.jsonl`` (``privacy.audit.AUDIT_FILE``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from momkd_fed.run_log import PERSONAL_MODEL_FILE  # noqa: F401  (the site's personal model, in its state folder)

log = logging.getLogger(__name__)

KEEP = 3  # newest round states kept on disk
GLOBAL_CACHE_FILE = "global_cache.pt"  # the last evaluate message's global weights and memory (one, overwritten)
ACCOUNTANT_FILE = "privacy_accountant.json"  # the site's PrivacyAccountant (memory DP), never pruned
PERSONAL_ROUNDS_FILE = "personal_rounds.json"  # round -> the personal model's validation and test AUC
_NAME = re.compile(r"^round_(\d{4,})\.pt$")


@dataclass
class SiteState:
    """What a site carries from one round to the next.

    Attributes
    ----------
    round : int
        The round whose local training produced it.
    private : dict[str, Tensor]
        Site-private state-dict entries (``sharing.partition_state(...).private``).
    optimizer : dict
        ``optimizer.state_dict()`` of the local AdamW.
    """

    round: int
    private: dict[str, torch.Tensor]
    optimizer: dict


def _rounds(state_dir: Path) -> list[int]:
    if not state_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in state_dir.iterdir() if (m := _NAME.match(p.name)))


def save_site_state(state_dir: str | Path, state: SiteState) -> Path:
    """Write ``state`` atomically as ``round_NNNN.pt``; prune all but the newest :data:`KEEP`."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"round_{state.round:04d}.pt"
    tmp = state_dir / f".{path.name}.{os.getpid()}.tmp"
    torch.save({"round": state.round, "private": {k: v.detach().cpu() for k, v in state.private.items()},
                "optimizer": state.optimizer}, tmp)
    os.replace(tmp, path)
    for r in _rounds(state_dir)[:-KEEP]:
        (state_dir / f"round_{r:04d}.pt").unlink(missing_ok=True)
    return path


def load_site_state(state_dir: str | Path, before_round: int, inclusive: bool = False) -> SiteState | None:
    """The newest state of a round ``< before_round`` (``<=`` with ``inclusive``), or None if there is none."""
    state_dir = Path(state_dir)
    limit = before_round if inclusive else before_round - 1
    rounds = [r for r in _rounds(state_dir) if r <= limit]
    if not rounds:
        return None
    path = state_dir / f"round_{rounds[-1]:04d}.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    log.debug("site state: read %s", path)
    return SiteState(round=int(raw["round"]), private=dict(raw["private"]), optimizer=raw["optimizer"])


def save_global_cache(state_dir: str | Path, round_: int, shared: dict[str, torch.Tensor],
                      slots: torch.Tensor | None) -> Path:
    """Keep round ``round_``'s global shared weights and memory, exactly as received (atomic write)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / GLOBAL_CACHE_FILE
    tmp = state_dir / f".{path.name}.{os.getpid()}.tmp"
    torch.save({"round": int(round_), "shared": {k: v.detach().cpu() for k, v in shared.items()},
                "slots": None if slots is None else slots.detach().cpu()}, tmp)
    os.replace(tmp, path)
    return path


def load_global_cache(state_dir: str | Path, round_: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
    """The cached (shared weights, memory slots) of round ``round_``, or None if the cache holds another round or
    is missing or unreadable (the site then asks for the weights in full)."""
    path = Path(state_dir) / GLOBAL_CACHE_FILE
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file: ask for the weights instead of failing the round
        log.warning("global cache %s unreadable (%s); asking the server for the weights", path, exc)
        return None
    if int(raw.get("round", -1)) != int(round_):
        return None
    return dict(raw["shared"]), raw.get("slots")


def load_personal_rounds(state_dir: str | Path) -> dict[int, dict[str, float]]:
    """Round -> ``{"val_auc", "test_auc"}`` of the personal model, as :func:`save_personal_rounds` wrote it
    ({} when absent; NaN was written as null)."""
    path = Path(state_dir) / PERSONAL_ROUNDS_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {int(r): {k: math.nan if v is None else float(v) for k, v in d.items()} for r, d in raw.items()}


def save_personal_rounds(state_dir: str | Path, rounds: dict[int, dict[str, float]]) -> Path:
    """Write the personal rounds record atomically (NaN as null)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / PERSONAL_ROUNDS_FILE
    tmp = state_dir / f".{path.name}.{os.getpid()}.tmp"
    data = {str(r): {k: (v if math.isfinite(v) else None) for k, v in d.items()} for r, d in sorted(rounds.items())}
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path
