"""Child processes started and stopped by PID: the process layer under ``momkd-fed server``, ``client`` and
``simulate`` (both sides use it; it runs executables and never imports flwr).

:class:`FlowerProcess` starts one executable with its output in a file, waits for a line in that output, and
stops it together with every process below it -- also the helpers Flower forks and detaches
(``flower-superexec --parent-pid PID``), found through ``/proc``. With ``die_with_parent`` the child gets SIGTERM
when the Python process that started it dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class LaunchError(RuntimeError):
    """A Flower process did not start, exited early, or a `flwr` command failed; the message holds its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment for Flower processes: no telemetry, no update check, optional ``FLWR_HOME``."""
    env = {**os.environ, **FLOWER_ENV}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def descendants(pid: int) -> list[int]:
    """PIDs of the live descendants of ``pid``, plus helpers started with ``--parent-pid <pid>`` (Linux /proc).

    Flower detaches its ``flower-superexec`` helper into a new session and passes it ``--parent-pid``; once the
    parent has exited the helper is re-parented to init, so the flag is how it is still found by PID.
    """
    children: dict[int, list[int]] = {}
    orphans: list[int] = []
    marker = f"--parent-pid\0{pid}\0".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            # only re-parented processes can be a detached helper; reading every process's cmdline is slow
            # (it waits on that process's memory map: seconds while a busy machine imports torch everywhere)
            cmdline = (proc / "cmdline").read_bytes() if fields[1] == "1" else b""
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
        if marker in cmdline:
            orphans.append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out + [o for o in orphans if o not in out]


class FlowerProcess:
    """One Flower executable started by us, its output in ``log_path``.

    Parameters
    ----------
    name : str
        Label used in messages ("superlink", "supernode hospital_a").
    argv : list[str]
        Command line.
    log_path : Path
        File receiving stdout and stderr.
    env : dict[str, str]
        Environment (see :func:`flower_env`).
    die_with_parent : bool
        Linux: the process gets SIGTERM if the Python process that started it dies (even by SIGKILL), so that
        it does not outlive its supervisor.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], *,
                 die_with_parent: bool = False) -> None:
        self.name, self.argv, self.log_path = name, argv, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._offset = self._log.tell()  # the file may hold an earlier process's output (appended): skip it
        log.info("starting %s: %s", name, " ".join(argv))
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_term_with_parent if die_with_parent else None)
        self.pid = self.proc.pid
        self._seen: dict[int, str] = {}  # pid -> start time of every descendant seen by track()

    def track(self) -> list[int]:
        """Remember every process now below this one, so that :meth:`stop` finds it even after it was
        re-parented (Flower's helpers outlive their parent); returns the live descendants."""
        pids = descendants(self.pid)
        for pid in pids:
            if pid not in self._seen:
                self._seen[pid] = start_time(pid)
        return pids

    def output(self) -> str:
        """Everything this process has written so far (not what earlier processes left in the same file)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern``; raise LaunchError if the process exits or time runs out."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output())
            if m:
                return m
            code = self.proc.poll()
            if code is not None:
                raise LaunchError(f"{self.name} exited with code {code} before {rx.pattern!r} appeared in "
                                  f"{self.log_path}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.name}: {rx.pattern!r} did not appear in {self.log_path} within "
                                  f"{timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; return its exit code (LaunchError on timeout)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LaunchError(f"{self.name} still running after {timeout:.0f} s:\n{self.tail()}") from exc

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process and its descendants (by PID), SIGKILL what is left after ``timeout``."""
        pids = [self.pid, *descendants(self.pid)] if self.proc.poll() is None else descendants(self.pid)
        pids += [pid for pid, t in self._seen.items() if pid not in pids and t and start_time(pid) == t]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid, self):
                time.sleep(0.1)
            if _alive(pid, self):
                log.warning("%s: PID %d ignored SIGTERM; killing it", self.name, pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def __enter__(self) -> FlowerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _term_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_time(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot, /proc), or "" if it is gone: tells a PID re-used by
    another process apart from the one we saw."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, owner: FlowerProcess) -> bool:
    if pid == owner.pid:
        return owner.proc.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
