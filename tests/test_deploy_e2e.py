"""The real deployment on loopback: ``momkd-fed server`` and ``momkd-fed client`` processes, a TLS SuperLink with
SuperNode authentication, the tiny synthetic federation, 2 rounds. Start order does not matter:

- three sites are started BEFORE the coordinator: they wait for it; the coordinator is stopped after round 1 and
  restarted with --resume: the SuperNodes reconnect by themselves (same node ids) and the run completes from the
  checkpoint (summary.json, global_model.pt, report); meanwhile an intruder whose key the coordinator never
  registers keeps trying within its ``--max-wait-time``, then fails with "key not registered" and a non-zero exit
  (the coordinator never lists it);
- three sites are started right after the coordinator, while it starts its SuperLink and registers their keys; a
  site crashes (SIGKILL of its SuperNode) during round 1: the round completes with the others, the run
  finishes, the dropout is in rounds.jsonl.

Once a site is connected its messages' ClientApps are forked from its warm starter (client/warm_start.py). Slow
(about 2-4 minutes each on 2 cores): marked ``slow``. A site retrying while its key gets registered:
test_deploy_client.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from deploy_harness import (SITES, THREE_SITES, Watch, have_flower, kill_tree, make_certs, make_federation, rounds,
                            site_yaml, start_client, start_server, stop_all, wait_until)
from momkd_fed.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_flower(), reason="flwr executables not on PATH")]

RUN_TIMEOUT = 600.0  # seconds for one 2-round federation (about 2 min on an idle 2-core machine; far more under load)
INTRUDER_WAIT = 90  # the intruder's --max-wait-time: on the critical path (the resumed run ends sooner); its SuperNode
# starts in 5-20 s on an idle 2-core machine (2 min at load 27, where nothing here is on time)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy_fed")


def assert_sites_named(text: str, sites=SITES) -> None:
    m = re.search(rf"sites online: {len(sites)} of {len(sites)} needed \((.*)\)", text)
    assert m and sorted(m.group(1).split(", ")) == list(sites), text


def _finished(p):
    return p.proc.poll() is not None


def _forked(tmp_path, client) -> int:
    """How many ClientApp processes the site's warm starter forked."""
    log = tmp_path / "state" / client.name / "warm_start.log"
    return log.read_text().count("forked flwr-clientapp PID") if log.exists() else 0


def test_sites_started_before_the_coordinator_survive_its_restart_and_an_unregistered_key_fails_in_time(fed,
                                                                                                      tmp_path):
    config = make_federation(fed, THREE_SITES)
    prov = make_certs(tmp_path, ["localhost"], intruder=True, sites=THREE_SITES)
    port = free_port()
    link = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    procs = []
    with Watch() as watch:
        try:
            clients = [start_client(tmp_path, config, s, prov.site_dirs[s], "--superlink", link) for s in THREE_SITES]
            procs += clients
            wait_until(lambda: all("connecting to" in c.output() for c in procs), RUN_TIMEOUT, "the sites to start",
                       procs)
            time.sleep(3)  # they are retrying: nothing listens yet
            assert not any(_finished(c) for c in procs), [c.tail() for c in procs]
            first = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port), name="server1")
            procs.append(first)
            wait_until(lambda: len(rounds(out)) >= 1, RUN_TIMEOUT, "round 1", procs)
            # the coordinator is stopped after round 1 (SIGTERM: it stops the SuperLink and the ServerApp) ...
            first.stop(timeout=30)
            assert first.proc.returncode == 130, first.tail()
            text1 = first.output()
            assert "resume with --resume" in text1
            assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
            assert_sites_named(text1, THREE_SITES)
            assert re.search(r"3 site keys registered in \d+\.\d+ s", text1)  # one pass, in the coordinator
            assert re.search(r"^\s+1\s+\d+\.\d", text1, re.M), text1  # the progress row of round 1
            node_ids = [re.search(r"as node (\d+)", c.output()).group(1) for c in clients]

            # ... and restarted with --resume: the sites reconnect by themselves and the run finishes
            server = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port), "--resume",
                                  name="server2")
            procs.append(server)
            wait_until(lambda: "waiting for 3 site(s)" in server.output(), RUN_TIMEOUT, "the coordinator", procs)
            # a site the coordinator does not know: valid CA bundle, key never registered
            intruder_yaml = site_yaml(config, "hospital_b", "intruder", tmp_path / "intruder.yaml")
            t0 = time.monotonic()
            intruder = start_client(tmp_path, intruder_yaml, "intruder", tmp_path / "certs" / "sites" / "intruder",
                                    "--superlink", link, "--max-wait-time", str(INTRUDER_WAIT))
            procs.append(intruder)
            code = intruder.wait_exit(timeout=INTRUDER_WAIT + 180)
            assert code == 1, intruder.tail()
            assert time.monotonic() - t0 < INTRUDER_WAIT + 180  # within its --max-wait-time (+ data check, stop)
            text = intruder.output()
            assert "site intruder: key not registered" in text and "SuperNode ID" not in text
            assert text.count("does not know this site's key yet") <= 1  # said once at most (test_deploy_client)

            wait_until(lambda: _finished(server), RUN_TIMEOUT, "the resumed run to finish", procs)
            text = server.output()
            assert server.proc.returncode == 0, server.tail(60)
            assert "(resuming)" in text
            assert_sites_named(text, THREE_SITES)  # node ids -> names kept across the restart
            assert "No SuperNode found with the given public key" in (out / "flower" / "superlink.log").read_text()
            assert re.search(r"^\s+2\s+\d+\.\d", text, re.M), text  # the progress row of round 2
            assert "done: 2 rounds" in text and "global model (best_model.pt, round" in text  # file, head named
            assert "memory head: test AUC" in text and "personal models (personal_model.pt" in text
            assert "resume: continuing after round 1" in (out / "server.log").read_text()
            rows = rounds(out)
            assert [r["round"] for r in rows] == [1, 2]
            assert all(set(r["sampled"]) == set(THREE_SITES) and not r["dropouts"] for r in rows)
            assert all(set(r["seconds"]["replies"]["train"]) == set(THREE_SITES) for r in rows)
            summary = json.loads((out / "summary.json").read_text())
            assert summary["rounds_completed"] == 2 and set(THREE_SITES) <= set(summary["test_auc"])
            assert summary["setup_seconds"] > 0
            assert (out / "global_model.pt").is_file() and (out / "checkpoints").is_dir()
            assert summary["best"]["round"] in (1, 2) and (out / "best_model.pt").is_file()
            assert (out / "report" / "index.html").is_file()
            # the SuperLink and everything below it are gone; the sites are still connected, waiting, and kept
            # their node ids (key-based) across the restart
            assert all(not _finished(c) for c in clients), [c.tail() for c in clients]
            assert [re.findall(r"as node (\d+)", c.output())[-1] for c in clients] == node_ids
            for c in clients:
                # the rounds' messages (2 x train + evaluate) ran in ClientApps forked by the warm starter (it
                # starts once the site is connected: the first set-up messages may run cold)
                assert _forked(tmp_path, c) >= 4, c.name
                c.stop(timeout=20)
                assert c.proc.returncode == 0, c.tail()
        finally:
            stop_all(procs)
    assert watch.survivors() == []


def test_sites_started_right_after_the_coordinator_one_killed_mid_round_run_finishes(fed, tmp_path):
    config = make_federation(fed, THREE_SITES, min_sites=1, fraction_train=1.0)
    prov = make_certs(tmp_path, ["localhost"], sites=THREE_SITES)
    port = free_port()
    out = tmp_path / "run"
    procs = []
    with Watch() as watch:
        try:
            server = start_server(tmp_path, config, prov.coordinator_dir, out, "--port", str(port))
            procs.append(server)
            # at once, while the coordinator starts its SuperLink and registers the keys
            a, b, c = (start_client(tmp_path, config, s, prov.site_dirs[s], "--superlink", f"127.0.0.1:{port}")
                       for s in THREE_SITES)
            procs += [a, b, c]
            # crash hospital_b while it trains in round 1 (its SuperNode, SuperExec and ClientApp: SIGKILL)
            wait_until(lambda: "Receiving: train message" in b.output(), RUN_TIMEOUT, "round 1 at hospital_b",
                       procs)
            killed = kill_tree(b, include_self=False)
            assert killed
            assert b.wait_exit(timeout=30) == 1  # the wrapper notices and fails
            assert "the SuperNode exited" in b.output()

            wait_until(lambda: _finished(server), RUN_TIMEOUT, "the run to finish", procs)
            assert server.proc.returncode == 0, server.tail(60)
            assert_sites_named(server.output(), THREE_SITES)
            rows = rounds(out)
            assert [r["round"] for r in rows] == [1, 2]
            drop = rows[0]["dropouts"]
            assert [d["site"] for d in drop if d["phase"] == "train"] == ["hospital_b"], drop
            assert set(rows[0]["train"]) == {"hospital_a", "hospital_c"}
            assert set(rows[1]["sampled"]) == {"hospital_a", "hospital_c"}  # only the live sites are asked in round 2
            assert (out / "summary.json").is_file()
            assert all(re.search(r"connected to the coordinator as node \d+", x.output()) for x in (a, b, c))
        finally:
            stop_all(procs)
    assert watch.survivors() == []
