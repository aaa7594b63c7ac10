"""A private SuperLink in simulation mode for ``momkd-fed simulate``, started and stopped by PID.

Flower 1.42's supported way to run its simulation engine is to submit a run (``flwr run``) to a SuperLink started
with ``--simulation``; the SuperLink's ``flower-superexec`` then starts ``flwr-simulation``, which runs the
ServerApp and the ClientApps on Ray. ``flwr run . local`` would start a *shared*, detached SuperLink on a fixed
port that keeps running; instead this module starts its own, on a free loopback port, with a private
``FLWR_HOME`` (connection file, installed FABs) and an in-memory state, and stops it -- with the superexec,
``flwr-simulation`` and every Ray process below them -- when the run ends, fails or is interrupted.

``flwr run`` exits 0 even when the run fails, so completion is read from ``flwr ls --run-id`` (status
``finished:completed`` / ``finished:failed`` / ``finished:stopped``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from momkd_fed.processes import FlowerProcess, LaunchError, descendants, flower_env, free_port

from .deploy import flwr_cli

log = logging.getLogger(__name__)

CONNECTION = "momkd-sim"  # connection name in the private $FLWR_HOME/config.toml
FINISHED = "finished"
COMPLETED = "finished:completed"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class LocalSuperLink:
    """A simulation-mode SuperLink owned by this process.

    Parameters
    ----------
    work_dir : Path
        Holds ``flwr_home/`` (private FLWR_HOME) and ``superlink.log``.
    """

    def __init__(self, work_dir: str | Path) -> None:
        self.work_dir = Path(work_dir)
        self.flwr_home = self.work_dir / "flwr_home"
        self.port = 0
        self.proc: FlowerProcess | None = None
        self._seen: dict[int, int | None] = {}  # pid -> pgid of every process seen below the SuperLink

    # ---------------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start ``flower-superlink --simulation`` on a free loopback port and wait for its health endpoint."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        argv = ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        self.proc = FlowerProcess("superlink (simulation)", argv, self.work_dir / "superlink.log",
                                  flower_env(self.flwr_home))
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.proc.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {self.proc.proc.poll()}:\n{self.proc.tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"flower-superlink not ready after {timeout:.0f} s:\n{self.proc.tail()}")
            time.sleep(0.2)
        log.info("SuperLink (simulation) up on 127.0.0.1:%d, PID %d", self.port, self.proc.pid)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1.0) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError):
            return False

    # ---------------------------------------------------------------------------------------------------------
    def submit(self, app_dir: Path, num_supernodes: int, client_cpus: float) -> int:
        """``flwr run APP_DIR`` with ``num_supernodes`` virtual sites of ``client_cpus`` CPUs each; returns the run id.

        Flower 1.42 takes whole CPUs per virtual client: a fractional ``client_cpus`` is rounded (at least 1).
        """
        cpus = max(1, int(round(client_cpus)))
        if cpus != client_cpus:
            log.warning("federation.client_cpus=%s: Flower 1.42 assigns whole CPUs; using %d", client_cpus, cpus)
        fed = f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={cpus}"
        res = flwr_cli(["run", str(Path(app_dir).resolve()), CONNECTION, "--federation-config", fed],
                       self.flwr_home, timeout=120.0)
        if not res.get("success") or res.get("run-id") is None:
            raise LaunchError(f"flwr run did not start the run: {res}")
        return int(res["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status text (``pending``, ``starting``, ``running``, ``finished:completed``, ...)."""
        self.track()
        res = flwr_cli(["ls", CONNECTION, "--run-id", str(run_id)], self.flwr_home, timeout=60.0)
        runs = res.get("runs") or []
        if not res.get("success", True) or not runs:
            raise LaunchError(f"flwr ls --run-id {run_id}: {res}")
        return str(runs[0]["status"])

    def logs(self, run_id: int) -> str:
        """Everything the run logged (ServerApp and ClientApps), as ``flwr log --show`` prints it."""
        r = subprocess.run(["flwr", "log", str(run_id), CONNECTION, "--show"], capture_output=True, text=True,
                           env=flower_env(self.flwr_home), cwd=self.flwr_home, timeout=60.0, stdin=subprocess.DEVNULL)
        return r.stdout + r.stderr

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    # ---------------------------------------------------------------------------------------------------------
    def track(self) -> None:
        """Remember every process now below the SuperLink (with its process group) for :meth:`stop`."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            if pid not in self._seen:
                self._seen[pid] = _pgid(pid)

    def stop(self, timeout: float = 10.0) -> list[int]:
        """Stop the SuperLink and everything below it; returns the PIDs that had to be SIGKILLed.

        ``flwr-simulation`` and Ray run in ``flower-superexec``'s own session and survive the SuperLink; they
        are found as descendants (now and as seen while the run was polled) and stopped by PID and process
        group.
        """
        if self.proc is None:
            return []
        self.track()
        self.proc.stop(timeout=timeout)
        own = os.getpgid(0)
        groups = {g for g in self._seen.values() if g is not None and g != own}
        for g in groups:
            try:
                os.killpg(g, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        killed = []
        while time.monotonic() < deadline and self._leftovers():
            time.sleep(0.2)
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if killed:
            log.warning("SuperLink: SIGKILLed PIDs %s that ignored SIGTERM", killed)
        self.proc = None
        return killed

    def _leftovers(self) -> list[int]:
        out = []
        for pid in self._seen:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append(pid)
        return out

    def __enter__(self) -> "LocalSuperLink":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
