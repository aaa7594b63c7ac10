"""The files of a federated run folder that are not checkpoints: ``rounds.jsonl`` and ``summary.json``.

Layout of a run folder (simulate and server)::

    config.yaml          resolved config (written once at the start)
    rounds.jsonl         one JSON object per completed round, appended and flushed as each round ends
    summary.json         written at the end (atomically): rounds_completed, test_auc {pooled, <site>...}, ...
    checkpoints/         round_NNNN.pt, self-describing (see server/run_outputs.py)
    global_model.pt      the final global model (last round), loadable by ``momkd-fed predict``
    best_model.pt        the global model of the round with the best pooled validation AUC (``summary.json``
                         ``"best"``): the one to use, as a centralised run's ``model.pt`` is its best epoch
                         (memory head, calibrated on the sites' pooled validation histograms, unless the
                         classifier is shared); each site also keeps its own ``personal_model.pt`` in its state
                         folder (``client/site_state.py``; simulate: ``site_state/<site>/<run key>/``)
    predictions/         test_<site>.csv per-slide test scores, written only where the data is local
                         (simulate, train); a real federation never moves per-slide outputs

JSON is strict: NaN and infinities are written as ``null``. Plain Python/numpy only (no flwr, no torch).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_model.pt"
PERSONAL_MODEL_FILE = "personal_model.pt"  # a site's personal model, in the site's own state folder (never sent)
CHECKPOINT_DIR = "checkpoints"
PREDICTIONS_DIR = "predictions"
PREDICTION_COLUMNS = ("slide_id", "label", "probability", "memory_score")


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, recursively."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented strict JSON via a temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def write_predictions_csv(path: str | Path, slide_ids: list[str], labels: np.ndarray, probs: np.ndarray | None,
                          memory_scores: np.ndarray | None) -> Path:
    """Per-slide test scores of the heads a model trained, atomic: ``PREDICTION_COLUMNS`` without ``probability``
    (classifier P(y=1)) when ``probs`` is None (an untrained classifier is never written) and with ``memory_score``
    empty for a model without memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c in PREDICTION_COLUMNS if c != "probability" or probs is not None])
        for i, sid in enumerate(slide_ids):
            mem = "" if memory_scores is None else repr(float(memory_scores[i]))
            prob = [] if probs is None else [repr(float(probs[i]))]
            w.writerow([sid, int(labels[i]), *prob, mem])
    os.replace(tmp, path)
    return path


def append_round(run_dir: str | Path, row: Mapping[str, Any]) -> None:
    """Append one round's JSON object to ``rounds.jsonl`` (one line, flushed and fsynced)."""
    path = Path(run_dir) / ROUNDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(row), allow_nan=False)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rounds(run_dir: str | Path) -> list[dict]:
    """All complete rows of ``rounds.jsonl`` (a trailing partial line is ignored); [] if absent."""
    return [json.loads(line) for line in _complete_lines(Path(run_dir) / ROUNDS_FILE)]


def _complete_lines(path: Path) -> list[bytes]:
    """The non-blank newline-terminated lines of ``path``, read at once (a row still being written is left out)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return []
    return [line for line in data[:data.rfind(b"\n") + 1].split(b"\n") if line.strip()]


class RoundsFollower:
    """The rows a growing ``rounds.jsonl`` gains, each returned once, for a live progress table.

    ``skip_existing``: rows already in the file are not returned (``--resume``: the previous session printed them).
    Each call reads the whole file once (a row is a few kB, a run tens of rows) and returns its complete lines not
    returned before, so a row appended while it runs comes with the next call, and a file replaced under it (a fresh
    run in the same folder, a resume truncating to its last checkpoint) needs no special case: every row carries its
    own timings, so a round run again differs from the row it replaces.
    """

    def __init__(self, path: Path, skip_existing: bool = False):
        self.path = Path(path)
        self.seen: set[bytes] = set(_complete_lines(self.path)) if skip_existing else set()

    def new_rows(self) -> list[dict]:
        fresh = [line for line in _complete_lines(self.path) if line not in self.seen]
        self.seen.update(fresh)
        return [json.loads(line) for line in fresh]


def truncate_rounds(run_dir: str | Path, last_round: int) -> int:
    """Keep only the rows with ``round <= last_round`` (used on resume); returns the rows kept."""
    path = Path(run_dir) / ROUNDS_FILE
    rows = [r for r in read_rounds(run_dir) if int(r.get("round", 0)) <= last_round]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows))
    os.replace(tmp, path)
    return len(rows)


def read_summary(run_dir: str | Path) -> dict | None:
    """``summary.json`` of a run folder, or None if the run has not finished."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def slide_weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``sum_s w_s v_s / sum_s w_s`` over the sites with a finite value and a positive weight; NaN if none."""
    pairs = [(float(values[s]), float(weights.get(s, 0))) for s in values
             if values[s] is not None and math.isfinite(float(values[s])) and float(weights.get(s, 0)) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan
