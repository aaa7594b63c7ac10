"""Where a ClientApp process spends its time, from the moment it was started: kept on the site, never sent.

Flower starts a fresh ``flwr-clientapp`` process for every message a deployed site receives, so each message pays
the process start, the imports (torch, flwr, this package) and the site load before any training. A
:class:`PhaseClock` notes, for one message, the wall time and the CPU time of this process at each phase since the
kernel started it (Linux ``/proc/self/stat``; elsewhere since this module was imported; for a process forked
by :mod:`client.warm_start`, since Flower started the shim that stands for it): ``imported`` (the
ClientApp module is loaded), ``handler`` (Flower calls it), ``loaded`` (config and site data ready), ``model``
(model and optimiser built), ``first_step`` (the first optimiser step is done), ``trained``, ``validated`` /
``evaluated`` and ``reply`` (the reply is built; Flower then sends it). CPU time is what the phase costs on an
idle core; wall time also counts waiting for a busy one.

:meth:`PhaseClock.write` appends one JSON line per message to ``<state-dir>/timings.jsonl``
(benchmarks/deploy_overhead.py reads it; an operator can too). Nothing here leaves the site.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

TIMINGS_FILE = "timings.jsonl"  # in the site's state folder for the run


def _process_start() -> float:
    """Epoch seconds at which the kernel started this process (/proc), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = int(next(line for line in f if line.startswith("btime")).split()[1])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start()
IMPORTED = (time.time(), time.process_time())  # refreshed by mark_imported() once the ClientApp module is loaded


def restart(process_start: float) -> None:
    """In a process forked by the warm starter (:mod:`client.warm_start`): this message's process began at
    ``process_start`` (when Flower started the shim); the imports are done as of now."""
    global PROCESS_START, IMPORTED
    PROCESS_START = float(process_start)
    IMPORTED = (time.time(), time.process_time())


def mark_imported() -> None:
    """Call at the end of the ClientApp module: the imports are done."""
    global IMPORTED
    IMPORTED = (time.time(), time.process_time())


class PhaseClock:
    """The phases of one message in this process (see the module docstring).

    Parameters
    ----------
    kind : str
        The message type (``train``, ``evaluate``, ``query.kmeans_seed``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.wall: dict[str, float] = {"imported": IMPORTED[0] - PROCESS_START}
        self.cpu: dict[str, float] = {"imported": IMPORTED[1]}
        self.mark("handler")

    def mark(self, phase: str) -> None:
        """Note ``phase`` now (a phase noted twice keeps its first time)."""
        self.wall.setdefault(phase, time.time() - PROCESS_START)
        self.cpu.setdefault(phase, time.process_time())

    def on_step(self) -> None:
        """For the training loop's step hook: notes ``first_step`` the first time."""
        if "first_step" not in self.wall:
            self.mark("first_step")

    def record(self, round_: int, **extra) -> dict:
        """The JSON line: seconds since the process started (wall) and CPU seconds of this process, per phase."""
        return {"kind": self.kind, "round": int(round_), "pid": os.getpid(), "at": PROCESS_START,
                "wall": {k: round(v, 4) for k, v in self.wall.items()},
                "cpu": {k: round(v, 4) for k, v in self.cpu.items()}, **extra}

    def write(self, state_dir: str | Path, round_: int, **extra) -> None:
        """Mark ``reply`` and append the record to ``<state_dir>/timings.jsonl`` (never fails the message)."""
        self.mark("reply")
        try:
            path = Path(state_dir)
            path.mkdir(parents=True, exist_ok=True)
            with open(path / TIMINGS_FILE, "a") as f:
                f.write(json.dumps(self.record(round_, **extra)) + "\n")
        except OSError as exc:
            log.warning("timings not written to %s: %s", state_dir, exc)
