"""The deployment launchers without a federation: command lines, failure diagnosis, bundle checks, the data gate
of ``momkd-fed client``, and that processes we start die with us and are found again by PID. Fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.deploy import diagnose, supernode_command
from client.site_node import EXIT_DATA, default_state_dir, run_client
from momkd_fed.certs import provision
from momkd_fed.config import load_config
from momkd_fed.errors import ConfigError
from momkd_fed.processes import FlowerProcess, LaunchError
from server.coordinator import Coordinator, CoordinatorError, ServerOptions, required_sites
from server.deploy import superlink_command, write_flwr_config

# what flower-supernode 1.42 logs in each case (recorded on loopback)
LOG_UNREACHABLE = """WARNING :   Connection attempt failed, retrying in 1.27 seconds
WARNING :   Giving up reconnection after 2.25 seconds and 3 tries.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[Errno 111] Connection refused"""
LOG_TLS = """ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)"""
LOG_KEY = """ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink."""


def test_diagnose_tells_the_three_refusals_apart():
    assert diagnose(LOG_UNREACHABLE, "a", "h:9443").startswith("coordinator unreachable at h:9443")
    assert diagnose(LOG_TLS, "a", "h:9443").startswith("certificate mismatch")
    key = diagnose(LOG_KEY, "hospital_a", "h:9443")
    assert key.startswith("key not registered") and "sites/hospital_a.pub" in key
    assert diagnose("INFO : SuperNode ID: 5", "a", "h") is None


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("certs") / "p", coordinator_hosts=["coord.example"],
                     sites=["hospital_a", "hospital_b"])


def test_command_lines(prov, tmp_path):
    tls = superlink_command(prov.coordinator_dir, tmp_path / "s.db")
    assert "--enable-supernode-auth" in tls and "--insecure" not in tls
    assert tls[tls.index("--host") + 1] == "127.0.0.1" and tls[tls.index("--port") + 1] == "8000"
    plain = superlink_command(None, tmp_path / "s.db", insecure=True)
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain and "--ssl-certfile" not in plain
    sn = supernode_command(prov.site_dirs["hospital_a"], port=9100, node_config={"site": "hospital_a"},
                           max_retries=3, max_wait_time=20)
    assert sn[sn.index("--superlink") + 1] == "coord.example:9443"  # from the bundle
    assert sn[sn.index("--node-config") + 1] == 'site="hospital_a"'
    assert sn[sn.index("--max-retries") + 1] == "3" and sn[sn.index("--max-wait-time") + 1] == "20"
    ins = supernode_command(None, superlink="10.0.0.1:9092", insecure=True)
    assert "--insecure" in ins and "--auth-supernode-private-key" not in ins
    cfg_path = write_flwr_config(tmp_path / "h", "127.0.0.1:8000", None)
    assert "insecure = true" in cfg_path.read_text()


def test_coordinator_bundle_checks(prov, tmp_path):
    cfg = load_config(None)
    with pytest.raises(CoordinatorError, match="server.crt"):
        Coordinator(cfg, prov.site_dirs["hospital_a"], tmp_path, ServerOptions()).check_bundle()
    with pytest.raises(CoordinatorError, match="--certs"):
        Coordinator(cfg, None, tmp_path, ServerOptions()).check_bundle()
    Coordinator(cfg, prov.coordinator_dir, tmp_path, ServerOptions()).check_bundle()
    Coordinator(cfg, None, tmp_path, ServerOptions(insecure=True)).check_bundle()
    assert required_sites(cfg) == cfg.federation.min_sites


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from momkd_fed.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("tiny") / "data", seed=0, sites=("hospital_a", "hospital_b"),
                      slides_per_site=(16, 16), prevalence=(0.4, 0.6), histology_only=("hospital_b",))


def test_client_refuses_bad_data_naming_the_file(tiny, prov, tmp_path):
    import shutil

    import yaml

    site_dir = tmp_path / "hospital_a"
    shutil.copytree(tiny.parent / "hospital_a", site_dir)
    victim = sorted((site_dir / "features").rglob("*.h5"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated (corrupted) feature file
    doc = yaml.safe_load(tiny.read_text())
    doc["sites"] = [{"name": "hospital_a", "manifest": str(site_dir / "manifest.csv"),
                     "features_dir": str(site_dir / "features"), "omics": str(site_dir / "omics.csv")}]
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    said: list[str] = []
    code = run_client(cfg_path, "hospital_a", prov.site_dirs["hospital_a"], state_dir=tmp_path / "state",
                      say=said.append)
    assert code == EXIT_DATA
    assert any(victim.name in line and line.startswith("ERROR") for line in said), said
    assert "refusing to join" in said[-1]
    assert not (tmp_path / "state" / "supernode.log").exists()  # nothing was started


def test_client_refuses_another_sites_bundle(tiny, prov, tmp_path):
    with pytest.raises(ConfigError, match="bundle is for site 'hospital_b'"):
        run_client(tiny, "hospital_a", prov.site_dirs["hospital_b"], state_dir=tmp_path / "s", say=lambda m: None)
    with pytest.raises(ConfigError, match="bundle.json: not found"):
        run_client(tiny, "hospital_a", tmp_path / "no-bundle", state_dir=tmp_path / "s", say=lambda m: None)
    cfg = load_config(tiny)
    assert default_state_dir(cfg.site("hospital_a"), cfg).parts[-3:] == (".momkd_cache", "federated_state",
                                                                         "hospital_a")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_child_dies_with_its_supervisor(tmp_path):
    """die_with_parent: a SIGKILLed supervisor does not leave its Flower process behind."""
    code = ("import sys, time; sys.path[:0] = %r; from momkd_fed.processes import FlowerProcess; "
            "p = FlowerProcess('sleeper', ['sleep', '60'], %r, {}, die_with_parent=True); "
            "print(p.pid, flush=True); time.sleep(60)") % (sys.path, str(tmp_path / "s.log"))
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(sup.stdout.readline())
        assert _alive(child)
        sup.kill()
        sup.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        sup.kill()


def test_stop_finds_reparented_helpers(tmp_path):
    """A helper that outlived its parent (re-parented to init) is still stopped by PID once tracked."""
    p = FlowerProcess("forker", ["sh", "-c", "sleep 60 & echo $! ; wait"], tmp_path / "f.log", dict(os.environ))
    deadline = time.monotonic() + 10
    while not p.output().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    helper = int(p.output().split()[0])
    assert helper in p.track()
    os.kill(p.pid, signal.SIGKILL)  # the parent dies; the helper lives on, re-parented
    p.proc.wait(10)
    assert _alive(helper)
    p.stop(timeout=5)
    assert not _alive(helper)


def test_control_client_sends_again_after_a_dropped_connection_only():
    """The SuperLink closes idle keep-alive connections after 5 s; a request that races it is sent again. Flower's
    own errors (an HTTP answer) are not retried: they become a LaunchError with Flower's message."""
    import httpx

    from server.control import ControlClient

    client = object.__new__(ControlClient)  # no SuperLink needed for the retry rule
    client.address = "127.0.0.1:1"
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return "ok"

    assert client._call(flaky, "read run 1") == "ok" and len(calls) == 3
    calls.clear()

    def refused():
        calls.append(1)
        raise httpx.HTTPStatusError("403", request=httpx.Request("POST", "https://x"),
                                    response=httpx.Response(403, text="forbidden"))

    with pytest.raises(LaunchError, match="could not list the nodes .* HTTP 403"):
        client._call(refused, "list the nodes")
    assert len(calls) == 1

    def gone():
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(LaunchError, match="Connection refused"):
        client._call(gone, "list the nodes")
