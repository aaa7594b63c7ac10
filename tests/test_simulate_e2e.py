"""End to end through Flower's real simulation engine (SuperLink --simulation, flwr-simulation, Ray).

Slow (about a minute per simulation on 2 cores): marked ``slow``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from deploy_harness import Watch

pytestmark = pytest.mark.slow

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def test_simulate_tiny_end_to_end(tmp_path):
    from server.simulate import simulate

    out = tmp_path / "run"
    with Watch() as watch:
        code = simulate(None, out, [])
    assert code == 0
    names = {cmd.split()[1].rsplit("/", 1)[-1] if len(cmd.split()) > 1 else cmd for _, cmd in watch.seen.values()}
    assert any("flower-superlink" in n for n in names), names  # the real engine ran below us
    assert any("raylet" in cmd or "ray::" in cmd for _, cmd in watch.seen.values())
    assert watch.survivors() == []

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    sites = {"hospital_a", "hospital_b", "hospital_c"}  # hospital_c holds no genomics
    assert set(summary["test_auc"]) == sites | {"pooled"}
    assert summary["sites"]["hospital_c"]["paired"] is False
    assert 0.0 <= summary["test_auc"]["pooled"] <= 1.0
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(set(r["bytes_sent"]) == sites and r["seconds"]["total"] > 0 for r in rows)

    from momkd_fed.checkpoint import load_model

    model, cfg, meta = load_model(out / "global_model.pt")
    assert meta["round"] == 3 and cfg.federation.rounds == 3

    # the report is written at the end: the HTML page embeds every PNG, ROC curves come from local predictions
    page = (out / "report" / "index.html").read_text()
    pngs = sorted((out / "report").glob("*.png"))
    assert {"roc.png", "auc_per_round.png"} <= {p.name for p in pngs}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert page.count("data:image/png;base64,") >= len(pngs)
    assert sorted(p.name for p in (out / "predictions").glob("*.csv")) == [f"test_{s}.csv" for s in sorted(sites)]

    # the numbers a user reads are those of the file they use: predict reproduces them, head named, to 1e-6
    from momkd_fed.config import load_config
    from test_flower_inprocess import predict_test_slides

    assert "probability" not in (out / "predictions" / "test_hospital_a.csv").read_text().splitlines()[0]
    cfg = load_config(out / "data" / "federation.yaml")
    models = summary["models"]
    assert summary["test_auc_head"] == "memory" and "memory head" in summary["test_auc_model"]
    for file, expected in (("global_model.pt", summary["test_auc"]["pooled"]),
                           ("best_model.pt", models["best_model.pt"]["test_auc"]["pooled"])):
        assert models[file]["label"].startswith(f"global model ({file}, round ")
        assert models[file]["label"].endswith("memory head")
        auc_raw, auc_prob, rep = predict_test_slides(out / file, cfg, sorted(sites), tmp_path / file)
        assert rep.head == "memory" and rep.calibration is not None
        assert auc_raw == pytest.approx(expected, abs=1e-6) and auc_prob == pytest.approx(expected, abs=1e-6)
        ece = models[file]["test_ece_pooled"]["memory"]
        assert 0 <= ece["calibrated"] <= 1 and 0 <= ece["raw"] <= 1
    personal = models["personal_model.pt"]
    site = "hospital_c"  # the histology-only site
    (path,) = (out / "site_state" / site / summary["run_key"]).glob("personal_model.pt")
    auc_raw, auc_prob, rep = predict_test_slides(path, cfg, [site], tmp_path / "personal")
    assert rep.head == "classifier" and "personal model" in personal["label"] and "classifier" in personal["label"]
    assert auc_raw == pytest.approx(personal["test_auc"][site], abs=1e-6)
    assert auc_prob == pytest.approx(auc_raw, abs=1e-6)


def test_simulate_resume_matches_uninterrupted(tmp_path):
    """Real engine: 1 round, then resume to 2 rounds == 2 rounds in one go (in-process reference), to 1e-6."""
    from momkd_fed.config import load_config
    from momkd_fed.synth import synthesize
    from server import run_outputs
    from server.simulate import run_simulation

    from test_flower_inprocess import InProcessGrid
    from client.run_config import RunOptions, make_run_config, split_run_config
    from server.rounds import run_federation

    yaml = synthesize("tiny", tmp_path / "data", seed=0)
    over = {"memory.kmeans_iters": 3}
    out = tmp_path / "sim"
    with Watch() as watch:
        status, _ = run_simulation(load_config(yaml, {**over, "federation.rounds": 1}), out)
        assert status == "finished:completed"
        status, summary = run_simulation(load_config(yaml, {**over, "federation.rounds": 2}), out, resume=True)
    assert status == "finished:completed" and summary["rounds_completed"] == 2
    assert watch.survivors() == []

    ref = tmp_path / "ref"
    cfg = load_config(yaml, {**over, "federation.rounds": 2})
    rc = make_run_config(cfg, RunOptions(out_dir=str(ref), state_dir=str(ref / "site_state")))
    torch.set_num_threads(1)
    run_federation(InProcessGrid(rc, 3), *split_run_config(rc))

    a, b = run_outputs.load_latest(out, cfg), run_outputs.load_latest(ref, cfg)
    assert a.round == b.round == 2
    for k in a.shared:
        assert torch.allclose(a.shared[k], b.shared[k], atol=1e-6, rtol=0), k
    assert torch.allclose(a.slots, b.slots, atol=1e-6, rtol=0)
