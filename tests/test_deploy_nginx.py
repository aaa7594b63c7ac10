"""deploy/nginx/momkd-fed.conf in front of a REAL SuperLink: Fleet traffic passes, everything else is refused.

Runs nginx (own prefix, loopback port) with the shipped config, only paths and ports rewritten, in front of a TLS
SuperLink with SuperNode authentication; a SuperNode connects THROUGH the proxy, while Control/Runtime API calls,
the API docs, other methods, query strings and path tricks get 403/404 from the proxy.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from client.deploy import start_supernode
from momkd_fed.certs import provision
from momkd_fed.processes import FlowerProcess, LaunchError, free_port
from server.control import ControlClient
from server.deploy import flwr_cli, register_site_keys, start_superlink, write_flwr_config

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "momkd-fed.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)"),
              pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr executables not on PATH")]


def render_nginx(tmp: Path, certs: Path, listen_port: int, superlink_port: int) -> Path:
    """The shipped config with only paths and ports replaced, wrapped in a minimal main config."""
    text = CONF.read_text()
    for old, new in [("server 127.0.0.1:8000;", f"server 127.0.0.1:{superlink_port};"),
                     ("listen 9443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;"),
                     ("/etc/momkd-fed/certs/coordinator", str(certs)),
                     ("/var/log/nginx/momkd-fed.access.log", str(tmp / "access.log"))]:
        assert old in text, f"{CONF} no longer contains {old!r}; update this test"
        text = text.replace(old, new)
    (tmp / "momkd-fed.conf").write_text(text)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = tmp / "nginx.conf"
    main.write_text(f"""{user}daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    include {tmp}/momkd-fed.conf;
}}
""")
    return main


def _wait_port(port: int, proc: FlowerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise LaunchError(f"nginx exited: {proc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise LaunchError(f"nginx did not listen on {port}")


def _request(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_proxy_passes_fleet_only(tmp_path):
    prov = provision(tmp_path / "certs", coordinator_hosts=["coord.example"], sites=["hospital_a"])
    ca = prov.coordinator_dir / "ca.crt"
    link_port, proxy_port = free_port(), free_port()
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    conf = render_nginx(nginx_dir, prov.coordinator_dir, proxy_port, link_port)
    check = subprocess.run([NGINX, "-t", "-p", str(nginx_dir), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    procs: list[FlowerProcess] = []
    try:
        link = start_superlink(prov.coordinator_dir, tmp_path / "state.db", tmp_path / "superlink.log",
                               port=link_port, timeout=90)
        procs.append(link)
        proxy = FlowerProcess("nginx", [NGINX, "-p", str(nginx_dir), "-c", str(conf)], nginx_dir / "stdout.log",
                              dict(os.environ))
        procs.append(proxy)
        _wait_port(proxy_port, proxy)

        # refused by the proxy (the same requests straight to the SuperLink are answered by Flower: not 403/404)
        assert _request(link_port, ca, "POST", "/v1/control/list-runs") == 200  # the gap: no authentication
        reached = link.output().count("/v1/control/")
        refused = {("POST", "/v1/control/list-runs"): 403, ("POST", "/v1/control/register-node"): 403,
                   ("POST", "/v1/control/start-run"): 403, ("POST", "/v1/runtime/pull-messages"): 403,
                   ("GET", "/docs"): 403, ("GET", "/openapi.json"): 403, ("GET", "/health"): 404,
                   ("GET", "/"): 404, ("GET", "/v1/fleet/get-run"): 403,
                   ("POST", "/v1/fleet/no-such-method"): 404, ("POST", "/v1/fleet/get-run?x=1"): 404,
                   ("POST", "/v1/fleet/../control/list-runs"): 403,
                   ("POST", "/v1/fleet/%2e%2e/control/list-runs"): 403,
                   ("POST", "/v1/fleet/get-run/../../control/list-runs"): 403,
                   ("POST", "/v1/fleet/pull%2Dmessages"): 404}
        got = {k: _request(proxy_port, ca, *k) for k in refused}
        assert got == refused
        assert link.output().count("/v1/control/") == reached  # none of them reached the SuperLink ...
        # ... while a Fleet method is forwarded (Flower answers the empty body itself)
        assert _request(proxy_port, ca, "POST", "/v1/fleet/get-run") not in (403, 404)
        assert '"POST /v1/fleet/get-run HTTP/1.1"' in link.output()

        # the flwr CLI cannot administer the federation through the proxy ...
        write_flwr_config(tmp_path / "flwr_proxy", f"127.0.0.1:{proxy_port}", ca)
        with pytest.raises(LaunchError):
            res = flwr_cli(["supernode", "ls"], tmp_path / "flwr_proxy")
            if not res.get("success"):
                raise LaunchError(str(res))
        # ... only on loopback
        control = ControlClient(f"127.0.0.1:{link_port}", ca)
        ids = register_site_keys(prov.coordinator_dir, control)

        # a SuperNode connects through the proxy and comes online
        node, node_id = start_supernode(prov.site_dirs["hospital_a"], tmp_path / "sn.log", timeout=90,
                                        superlink=f"127.0.0.1:{proxy_port}", port=free_port(),
                                        node_config={"site": "hospital_a"})
        procs.append(node)
        assert node_id == ids["hospital_a"]
        assert {n["node-id"]: n["status"] for n in control.nodes()}[node_id] == "online"
        control.close()
        access = (nginx_dir / "access.log").read_text()
        assert "POST /v1/fleet/activate-node HTTP/1.1\" 200" in access
    finally:
        for p in reversed(procs):
            p.stop()
    assert all(p.proc.poll() is not None for p in procs)
