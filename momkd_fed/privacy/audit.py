"""The site's privacy audit log: one JSON line per round saying what left the site (written locally, never sent).

Each line records, for one reply: the round, the site, the message kind, every record sent with each array's
shape and L2 norm (never the values), the memory slots withheld and why, the clip statistics, the privacy budget
spent (epsilon of this release and cumulated, delta, what the epsilon covers) and the wall-clock time (UTC).

Appends are atomic: the file is rewritten to a temporary file in the same folder (old lines + the new one),
flushed to disk and renamed over the log, so a crash leaves either the old log or the new one, never a torn
line. The log is small (one line per round), so the rewrite is cheap.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

AUDIT_FILE = "privacy_audit.jsonl"  # in the site's state folder


def _norm(a) -> float:
    if isinstance(a, torch.Tensor):
        return float(a.detach().double().norm()) if a.numel() else 0.0
    arr = np.asarray(a, dtype=np.float64)
    return float(np.linalg.norm(arr.ravel())) if arr.size else 0.0


def _shape(a) -> list[int]:
    return list(a.shape) if hasattr(a, "shape") else list(np.shape(a))


def describe_arrays(records: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
    """``{record: {key: {"shape": [...], "l2": float}}}`` for tensors or numpy arrays, values never copied out."""
    return {name: {k: {"shape": _shape(v), "l2": _norm(v)} for k, v in arrays.items()}
            for name, arrays in records.items()}


def _jsonable(x):
    """Plain JSON types; non-finite floats become None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def audit_record(round_: int, site: str, kind: str, records: Mapping[str, Mapping], *,
                 withheld: Mapping | None = None, clip: Mapping | None = None, privacy: Mapping | None = None,
                 covers: list[str] | None = None, extra: Mapping | None = None) -> dict:
    """One audit line.

    Parameters
    ----------
    round_ : int
        Server round (0 = before round 1, e.g. k-means queries).
    site : str
    kind : str
        Message kind ("train", "kmeans_seed", ...).
    records : mapping
        Record name -> {key: array} exactly as sent.
    withheld : mapping, optional
        ``Withheld.as_dict()``.
    clip : mapping, optional
        ``ClipStats.as_dict()``.
    privacy : mapping, optional
        ``PrivacyAccountant.report()`` after the release (``epsilon_round``, ``epsilon``, ``delta``, ``steps``).
    covers : list of str, optional
        ``settings.dp_covers(cfg)``: what the epsilon covers (empty = no DP).
    extra : mapping, optional
        Anything else worth keeping (e.g. the metric names sent).
    """
    rec = {"round": int(round_), "site": site, "kind": kind,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "sent": describe_arrays(records), "withheld": dict(withheld or {}), "clip": dict(clip or {}),
           "privacy": dict(privacy or {}), "dp_covers": list(covers or [])}
    if extra:
        rec["extra"] = dict(extra)
    return _jsonable(rec)


class AuditLog:
    """Append-only JSON-lines log at ``path`` (see the module docstring for atomicity)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_folder(cls, state_dir: str | Path) -> "AuditLog":
        """The log of a site's state folder (:data:`AUDIT_FILE`)."""
        return cls(Path(state_dir) / AUDIT_FILE)

    def append(self, record: Mapping) -> None:
        """Append one record as one line, atomically."""
        line = json.dumps(_jsonable(record), sort_keys=False, allow_nan=False)
        if "\n" in line:  # json.dumps never emits raw newlines; keep the one-line-per-record promise explicit
            raise ValueError("audit record would span several lines")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.path.read_bytes() if self.path.is_file() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(old + line.encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        """Every record, oldest first ([] when the log does not exist)."""
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.path}: line {i} is not JSON ({exc})") from exc
        return out
