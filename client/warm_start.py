"""Warm ClientApp processes: every message still gets its own ``flwr-clientapp`` process, without its imports.

A deployed SuperNode starts a fresh ``flwr-clientapp`` process for every message (Flower's ``flower-superexec``
runs the executable of that name from its ``PATH``). Before it can train, that process imports flwr, torch and
this package: 3-8 s of a 2-core machine's time per message and per site, more than the training of a small round.
``momkd-fed client`` therefore starts, beside the SuperNode:

- a **starter** (``python -m client.warm_start SOCKET``): it imports everything a ClientApp needs once (flwr's
  ``flwr-clientapp`` entry point and :mod:`client.client_app`, hence torch), without running any torch
  operation, then waits on a Unix socket that only this user can reach (0700 folder, peer uid checked);
- a ``flwr-clientapp`` **shim** first on the SuperNode's ``PATH``: a stdlib-only script that hands its command
  line, environment, working folder and standard streams (file descriptors) to the starter and then stands for
  the process the starter forks: it forwards SIGTERM/SIGINT/SIGHUP to it and exits with its exit code.

The forked child is Flower's own ``flwr-clientapp`` (same arguments, same environment, same streams, so its log
lands in the SuperNode's) with the imports already done: it pulls the message, runs the handler and pushes the
reply exactly as a cold one would, except that it asks for message arrays the SuperNode is still downloading
more often (:func:`quick_object_pulls`). If the starter is not (yet, or any longer) there, the shim runs the real
``flwr-clientapp`` instead: a cold start, never a failure. A child whose shim disappears (killed) is stopped.

Fork safety: the starter runs no torch operation (no OpenMP or CUDA state exists when it forks) and limits
OpenBLAS to one thread; a child re-seeds nothing it inherits (every handler seeds its own generators).
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "clientapp.sock"
SHIM_NAME = "flwr-clientapp"  # what flower-superexec runs for a ClientApp task (flwr.supercore.constant)
READY = "warm ClientApp starter ready"  # the starter's log line once it accepts
STARTER_ENV = {"OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # no BLAS thread pool across fork
_MAX_REQUEST = 1 << 20  # bytes: command line + environment of one request

# The shim: stdlib only, run with `python -S` (no site-packages: starts in ~20 ms). Placeholders: SOCKET, REAL.
SHIM = r'''"""flwr-clientapp shim written by momkd-fed client (client/warm_start.py): a warm start, or the real one."""
import array, json, os, signal, socket, sys, time
T0 = time.time()
SOCKET, REAL = {socket!r}, {real!r}


def cold():
    os.execv(REAL, [REAL] + sys.argv[1:])


try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCKET)
    req = json.dumps({{"argv": [REAL] + sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "t0": T0}})
    s.sendmsg([req.encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    f = s.makefile("rb")
    first = f.readline()
    if not first:
        raise OSError("the starter closed the connection")
    pid = int(json.loads(first)["pid"])
except (OSError, ValueError):
    cold()


def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
line = f.readline()
sys.exit(int(json.loads(line)["exit"]) if line else 1)
'''


# ----------------------------------------------------------------------------------------------------------------
# shim side (momkd-fed client writes it; the SuperNode's PATH finds it)


def write_shim(folder: Path, socket_path: Path, real: str) -> Path:
    """Write ``folder/flwr-clientapp`` (a ``sh`` launcher of ``python -S`` on the shim) and return ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "clientapp_shim.py"
    script.write_text(SHIM.format(socket=str(socket_path), real=str(real)))
    launcher = folder / SHIM_NAME
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{script}" "$@"\n')
    launcher.chmod(0o755)
    return folder


def real_clientapp() -> str | None:
    """The real ``flwr-clientapp`` executable on this process's PATH (None if Flower is not installed)."""
    return shutil.which(SHIM_NAME)


# ----------------------------------------------------------------------------------------------------------------
# starter side


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request line and the three file descriptors sent with it."""
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
        if not msg:
            raise OSError("the shim closed the connection before its request was complete")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        data += msg
        if len(data) > _MAX_REQUEST:
            raise OSError("request too large")
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise OSError(f"expected 3 file descriptors, got {len(fds)}")
    return json.loads(data), list(fds)


PULL_BACKOFF = {"initial_backoff": 0.1, "backoff_cap": 1.0, "max_tries_per_object": 5000}  # Flower: 1, 10, 500


def quick_object_pulls() -> bool:
    """In a warm child: ask the SuperNode again for a message object it does not hold yet after 0.1 s, doubling
    to at most 1 s, instead of Flower 1.42's 1, 2, 4, 8, then every 10 s.

    Flower's SuperExec starts the ClientApp as soon as a message is announced, while the SuperNode is still
    downloading its arrays from the SuperLink. A cold ``flwr-clientapp`` spent that time importing; a warm one
    asks at once and, with Flower's schedule, then idles up to 10 s after the arrays arrived. The requests go to
    the SuperNode on this machine (loopback); the total patience stays about the same (5000 tries of <= 1 s).
    Changes the keyword defaults of ``flwr.supernode.runtime.run_clientapp.pull_and_inflate_object_from_tree``
    in this process only; returns False (and changes nothing) if Flower no longer has them.
    """
    from flwr.supernode.runtime import run_clientapp

    defaults = getattr(run_clientapp.pull_and_inflate_object_from_tree, "__kwdefaults__", None) or {}
    if not set(PULL_BACKOFF) <= set(defaults):
        return False
    defaults.update(PULL_BACKOFF)
    return True


def _child(req: dict, fds: list[int], close: list[socket.socket]) -> None:
    """In the forked child: become Flower's ``flwr-clientapp`` with the shim's streams, environment and
    arguments; never returns."""
    code = 1
    try:
        for s in close:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        from client import timings

        timings.restart(float(req["t0"]))
        quick_object_pulls()
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must always end with an exit code, never return to the loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(socket_path: Path) -> None:
    """The starter: import a ClientApp's modules once, then fork one ``flwr-clientapp`` per request."""
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401  (everything a cold flwr-clientapp imports first)

    import client.client_app  # noqa: F401  (torch, flwr, momkd_fed: what the ClientApp imports)

    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.parent.chmod(0o700)
    socket_path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(socket_path))
    socket_path.chmod(0o600)
    srv.listen(16)
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    children: dict[int, socket.socket] = {}  # child pid -> its shim's connection
    print(f"{READY} on {socket_path} (PID {os.getpid()})", flush=True)
    try:
        while not stop:
            try:
                ready, _, _ = select.select([srv, *children.values()], [], [], 0.2)
            except InterruptedError:
                continue
            for r in ready:
                if r is srv:
                    _accept(srv, children)
                else:  # a shim's connection became readable: it is gone (nothing else is ever sent)
                    pid = next(p for p, c in children.items() if c is r)
                    if not r.recv(1):
                        _signal(pid, signal.SIGTERM)
            _reap(children)
    finally:
        for pid in list(children):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.1)
        for pid in list(children):
            _signal(pid, signal.SIGKILL)
        srv.close()
        socket_path.unlink(missing_ok=True)


def _accept(srv: socket.socket, children: dict[int, socket.socket]) -> None:
    conn, _ = srv.accept()
    try:
        if _peer_uid(conn) != os.getuid():
            raise OSError("a process of another user connected")
        conn.settimeout(10)
        req, fds = _receive(conn)
    except (OSError, ValueError) as exc:
        print(f"warm start refused a request: {exc}", file=sys.stderr, flush=True)
        conn.close()
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(req, fds, [srv, conn, *children.values()])
    for fd in fds:
        os.close(fd)
    print(f"forked flwr-clientapp PID {pid}", flush=True)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:
        _signal(pid, signal.SIGTERM)
    conn.settimeout(None)
    children[pid] = conn


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        try:
            conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        except OSError:
            pass
        conn.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
