"""``momkd-fed client`` against a coordinator it cannot use: real flower-supernode processes, one clear line each.

- nothing listens at the address: "coordinator unreachable", after the bounded retries;
- a TLS server whose certificate comes from another provision: "certificate mismatch";
- a coordinator that is up but does not know the site's key yet: the site says so once and keeps trying, and
  connects as soon as the key is registered; a key never registered fails with "key not registered" once
  ``--max-wait-time`` is spent.
(Bad data: tests/test_deploy_launch.py.) About 10-60 s each.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest

from deploy_harness import have_flower, make_certs, make_federation, site_yaml, start_client, wait_until
from momkd_fed.certs import provision
from momkd_fed.processes import free_port
from server.control import ControlClient
from server.deploy import register_site_keys, start_superlink

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_flower(), reason="flwr executables not on PATH")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_errors")
    return make_federation(root), make_certs(root, ["localhost"], intruder=True)


def test_unreachable_coordinator(setup, tmp_path):
    config, prov = setup
    c = start_client(tmp_path, config, "hospital_a", prov.site_dirs["hospital_a"],
                     "--superlink", f"127.0.0.1:{free_port()}", "--max-retries", "1", "--max-wait-time", "3")
    try:
        assert c.wait_exit(timeout=90) == 1, c.tail()
        assert "site hospital_a: coordinator unreachable at 127.0.0.1:" in c.output()
    finally:
        c.stop()


def test_certificate_from_another_federation(setup, tmp_path):
    config, prov = setup
    other = provision(tmp_path / "other", coordinator_hosts=["localhost"], sites=["x"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(other.coordinator_dir / "server.crt", other.coordinator_dir / "server.key")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():  # accept and attempt the handshake (which the SuperNode aborts)
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            try:
                ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = start_client(tmp_path, config, "hospital_a", prov.site_dirs["hospital_a"],
                     "--superlink", f"localhost:{port}", "--max-retries", "1", "--max-wait-time", "5")
    try:
        assert c.wait_exit(timeout=90) == 1, c.tail()
        assert "site hospital_a: certificate mismatch" in c.output()
    finally:
        c.stop()
        stop.set()
        t.join()
        srv.close()


def test_site_keeps_trying_until_its_key_is_registered(setup, tmp_path):
    config, prov = setup
    port = free_port()
    link = start_superlink(prov.coordinator_dir, tmp_path / "state.db", tmp_path / "superlink.log", port=port,
                           timeout=120)
    late = never = None
    try:
        late = start_client(tmp_path, config, "hospital_a", prov.site_dirs["hospital_a"], "--superlink",
                            f"127.0.0.1:{port}", "--max-wait-time", "300", "--cold")
        never = start_client(tmp_path, site_yaml(config, "hospital_b", "intruder", tmp_path / "intruder.yaml"),
                             "intruder", prov.out / "sites" / "intruder", "--superlink", f"127.0.0.1:{port}",
                             "--max-wait-time", "60", "--cold")
        wait_until(lambda: "does not know this site's key yet" in late.output(), 180, "hospital_a's first refusal",
                   [late, link])
        time.sleep(3)  # refused again at least once, quietly
        with ControlClient(f"127.0.0.1:{port}", prov.coordinator_dir / "ca.crt") as control:
            node = register_site_keys(prov.coordinator_dir, control, ["hospital_a"])["hospital_a"]
        m = wait_until(lambda: re.search(r"connected to the coordinator as node (\d+)", late.output()), 120,
                       "hospital_a to connect once its key is registered", [late, link])
        assert int(m.group(1)) == node
        assert late.output().count("does not know this site's key yet") == 1
        assert late.proc.poll() is None
        # the key that is never registered: refused until --max-wait-time, then the clear message and exit 1
        assert never.wait_exit(timeout=180) == 1, never.tail()
        assert "key not registered" in never.output() and "SuperNode ID" not in never.output()
        assert "still refused after" in never.output() or "still not connected after" in never.output()
        late.stop(timeout=20)
        assert late.proc.returncode == 0, late.tail()
    finally:
        for p in (late, never, link):
            if p is not None:
                p.stop()
