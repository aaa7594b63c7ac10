"""One real simulation (Flower's engine, Ray) with differential privacy of the memory on: it completes and reports
epsilon in summary.json and rounds.jsonl. Slow (about a minute on 2 cores): marked ``slow``."""

from __future__ import annotations

import json
import math

import pytest

from momkd_fed.privacy import PrivacyAccountant

pytestmark = pytest.mark.slow


def test_simulation_with_privacy_reports_epsilon(tmp_path):
    from momkd_fed.config import load_config
    from momkd_fed.synth import synthesize
    from server.simulate import run_simulation

    from deploy_harness import Watch

    yaml = synthesize("tiny", tmp_path / "data", seed=0)
    cfg = load_config(yaml, {"federation.rounds": 2, "memory.kmeans_iters": 3, "memory.update": "ema",
                             "privacy.enabled": True})
    out = tmp_path / "sim"
    with Watch() as watch:
        status, summary = run_simulation(cfg, out)
    assert status == "finished:completed" and summary["rounds_completed"] == 2
    assert watch.survivors() == []

    ref = PrivacyAccountant(cfg.privacy.noise_multiplier, cfg.privacy.delta)
    ref.step(2)
    written = json.loads((out / "summary.json").read_text())["privacy"]
    assert written["enabled"] is True and written["covers"] == ["memory"] and written["delta"] == 1e-5
    assert set(written["epsilon_by_site"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert written["epsilon"] == pytest.approx(ref.epsilon(), rel=1e-9)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert all(math.isfinite(e) for e in eps) and eps[0] < eps[1]
    # each virtual site kept its audit log and accountant in its own state folder
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        (audit,) = (out / "site_state" / site).glob("*/privacy_audit.jsonl")
        lines = [json.loads(x) for x in audit.read_text().splitlines()]
        assert [x["round"] for x in lines if x["kind"] == "train"] == [1, 2]
        assert {x["kind"] for x in lines if x["round"] == 0} >= {"omics_moments", "kmeans_seed"}  # setup audited
