"""``momkd-fed client`` against a coordinator it cannot use: real flower-supernode processes, one clear line each.

- nothing listens at the address: "coordinator unreachable", after the bounded retries;
- a TLS server whose certificate comes from another provision: "certificate mismatch".
(Key not registered: tests/test_deploy_e2e.py; bad data: tests/test_deploy_launch.py.) About 10 s each.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from deploy_harness import have_flower, make_certs, make_federation, start_client
from momkd_fed.certs import provision
from momkd_fed.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_flower(), reason="flwr executables not on PATH")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_errors")
    return make_federation(root), make_certs(root, ["localhost"])


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
