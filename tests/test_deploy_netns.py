"""Multi-host on one machine: the coordinator and two sites in their own network namespaces
(deploy/netns/federation-netns.sh), sites reaching the coordinator ONLY through nginx (deploy/nginx/momkd-fed.conf)
on its public port 9443, TLS + SuperNode authentication, the tiny federation, 2 rounds.

Checked from a site's namespace while the federation trains: the Control API through the proxy is refused (403),
the SuperLink's own port is unreachable (it listens on the coordinator's loopback only), and the flwr CLI cannot
list runs through the proxy. Skipped where network namespaces cannot be created (not root, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_harness import (SITES, Watch, have_flower, make_certs, make_federation, rounds, run, start_client,
                            start_server, stop_all, wait_until)
from momkd_fed.processes import FlowerProcess

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "netns" / "federation-netns.sh"
RUN_TIMEOUT = 600.0
PROXY_PORT = 9443  # the real ports: each namespace has its own
LINK_PORT = 8000


def _netns_allowed() -> str | None:
    if sys.platform != "linux" or not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists():
        return "needs Linux with iproute2 (ip)"
    name = f"momkdprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _nginx() -> str | None:
    from test_deploy_nginx import NGINX

    return NGINX


_REASON = _netns_allowed()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_flower(), reason="flwr executables not on PATH"),
              pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
              pytest.mark.skipif(_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")]

PROBE = r"""
import http.client, socket, ssl, sys
host, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
def status(path):
    c = http.client.HTTPSConnection(host, {proxy}, context=ctx, timeout=10)
    c.request("POST", path, body=b"", headers={{"content-type": "application/protobuf"}})
    return c.getresponse().status
print("control", status("/v1/control/list-runs"))
print("start-run", status("/v1/control/start-run"))
print("runtime", status("/v1/runtime/pull-messages"))
try:
    socket.create_connection((host, {link}), timeout=5).close()
    print("superlink-port open")
except OSError as exc:
    print("superlink-port closed", type(exc).__name__)
""".format(proxy=PROXY_PORT, link=LINK_PORT)


@pytest.fixture
def namespaces(tmp_path):
    name = f"mkf{os.getpid() % 100000}"
    net = f"10.{random.randint(200, 250)}.{random.randint(1, 250)}"  # private, exists only in these namespaces
    up = run(["bash", str(SCRIPT), "up", name, net, *SITES])
    assert up.returncode == 0, up.stderr
    addrs = dict(line.split() for line in up.stdout.splitlines())
    try:
        yield name, addrs
    finally:
        down = run(["bash", str(SCRIPT), "down", name])
        assert down.returncode == 0, down.stderr
        assert not [ns for ns in run(["ip", "netns", "list"]).stdout.split() if ns.startswith(f"{name}-")]


def test_federation_across_namespaces_through_nginx(namespaces, tmp_path):
    from test_deploy_nginx import render_nginx

    name, addrs = namespaces
    coord_ns, coord_ip = f"{name}-coord", addrs["coord"]
    config = make_federation(tmp_path)
    prov = make_certs(tmp_path, [coord_ip])  # bundles say: connect to <coord_ip>:9443
    assert json.loads((prov.site_dirs["hospital_a"] / "bundle.json").read_text())["superlink"] == \
        f"{coord_ip}:{PROXY_PORT}"
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    conf = render_nginx(nginx_dir, prov.coordinator_dir, 1, LINK_PORT)
    site_conf = nginx_dir / "momkd-fed.conf"
    site_conf.write_text(site_conf.read_text().replace("listen 127.0.0.1:1 ssl;",
                                                       f"listen {coord_ip}:{PROXY_PORT} ssl;"))
    nginx = _nginx()
    out = tmp_path / "run"
    procs: list[FlowerProcess] = []
    with Watch() as watch:
        try:
            server = start_server(tmp_path, config, prov.coordinator_dir, out, netns=coord_ns)  # 127.0.0.1:8000
            procs.append(server)
            proxy = FlowerProcess("nginx", ["ip", "netns", "exec", coord_ns, nginx, "-p", str(nginx_dir), "-c",
                                            str(conf)], nginx_dir / "stdout.log", dict(os.environ))
            procs.append(proxy)
            wait_until(lambda: "waiting for 2 site(s)" in server.output(), 120, "the SuperLink", procs)
            # no --superlink: the sites use the address in their bundle, i.e. the proxy on the coordinator
            clients = [start_client(tmp_path, config, s, prov.site_dirs[s], netns=f"{name}-{s}") for s in SITES]
            procs += clients
            wait_until(lambda: "Receiving: train message" in clients[0].output(), RUN_TIMEOUT, "round 1", procs)

            # meanwhile, from a site's namespace: only the Fleet API is reachable
            probe = run(["ip", "netns", "exec", f"{name}-hospital_b", sys.executable, "-c", PROBE, coord_ip,
                         str(prov.site_dirs["hospital_b"] / "ca.crt")])
            assert probe.returncode == 0, probe.stderr
            assert probe.stdout.split("\n")[:3] == ["control 403", "start-run 403", "runtime 403"], probe.stdout
            assert "superlink-port closed" in probe.stdout  # 8000 is on the coordinator's loopback only
            flwr_home = tmp_path / "flwr_site_admin"
            flwr_home.mkdir()
            (flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{coord_ip}:{PROXY_PORT}"\n'
                f'root-certificates = "{prov.site_dirs["hospital_b"] / "ca.crt"}"\n')
            ls = run(["ip", "netns", "exec", f"{name}-hospital_b", "flwr", "ls", "x", "--format", "json"],
                     env={**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                          "FLWR_DISABLE_UPDATE_CHECK": "1"}, cwd=flwr_home)
            assert '"success": true' not in ls.stdout, ls.stdout

            wait_until(lambda: server.proc.poll() is not None, RUN_TIMEOUT, "the run to finish", procs)
            assert server.proc.returncode == 0, server.tail(60)
            assert [r["round"] for r in rounds(out)] == [1, 2]
            assert all(set(r["sampled"]) == set(SITES) for r in rounds(out))
            assert (out / "summary.json").is_file()
            access = (nginx_dir / "access.log").read_text()
            for s in SITES:  # the sites came from their own addresses, through the proxy
                assert f"{addrs[s]} - - " in access
            assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in access
            assert '"POST /v1/control/list-runs HTTP/1.1" 403' in access
        finally:
            stop_all(procs)
    assert watch.survivors() == []
