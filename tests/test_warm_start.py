"""The warm ClientApp starter and its flwr-clientapp shim, with real processes (no SuperNode needed):
the shim's command line, streams and exit code reach Flower's own flwr-clientapp in a forked child; signals are
forwarded; a child whose shim is killed is stopped; without a starter the shim runs the real executable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from client.warm_start import PULL_BACKOFF, READY, STARTER_ENV, quick_object_pulls, real_clientapp, write_shim
from momkd_fed.processes import FlowerProcess, descendants, flower_env

pytestmark = pytest.mark.skipif(real_clientapp() is None, reason="flwr-clientapp not on PATH")


@pytest.fixture
def starter():
    folder = Path(tempfile.mkdtemp(prefix="momkd-warm-test-"))
    sock = folder / "s.sock"
    shim = write_shim(folder / "bin", sock, real_clientapp()) / "flwr-clientapp"
    proc = FlowerProcess("starter", [sys.executable, "-m", "client.warm_start", str(sock)], folder / "starter.log",
                         {**flower_env(), **STARTER_ENV})
    try:
        proc.wait_for(READY, timeout=300)
        yield proc, shim, folder
    finally:
        proc.stop()
        assert not sock.exists()  # the starter removes its socket when it stops


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_shim_runs_flower_clientapp_forked_from_the_starter(starter):
    proc, shim, _ = starter
    ok = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Run a Flower ClientApp" in ok.stdout and "--runtime-api-address" in ok.stdout  # Flower's own parser
    bad = subprocess.run([str(shim), "--no-such-flag"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flwr-clientapp: error:" in bad.stderr  # argparse's exit code and message
    assert proc.proc.poll() is None and "refused" not in proc.output()
    assert proc.output().count("forked flwr-clientapp PID") == 2  # both ran in children of the starter


def test_signals_reach_the_child_and_an_orphaned_child_is_stopped(starter):
    proc, shim, folder = starter
    # nothing listens at this address: Flower's flwr-clientapp retries until it is stopped
    argv = [str(shim), "--runtime-api-address", "127.0.0.1:9", "--insecure", "--token", "x"]
    shim_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (kids := descendants(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kids, "the starter forked no child"
    shim_proc.send_signal(signal.SIGTERM)  # forwarded to the child, which exits; the shim exits with it
    # with the child's code: 0 once Flower's handler is installed (flwr_exit: SIGTERM is a graceful exit, code 3,
    # process status 0), -SIGTERM (status 256 - 15) when the signal lands before it; a shim that did not forward
    # would wait for the child for ever
    assert shim_proc.wait(60) in (0, 256 - signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids)
    # a shim killed outright: the starter notices its connection close and stops the child
    shim_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (kids := descendants(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    shim_proc.kill()
    shim_proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kids and not any(_alive(k) for k in kids)


def test_without_a_starter_the_shim_starts_flower_cold(tmp_path):
    shim = write_shim(tmp_path / "bin", tmp_path / "absent.sock", real_clientapp()) / "flwr-clientapp"
    out = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Run a Flower ClientApp" in out.stdout
    assert os.access(shim, os.X_OK)


def test_quick_object_pulls_finds_flowers_retry_schedule():
    """The warm child shortens Flower's object-pull back-off; an upgrade that moves it must fail here, not
    silently fall back to 10 s waits."""
    code = ("from client.warm_start import quick_object_pulls, PULL_BACKOFF\n"
            "from flwr.supernode.runtime import run_clientapp as r\n"
            "before = dict(r.pull_and_inflate_object_from_tree.__kwdefaults__)\n"
            "assert quick_object_pulls()\n"
            "after = r.pull_and_inflate_object_from_tree.__kwdefaults__\n"
            "assert before['initial_backoff'] == 1 and before['backoff_cap'] == 10, before\n"
            "assert {k: after[k] for k in PULL_BACKOFF} == PULL_BACKOFF\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert PULL_BACKOFF["backoff_cap"] < 10 and callable(quick_object_pulls)
