"""The provisioned certificates and keys work with REAL Flower 1.42 processes on loopback.

A TLS SuperLink with SuperNode authentication (coordinator bundle), the site key registered with the `flwr` CLI,
a SuperNode with the site bundle that connects, and one with an unregistered key that is refused (exit 305).
Also a check that the Control API cannot be used without the federation CA (TLS verification).
"""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request

import pytest

from client.deploy import EXIT_AUTH_REFUSED, flower_exit_code, start_supernode, supernode_command
from momkd_fed.certs import provision
from momkd_fed.processes import FlowerProcess, LaunchError, flower_env, free_port
from server.control import ControlClient, register_keys_before_start
from server.deploy import flwr_cli, register_site_keys, start_superlink, write_flwr_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr executables not on PATH")]


def test_tls_superlink_accepts_registered_site_and_refuses_unregistered(tmp_path):
    prov = provision(tmp_path / "certs", coordinator_hosts=["coord.example"],
                     sites=["hospital_a", "intruder", "hospital_pre"])
    port = free_port()
    flwr_home = tmp_path / "flwr"
    procs: list[FlowerProcess] = []
    # the coordinator's way: straight into the state database before the SuperLink starts (again: known before)
    pre = register_keys_before_start(tmp_path / "state.db", [prov.coordinator_dir / "sites" / "hospital_pre.pub"])
    assert isinstance(pre["hospital_pre"], int)
    assert register_keys_before_start(tmp_path / "state.db", [prov.coordinator_dir / "sites" / "hospital_pre.pub"]) \
        == {"hospital_pre": None}
    try:
        link = start_superlink(prov.coordinator_dir, tmp_path / "state.db", tmp_path / "superlink.log",
                               port=port, timeout=240)
        procs.append(link)
        control = ControlClient(f"127.0.0.1:{port}", prov.coordinator_dir / "ca.crt")
        ids = register_site_keys(prov.coordinator_dir, control, sites=["hospital_a"])
        assert isinstance(ids["hospital_a"], int)
        # registering again is accepted (idempotent start of `momkd-fed server`) ...
        assert register_site_keys(prov.coordinator_dir, control, sites=["hospital_a"]) == {"hospital_a": None}
        # ... and the flwr CLI (deploy/README.md's manual command) sees the same: exit 0, "success": false
        write_flwr_config(flwr_home, f"127.0.0.1:{port}", prov.coordinator_dir / "ca.crt")
        res = flwr_cli(["supernode", "register", str(prov.coordinator_dir / "sites" / "hospital_a.pub")], flwr_home)
        assert res["success"] is False and "already in use" in res["error-message"]

        node, node_id = start_supernode(prov.site_dirs["hospital_a"], tmp_path / "sn_a.log", timeout=240,
                                        superlink=f"127.0.0.1:{port}", port=free_port(),
                                        node_config={"site": "hospital_a"})
        procs.append(node)
        assert node_id == ids["hospital_a"]  # with authentication the node id is the registered one
        status = {n["node-id"]: n["status"] for n in control.nodes()}
        assert status[node_id] == "online" and control.online() == [node_id]
        assert status[pre["hospital_pre"]] == "registered"  # the pre-registered key is the SuperLink's own node
        cli = {n["node-id"]: n["status"] for n in flwr_cli(["supernode", "ls"], flwr_home)["nodes"]}
        assert cli == {str(k): v for k, v in status.items()}  # the same answer as `flwr supernode ls` (same owner)
        control.close()

        # the other site's key was never registered: refused with exit 305
        argv = supernode_command(prov.site_dirs["intruder"], superlink=f"127.0.0.1:{port}", port=free_port())
        intruder = FlowerProcess("supernode intruder", argv, tmp_path / "sn_x.log", flower_env())
        procs.append(intruder)
        assert intruder.wait_exit(timeout=240) != 0
        assert flower_exit_code(intruder.output()) == EXIT_AUTH_REFUSED  # logged; the process status is 1
        assert "No SuperNode found with the given public key" in link.output()
        with pytest.raises(LaunchError, match="305"):
            start_supernode(prov.site_dirs["intruder"], tmp_path / "sn_x2.log", timeout=240,
                            superlink=f"127.0.0.1:{port}", port=free_port())

        # TLS is real: a client that does not trust the federation CA cannot even reach the Control API
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=10,
                                   context=ssl.create_default_context())
        ok = ssl.create_default_context(cafile=str(prov.coordinator_dir / "ca.crt"))
        assert urllib.request.urlopen(f"https://localhost:{port}/health", timeout=10, context=ok).status == 200
    finally:
        for p in reversed(procs):
            p.stop()
    assert all(p.proc.poll() is not None for p in procs)
