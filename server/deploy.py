"""Launch and stop the coordinator's Flower processes: a TLS SuperLink with SuperNode authentication.

This is the process layer under ``momkd-fed server``: it builds the exact ``flower-superlink`` command line,
writes the ``flwr`` CLI connection (``$FLWR_HOME/config.toml``), registers the sites' public keys and stops
everything by PID. It runs Flower's executables; it does not import flwr. The commands are the ones verified on
loopback in tests/test_certs_flower.py and written down in deploy/README.md.

Processes started here are tracked by PID; :meth:`FlowerProcess.stop` also stops the helpers Flower forks
(``flower-superexec``), found through ``/proc`` as descendants of the PID we started.
"""

from __future__ import annotations

import json
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
SUPERLINK_READY = re.compile(r"Uvicorn running on https?://")
CONNECTION_NAME = "momkd-fed"  # name of the SuperLink connection in $FLWR_HOME/config.toml


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


def _descendants(pid: int) -> list[int]:
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
            cmdline = (proc / "cmdline").read_bytes()
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
        pids = _descendants(self.pid)
        for pid in pids:
            if pid not in self._seen:
                self._seen[pid] = _start_time(pid)
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
        pids = [self.pid, *_descendants(self.pid)] if self.proc.poll() is None else _descendants(self.pid)
        pids += [pid for pid, t in self._seen.items() if pid not in pids and t and _start_time(pid) == t]
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


def _start_time(pid: int) -> str:
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


# --------------------------------------------------------------------------------------------------------------
# SuperLink


def superlink_command(certs: Path | None, database: Path, *, host: str = "127.0.0.1", port: int = 8000,
                      log_file: Path | None = None, install_dependencies: bool = False,
                      insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS from the coordinator bundle, SuperNode authentication and a state database.

    Parameters
    ----------
    certs : Path or None
        The coordinator bundle (``out/coordinator`` of ``momkd-fed certs``): server.crt, server.key, ca.crt.
        Ignored (may be None) with ``insecure``.
    database : Path
        SQLite file for the SuperLink state (runs and registered nodes survive a restart).
    host, port : str, int
        Bind address. Keep ``127.0.0.1``: the Control API on the same port has no authentication; sites reach
        the Fleet API through the reverse proxy (deploy/nginx/momkd-fed.conf).
    insecure : bool
        Plain HTTP and **no SuperNode authentication** (Flower refuses ``--enable-supernode-auth`` without TLS):
        any process that reaches the port can join. Testing only.
    """
    if insecure:
        argv = ["flower-superlink", "--insecure"]
    else:
        if certs is None:
            raise LaunchError("superlink: no coordinator bundle given (fix: pass --certs DIR, the coordinator "
                              "folder made by momkd-fed certs)")
        certs = Path(certs).absolute()
        argv = ["flower-superlink",
                "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key"),
                "--ssl-ca-certfile", str(certs / "ca.crt"),
                "--enable-supernode-auth"]
    argv += ["--database", str(Path(database).absolute()), "--host", host, "--port", str(port)]
    if not install_dependencies:
        argv.append("--disable-runtime-dependency-installation")
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    return argv


def start_superlink(certs: Path | None, database: Path, log_path: Path, *, host: str = "127.0.0.1",
                    port: int = 8000, timeout: float = 60.0, flwr_home: Path | None = None,
                    insecure: bool = False, die_with_parent: bool = False) -> FlowerProcess:
    """Start the SuperLink and wait until it serves HTTPS (HTTP with ``insecure``)."""
    p = FlowerProcess("superlink", superlink_command(certs, database, host=host, port=port, insecure=insecure),
                      log_path, flower_env(flwr_home), die_with_parent=die_with_parent)
    try:
        p.wait_for(SUPERLINK_READY, timeout)
    except BaseException:
        p.stop()
        raise
    return p


def write_flwr_config(flwr_home: Path, address: str, root_certificates: Path | None,
                      name: str = CONNECTION_NAME) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default) and return it.

    TLS verified against ``root_certificates``; ``None`` writes an insecure (plain HTTP) connection.
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    tls = ("insecure = true\n" if root_certificates is None
           else f'root-certificates = "{Path(root_certificates).absolute()}"\n')
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flwr_cli(args: list[str], flwr_home: Path, *, cwd: Path | None = None, timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` against the connection in ``flwr_home``; return the parsed JSON.

    Raises LaunchError when the command fails or prints no JSON. Note that ``flwr`` exits 0 even when the JSON says
    ``"success": false``: callers must look at it.
    """
    argv = ["flwr", *args, "--format", "json"]
    r = subprocess.run(argv, capture_output=True, text=True, env=flower_env(flwr_home), timeout=timeout,
                       cwd=cwd or flwr_home, stdin=subprocess.DEVNULL)
    start = r.stdout.find("{")
    if r.returncode != 0 or start < 0:
        raise LaunchError(f"{' '.join(argv)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(r.stdout[start:])


def register_site_keys(certs: Path, flwr_home: Path, sites: list[str] | None = None,
                       connection: str = CONNECTION_NAME) -> dict[str, int | None]:
    """Register ``certs/sites/<site>.pub`` with the SuperLink; already-registered keys are accepted.

    Returns site -> node id (``None`` for a key that was registered before).
    """
    keys_dir = Path(certs) / "sites"
    pubs = sorted(keys_dir.glob("*.pub")) if sites is None else [keys_dir / f"{s}.pub" for s in sites]
    if not pubs:
        raise LaunchError(f"{keys_dir}: no site public keys (*.pub) to register")
    out: dict[str, int | None] = {}
    for pub in pubs:
        res = flwr_cli(["supernode", "register", str(pub.absolute()), connection], flwr_home)
        if res.get("success"):
            out[pub.stem] = int(res["node-id"])
        elif "already in use" in str(res.get("error-message", "")):
            out[pub.stem] = None
        else:
            raise LaunchError(f"registering {pub} failed: {res.get('error-message', res)}")
        log.info("site %s: key %s registered (node %s)", pub.stem, pub.name, out[pub.stem])
    return out


def list_nodes(flwr_home: Path, connection: str = CONNECTION_NAME) -> list[dict]:
    """``flwr supernode ls``: one dict per registered node (``node-id``, ``status`` online/offline/registered)."""
    res = flwr_cli(["supernode", "ls", connection], flwr_home)
    if not res.get("success"):
        raise LaunchError(f"flwr supernode ls failed: {res.get('error-message', res)}")
    return list(res.get("nodes", []))
