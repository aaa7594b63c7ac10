"""deploy/: the nginx config matches Flower's Fleet API, the systemd units verify, compose/Dockerfile hold together."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from momkd_fed.certs import provision

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _fleet_paths_in_flwr() -> set[str]:
    import flwr.supernode.fleet_http_client as fleet  # tests may import flwr; momkd_fed may not

    return set(re.findall(r'path="/v1/fleet/([a-z-]+)"', Path(fleet.__file__).read_text()))


def test_nginx_allows_exactly_the_fleet_methods_flower_uses():
    conf = (DEPLOY / "nginx" / "momkd-fed.conf").read_text()
    m = re.search(r'"~\^/v1/fleet/\(([a-z|-]+)\)\$"', conf)
    assert m, "fleet method map not found"
    assert set(m.group(1).split("|")) == _fleet_paths_in_flwr()
    for refused in ("/v1/control/", "/v1/runtime/", "/docs", "/openapi.json"):
        assert re.search(rf"location [=^~ ]*{re.escape(refused)}\s*{{ return 403; }}", conf), refused
    assert "location / { return 404; }" in conf


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is not installed")
def test_nginx_config_is_accepted_by_nginx(tmp_path):
    from test_deploy_nginx import NGINX, render_nginx

    prov = provision(tmp_path / "certs", coordinator_hosts=["coord.example"], sites=["a"])
    (tmp_path / "n").mkdir()
    conf = render_nginx(tmp_path / "n", prov.coordinator_dir, 9443, 8000)
    r = subprocess.run([NGINX, "-t", "-p", str(tmp_path / "n"), "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr


@pytest.mark.parametrize("unit", ["momkd-fed-coordinator.service", "momkd-fed-site@.service"])
def test_systemd_units(tmp_path, unit):
    text = (DEPLOY / "systemd" / unit).read_text()
    for key in ("User=momkd-fed", "ProtectSystem=strict", "NoNewPrivileges=true", "ReadWritePaths=",
                "Restart=on-failure", "KillMode=control-group", "FLWR_TELEMETRY_ENABLED=0",
                "FLWR_DISABLE_UPDATE_CHECK=1"):
        assert key in text, f"{unit}: {key}"
    assert re.search(r"^ExecStart=\S+momkd-fed (server|client) --config \S+ ", text, re.M)
    if "@" in unit:
        assert "--site %i" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze absent")
    target = tmp_path / unit.replace("@.", "@hospital_a.")
    shutil.copy(DEPLOY / "systemd" / unit, target)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(target)], capture_output=True, text=True,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "is not executable" not in ln]  # /opt/momkd-fed/venv is not installed here
    assert not problems, problems


def test_compose_exposes_only_the_proxy_and_dockerfile_pins_torch():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"coordinator", "proxy", "hospital_a", "hospital_b"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published == ["9443:9443"]
    assert services["proxy"]["network_mode"] == "service:coordinator"
    for site in ("hospital_a", "hospital_b"):
        cmd = services[site]["command"]
        assert cmd[0] == "client" and cmd[cmd.index("--site") + 1] == site
    assert services["coordinator"]["command"][0] == "server"
    docker = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert docker.splitlines()[next(i for i, ln in enumerate(docker.splitlines()) if ln.startswith("FROM"))] \
        == "FROM python:3.11-slim"
    torch_at = docker.index("torch==2.13.0")
    assert "download.pytorch.org/whl/cpu" in docker and torch_at < docker.index("pip install .")
