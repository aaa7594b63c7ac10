"""The real deployment on loopback: ``momkd-fed server`` and ``momkd-fed client`` processes, a TLS SuperLink with
SuperNode authentication, two sites of the tiny synthetic federation, 2 rounds.

- a full run completes (summary.json, global_model.pt, report) while a site whose key was never registered is
  refused (the client says so and exits non-zero; the coordinator never lists it);
- a site crashes (SIGKILL of its SuperNode) during round 1: the round completes with the other site, the run
  finishes, the dropout is in rounds.jsonl;
- the coordinator is stopped after round 1 and restarted with --resume: the SuperNodes reconnect and the run
  finishes from the checkpoint.

Slow (each about 1-2 minutes on 2 cores): marked ``slow``.
"""

from __future__ import annotations

import json
import re

import pytest

from deploy_harness import (SITES, Watch, have_flower, kill_tree, make_certs, make_federation, rounds,
                            site_yaml, start_client, start_server, stop_all, wait_until)
from momkd_fed.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_flower(), reason="flwr executables not on PATH")]

RUN_TIMEOUT = 600.0  # seconds for one 2-round federation (about 2 min on an idle 2-core machine; far more under load)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy_fed")


def coordinator_ready(server) -> None:
    """Sites started before the coordinator registered their keys are refused (systemd restarts them): wait."""
    wait_until(lambda: "waiting for 2 site(s)" in server.output(), 120, "the coordinator", [server])


def assert_sites_named(text: str) -> None:
    m = re.search(r"sites online: 2 of 2 needed \((.*)\)", text)
    assert m and sorted(m.group(1).split(", ")) == list(SITES), text


def _finished(p):
    return p.proc.poll() is not None


def test_tls_node_auth_two_sites_complete_and_unregistered_key_refused(fed, tmp_path):
    config = make_federation(fed)
    prov = make_certs(tmp_path, ["localhost"], intruder=True)
    port = free_port()
    link = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    procs = []
    with Watch() as watch:
        try:
            server = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port))
            procs.append(server)
            coordinator_ready(server)
            # a site the coordinator does not know: valid CA bundle, key never registered
            intruder_yaml = site_yaml(config, "hospital_b", "intruder", tmp_path / "intruder.yaml")
            intruder = start_client(tmp_path, intruder_yaml, "intruder", prov.site_dirs.get("intruder")
                                    or tmp_path / "certs" / "sites" / "intruder", "--superlink", link)
            procs.append(intruder)
            clients = [start_client(tmp_path, config, s, prov.site_dirs[s], "--superlink", link) for s in SITES]
            procs += clients
            code = intruder.wait_exit(timeout=90)
            assert code == 1, intruder.tail()
            assert "key not registered" in intruder.output()
            assert "SuperNode ID" not in intruder.output()

            wait_until(lambda: _finished(server), RUN_TIMEOUT, "the run to finish", procs)
            text = server.output()
            assert server.proc.returncode == 0, server.tail(60)
            assert_sites_named(text)
            assert "No SuperNode found with the given public key" in (out / "flower" / "superlink.log").read_text()
            # one progress row per round, with both sites' AUCs
            assert re.search(r"^\s+1\s+\d+\.\d", text, re.M) and re.search(r"^\s+2\s+\d+\.\d", text, re.M), text
            assert "done: 2 rounds" in text and "best by validation" in text
            rows = rounds(out)
            assert [r["round"] for r in rows] == [1, 2]
            assert all(set(r["sampled"]) == set(SITES) and not r["dropouts"] for r in rows)
            summary = json.loads((out / "summary.json").read_text())
            assert summary["rounds_completed"] == 2 and set(SITES) <= set(summary["test_auc"])
            assert (out / "global_model.pt").is_file() and (out / "checkpoints").is_dir()
            assert summary["best"]["round"] in (1, 2) and (out / "best_model.pt").is_file()
            assert (out / "report" / "index.html").is_file()
            # the SuperLink and everything below it are gone; the sites are still connected, waiting
            assert all(not _finished(c) for c in clients), [c.tail() for c in clients]
            for c in clients:
                assert re.search(r"connected to the coordinator as node \d+", c.output())
                c.stop(timeout=20)
                assert c.proc.returncode == 0, c.tail()
        finally:
            stop_all(procs)
    assert watch.survivors() == []


def test_site_killed_mid_round_run_finishes_with_the_other(fed, tmp_path):
    config = make_federation(fed, min_sites=1, fraction_train=1.0)
    prov = make_certs(tmp_path, ["localhost"])
    port = free_port()
    out = tmp_path / "run"
    procs = []
    with Watch() as watch:
        try:
            server = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port))
            procs.append(server)
            coordinator_ready(server)
            a, b = (start_client(tmp_path, config, s, prov.site_dirs[s], "--superlink", f"127.0.0.1:{port}")
                    for s in SITES)
            procs += [a, b]
            # crash hospital_b while it trains in round 1 (its SuperNode, SuperExec and ClientApp: SIGKILL)
            wait_until(lambda: "Receiving: train message" in b.output(), RUN_TIMEOUT, "round 1 at hospital_b",
                       procs)
            killed = kill_tree(b, include_self=False)
            assert killed
            assert b.wait_exit(timeout=30) == 1  # the wrapper notices and fails
            assert "the SuperNode exited" in b.output()

            wait_until(lambda: _finished(server), RUN_TIMEOUT, "the run to finish", procs)
            assert server.proc.returncode == 0, server.tail(60)
            rows = rounds(out)
            assert [r["round"] for r in rows] == [1, 2]
            drop = rows[0]["dropouts"]
            assert [d["site"] for d in drop if d["phase"] == "train"] == ["hospital_b"], drop
            assert set(rows[0]["train"]) == {"hospital_a"}
            assert set(rows[1]["sampled"]) == {"hospital_a"}  # only the live site is asked in round 2
            assert (out / "summary.json").is_file()
        finally:
            stop_all(procs)
    assert watch.survivors() == []


def test_coordinator_stopped_after_round_1_resumes_from_checkpoint(fed, tmp_path):
    config = make_federation(fed)
    prov = make_certs(tmp_path, ["localhost"])
    port = free_port()
    out = tmp_path / "run"
    procs = []
    with Watch() as watch:
        try:
            first = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port), name="server1")
            procs.append(first)
            coordinator_ready(first)
            clients = [start_client(tmp_path, config, s, prov.site_dirs[s], "--superlink", f"127.0.0.1:{port}")
                       for s in SITES]
            procs += clients
            wait_until(lambda: len(rounds(out)) >= 1, RUN_TIMEOUT, "round 1", procs)
            first.stop(timeout=30)  # SIGTERM: the coordinator stops the SuperLink and the ServerApp
            assert first.proc.returncode == 130, first.tail()
            assert "resume with --resume" in first.output()
            assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
            node_ids = [re.search(r"as node (\d+)", c.output()).group(1) for c in clients]

            second = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port), "--resume",
                                  name="server2")
            procs.append(second)
            wait_until(lambda: _finished(second), RUN_TIMEOUT, "the resumed run to finish", procs)
            assert second.proc.returncode == 0, second.tail(60)
            assert "(resuming)" in second.output()
            assert_sites_named(second.output())  # node ids -> names kept across the restart
            rows = rounds(out)
            assert [r["round"] for r in rows] == [1, 2]
            assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 2
            assert "resume: continuing after round 1" in (out / "server.log").read_text()
            # the SuperNodes survived the restart with their node ids (key-based) and reconnected by themselves
            assert all(not _finished(c) for c in clients)
            assert [re.findall(r"as node (\d+)", c.output())[-1] for c in clients] == node_ids
        finally:
            stop_all(procs)
    assert watch.survivors() == []
