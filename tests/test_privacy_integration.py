"""The privacy package wired into the federation, on hand-built Flower Messages in this process (fast).

Uses ``InProcessGrid`` of tests/test_flower_inprocess.py (the real ClientApp per node, the real strategy and server
loop). Checks: the DP train reply (minimum counts, noised slots, accountant saved, audit line written locally),
the minimum counts without DP, rejected replies (NaN, wrong shape, huge norm) with the round going on, update
clipping and the server's update-DP accountant across a resume, and epsilon in rounds.jsonl / summary.json. The
engine hook is checked against the memory's own aggregates.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from client import records as R
from client.run_config import RunOptions, make_run_config, split_run_config
from client.site_state import ACCOUNTANT_FILE
from momkd_fed.config import load_config
from momkd_fed.federation import contract
from momkd_fed.privacy import AUDIT_FILE, AuditLog, PrivacyAccountant, mechanism, noisy_threshold
from server import run_outputs
from server.rounds import run_federation

from test_flower_inprocess import InProcessGrid

DP = {"memory.update": "ema", "memory.slots": 4, "privacy.enabled": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from momkd_fed.synth import synthesize

    torch.set_num_threads(1)
    return synthesize("tiny", tmp_path_factory.mktemp("tiny") / "data", seed=0)


class RecordingGrid(InProcessGrid):
    """InProcessGrid that keeps every reply and may rewrite train replies: ``tamper[(round, node)](content)``."""

    def __init__(self, run_config: dict, n_nodes: int, tamper: dict | None = None) -> None:
        super().__init__(run_config, n_nodes)
        self.tamper = tamper or {}
        self.replies: list[tuple[Message, Message]] = []  # (sent, reply)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}  # one message per node per call
        out = []
        for rep in super().send_and_receive(messages, timeout=timeout):
            sent = by_node[rep.metadata.src_node_id]
            rnd = int(sent.content.config_records.get(contract.CONFIG_RECORD, {}).get(contract.CFG_ROUND, 0))
            fn = self.tamper.get((rnd, sent.metadata.dst_node_id))
            if fn is not None and sent.metadata.message_type == "train" and not rep.has_error():
                rep = Message(fn(rep.content), reply_to=sent)
            self.replies.append((sent, rep))
            out.append(rep)
        return out

    def train_replies(self) -> list[tuple[Message, Message]]:
        return [(s, r) for s, r in self.replies if s.metadata.message_type == "train" and not r.has_error()]


def _run_config(tiny: Path, out: Path, rounds: int, resume: bool = False, **over) -> dict:
    cfg = load_config(tiny, {"federation.rounds": rounds, "memory.kmeans_iters": 3, **over})
    return make_run_config(cfg, RunOptions(out_dir=str(out), resume=resume, state_dir=str(out / "site_state")))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _state_dir(out: Path, site: str) -> Path:
    (d,) = [p for p in (out / "site_state" / site).iterdir() if p.is_dir()]  # one run key
    return d


def test_dp_train_replies_audit_and_epsilon_in_run_outputs(tiny, tmp_path, monkeypatch):
    # the sites' noise from seeded generators instead of the OS's CSPRNG: "some slots sent, some withheld" below
    # depends on the draws (with the CSPRNG a run here once sent every slot)
    seeds = itertools.count(1)
    monkeypatch.setattr(mechanism, "secret_generator", lambda: torch.Generator().manual_seed(next(seeds)))
    rc = _run_config(tiny, tmp_path, rounds=2, **DP)
    grid = RecordingGrid(rc, 3)
    cfg, opts = split_run_config(rc)
    result = run_federation(grid, cfg, opts)
    assert result["rounds_completed"] == 2

    # every sent slot of every train reply passed the noisy threshold; some slots were sent, some withheld
    thr = noisy_threshold(cfg.federation.min_slot_count, cfg.privacy.min_slot_embeddings, cfg.privacy.clip_norm,
                          cfg.privacy.noise_multiplier)
    sent_slots = 0
    replies = grid.train_replies()
    assert len(replies) == 6
    for _, rep in replies:
        mem = R.from_record(rep.content.array_records[contract.MEMORY_RECORD])
        assert set(mem) == set(contract.EMA_MEMORY_KEYS)
        counts, slides, sums = mem[contract.COUNTS], mem[contract.SLIDES], mem[contract.SUMS]
        sent = counts != 0
        assert bool((counts[sent] >= thr).all()) and bool((slides[sent] >= cfg.federation.min_slot_count).all())
        assert bool((sums[~sent] == 0).all()) and bool((slides[~sent] == 0).all())
        assert not bool((counts[sent] == counts[sent].round()).all())  # noised: not whole numbers
        sent_slots += int(sent.sum())
        eps = rep.content.metric_records[contract.METRICS_RECORD][contract.PRIVACY_EPSILON]
        assert math.isfinite(eps) and eps > 0
    assert 0 < sent_slots < 6 * 2 * 4

    # identical metric keys from every site (epsilon and the commit / ortho terms included)
    rows = _rows(tmp_path)
    keys = {tuple(sorted(m)) for r in rows for m in r["train"].values()}
    assert keys == {tuple(sorted(contract.TRAIN_METRIC_KEYS))}
    assert all(m["loss_commit"] > 0 for m in rows[0]["train"].values())

    # epsilon per site = the accountant's after 1 and 2 releases; rounds.jsonl and summary.json report the max
    one, two = PrivacyAccountant(1.0, 1e-5), PrivacyAccountant(1.0, 1e-5)
    one.step()
    two.step(2)
    for r, acc in zip(rows, (one, two)):
        p = r["privacy"]
        assert set(p["epsilon_by_site"]) == {"hospital_a", "hospital_b", "hospital_c"}
        assert all(v == pytest.approx(acc.epsilon(), rel=1e-9) for v in p["epsilon_by_site"].values())
        assert p["epsilon"] == max(p["epsilon_by_site"].values())
        assert p["delta"] == 1e-5 and p["covers"] == ["memory"] and r["rejected"] == {}
    assert rows[0]["privacy"]["epsilon"] == pytest.approx(4.73, abs=0.01)
    assert result["privacy"]["enabled"] is True
    assert result["privacy"]["epsilon"] == pytest.approx(two.epsilon(), rel=1e-9)
    assert json.loads((tmp_path / "summary.json").read_text())["privacy"]["epsilon_by_site"] == \
        result["privacy"]["epsilon_by_site"]

    # the site's accountant and audit log stay in its state folder; the audit describes, never copies, values
    for site in ("hospital_a", "hospital_c"):
        d = _state_dir(tmp_path, site)
        assert json.loads((d / ACCOUNTANT_FILE).read_text())["steps"] == 2
        all_lines = AuditLog.in_folder(d).read()
        setup = [x["kind"] for x in all_lines if x["round"] == 0]  # the setup queries are audited too
        assert setup[0] == contract.QUERY_OMICS_MOMENTS and contract.QUERY_KMEANS_SEED in setup
        assert all(x["dp_covers"] == [] for x in all_lines if x["round"] == 0)  # no epsilon covers them
        lines = [x for x in all_lines if x["kind"] == "train"]
        assert [x["round"] for x in lines] == [1, 2]
        last = lines[-1]
        assert last["site"] == site and last["dp_covers"] == ["memory"]
        assert last["privacy"]["epsilon"] == pytest.approx(two.epsilon(), rel=1e-9) and last["privacy"]["steps"] == 2
        assert last["sent"]["memory"]["sums"]["shape"] == [2, 4, cfg.model.shared_dim]
        assert last["sent"]["memory"]["counts"]["l2"] > 0 and "patch_proj.weight" in last["sent"]["arrays"]
        assert last["clip"]["slides"] > 0 and last["withheld"]["sent"] + last["withheld"]["withheld"] == 8
        assert math.isfinite(last["extra"]["metrics"][contract.PRIVACY_EPSILON])
        assert all(set(desc) == {"shape", "l2"} for rec in last["sent"].values() for desc in rec.values())
        assert len((d / AUDIT_FILE).read_text()) < 20_000  # shapes and norms only, never the values
    # nothing of the audit or the accountant travelled in a reply
    assert all(set(r.content.array_records) == {contract.ARRAYS_RECORD, contract.MEMORY_RECORD}
               for _, r in replies)


def test_minimum_counts_apply_without_dp(tiny, tmp_path):
    """DP off: exact counts, but no slot below min_slot_count slides or min_slot_embeddings embeddings leaves."""
    rc = _run_config(tiny, tmp_path, rounds=1, **{"memory.update": "ema", "memory.slots": 4,
                                                  "federation.min_slot_count": 3, "privacy.min_slot_embeddings": 500})
    grid = RecordingGrid(rc, 3)
    cfg, opts = split_run_config(rc)
    result = run_federation(grid, cfg, opts)
    unsent = {}
    for _, rep in grid.train_replies():
        mem = R.from_record(rep.content.array_records[contract.MEMORY_RECORD])
        counts, slides = mem[contract.COUNTS], mem[contract.SLIDES]
        sent = counts > 0
        assert bool((counts[sent] >= 500).all()) and bool((slides[sent] >= 3).all())
        assert bool((counts == counts.round()).all())  # exact
        assert math.isnan(rep.content.metric_records[contract.METRICS_RECORD][contract.PRIVACY_EPSILON])
        unsent[R.reply_site(rep)] = int((~sent).sum())
    assert sorted(unsent) == ["hospital_a", "hospital_b", "hospital_c"]
    withheld = {}
    for site in unsent:  # each site's audit log says which used slots it withheld (unused ones are zeros too)
        d = _state_dir(tmp_path, site)
        line = next(x for x in AuditLog.in_folder(d).read() if x["kind"] == "train")
        assert line["dp_covers"] == [] and line["privacy"] == {}
        withheld[site] = line["withheld"]["withheld"]
        assert 0 <= withheld[site] <= unsent[site], (site, withheld, unsent)
        assert not (d / ACCOUNTANT_FILE).exists()
    assert sum(withheld.values()) > 0, withheld  # 500 embeddings per slot: some used slot is held back
    row = _rows(tmp_path)[0]
    assert row["privacy"]["epsilon"] is None and row["privacy"]["epsilon_by_site"] == {}
    assert result["privacy"]["enabled"] is False and math.isnan(result["privacy"]["epsilon"])
    assert json.loads((tmp_path / "summary.json").read_text())["privacy"]["epsilon"] is None

    # the evaluate reply: aggregate metrics and the calibration histograms, nothing else; the histograms are the
    # site's class-conditional validation counts under the same minimum count, and the audit log records them
    from momkd_fed.calibration import class_histogram, coarsen_histogram, edges_for
    from momkd_fed.checkpoint import load_model
    from momkd_fed.engine import evaluate
    from client.site_runtime import SiteRuntime

    global_model, _, _ = load_model(tmp_path / "checkpoints" / "round_0001.pt")
    evals = [(s, r) for s, r in grid.replies if s.metadata.message_type == "evaluate"]
    assert len(evals) == 3
    merged_any = False
    for sent, rep in evals:
        c = rep.content
        assert set(c.array_records) == {contract.CALIBRATION_RECORD}
        assert set(c.metric_records) == {contract.METRICS_RECORD, contract.PERSONAL_METRICS_RECORD}
        assert set(c.config_records) == {contract.SITE_RECORD}
        assert set(c.metric_records[contract.METRICS_RECORD]) == set(contract.EVALUATE_METRIC_KEYS)
        assert set(c.metric_records[contract.PERSONAL_METRICS_RECORD]) == set(contract.PERSONAL_METRIC_KEYS)
        hist = R.from_record(c.array_records[contract.CALIBRATION_RECORD])
        assert set(hist) == {"memory"}  # the global classifier is not shared: untrained, no histogram
        counts = hist["memory"].numpy()
        assert counts.shape == (2, cfg.calibration.bins)
        site = R.reply_site(rep)
        rt = SiteRuntime.load(cfg, RunOptions(), {"partition-id": [s.name for s in cfg.sites].index(site)})
        val = evaluate(global_model, rt.normalised("val", None, None), torch.device("cpu"))
        full = class_histogram(val.labels, val.memory_scores, edges_for(cfg, "memory"))
        rel = coarsen_histogram(full, 3)
        assert np.allclose(counts, rel.counts, atol=1e-12)
        assert counts.sum() + sum(rel.withheld) == pytest.approx(len(val.labels))
        merged_any |= rel.runs < cfg.calibration.bins
        for cls in (0, 1):  # every run of released counts holds 0 or >= 3 slides of each class
            row_counts = counts[cls]
            starts = [0] + [i for i in range(1, len(row_counts)) if not np.allclose(counts[:, i], counts[:, i - 1])]
            for a, b in zip(starts, starts[1:] + [len(row_counts)]):
                n = row_counts[a:b].sum()
                assert n == pytest.approx(0) or n >= 3 - 1e-9
        line = [x for x in AuditLog.in_folder(_state_dir(tmp_path, site)).read() if x["kind"] == "evaluate"]
        assert [x["round"] for x in line] == [1]
        assert line[0]["sent"] == {contract.CALIBRATION_RECORD: {"memory": {
            "shape": [2, cfg.calibration.bins], "l2": pytest.approx(float(np.linalg.norm(counts)))}}}
        assert line[0]["extra"]["calibration"]["memory"]["runs"] == rel.runs and line[0]["dp_covers"] == []
        assert set(line[0]["extra"]["metrics"]) == set(contract.EVALUATE_METRIC_KEYS)
    assert merged_any  # the minimum count did merge bins somewhere


def _nan_weight(content: RecordDict) -> RecordDict:
    shared = R.from_record(content.array_records[contract.ARRAYS_RECORD])
    shared["patch_proj.weight"][0, 0] = float("nan")
    content[contract.ARRAYS_RECORD] = R.to_record(shared)
    return content


def _huge_update(content: RecordDict) -> RecordDict:
    shared = R.from_record(content.array_records[contract.ARRAYS_RECORD])
    content[contract.ARRAYS_RECORD] = R.to_record({k: v * 1000 if torch.is_floating_point(v) else v
                                                   for k, v in shared.items()})
    return content


def _wrong_shape_memory(content: RecordDict) -> RecordDict:
    mem = R.from_record(content.array_records[contract.MEMORY_RECORD])
    mem[contract.COUNTS] = torch.ones(2, 5)
    content[contract.MEMORY_RECORD] = R.to_record(mem)
    return content


def test_nan_wrong_shape_and_huge_norm_replies_are_rejected_and_rounds_complete(tiny, tmp_path, caplog):
    tamper = {(1, 100): _huge_update, (1, 101): _nan_weight, (2, 101): _wrong_shape_memory}
    rc = _run_config(tiny, tmp_path, rounds=2, **{"memory.update": "ema", "memory.slots": 4})
    grid = RecordingGrid(rc, 3, tamper)
    cfg, opts = split_run_config(rc)
    with caplog.at_level("WARNING"):
        result = run_federation(grid, cfg, opts)
    assert result["rounds_completed"] == 2 and result["rejected"] == 3
    r1, r2 = _rows(tmp_path)
    assert set(r1["rejected"]) == {"hospital_a", "hospital_b"}
    assert "update norm" in r1["rejected"]["hospital_a"] and "non-finite" in r1["rejected"]["hospital_b"]
    assert sorted(r1["train"]) == ["hospital_c"]
    assert list(r2["rejected"]) == ["hospital_b"] and "shape" in r2["rejected"]["hospital_b"]
    assert sorted(r2["train"]) == ["hospital_a", "hospital_c"]
    assert {d["site"] for d in r1["dropouts"]} == {"hospital_a", "hospital_b"}
    assert "hospital_a" in caplog.text and "update norm" in caplog.text
    st = run_outputs.load_latest(tmp_path, cfg)
    assert all(bool(torch.isfinite(v).all()) for v in st.shared.values() if torch.is_floating_point(v))
    assert bool(torch.isfinite(st.slots).all())


def test_update_clipping_and_server_accountant_survive_resume(tiny, tmp_path):
    over = {**DP, "privacy.update_clip_norm": 0.5, "privacy.update_noise_multiplier": 2.0}
    cfg1, opts1 = split_run_config(_run_config(tiny, tmp_path, rounds=1, **over))
    grid = RecordingGrid(_run_config(tiny, tmp_path, rounds=1, **over), 3)
    run_federation(grid, cfg1, opts1)
    for sent, rep in grid.train_replies():  # the site clipped its update before sending
        g = R.from_record(sent.content.array_records[contract.ARRAYS_RECORD])
        w = R.from_record(rep.content.array_records[contract.ARRAYS_RECORD])
        norm = math.sqrt(sum(float((w[k].double() - g[k].double()).pow(2).sum()) for k in w
                             if torch.is_floating_point(w[k])))
        assert norm <= 0.5 + 1e-4
    line = next(x for x in AuditLog.in_folder(_state_dir(tmp_path, "hospital_a")).read() if x["kind"] == "train")
    assert line["extra"]["update_norm"] > 0.5 and line["dp_covers"] == ["memory", "shared_weights"]

    rc2 = _run_config(tiny, tmp_path, rounds=2, resume=True, **over)
    cfg2, opts2 = split_run_config(rc2)
    result = run_federation(InProcessGrid(rc2, 3), cfg2, opts2)
    st = run_outputs.load_latest(tmp_path, cfg2)
    assert st.accountant is not None and st.accountant.steps == 2  # restored, not restarted
    ref = PrivacyAccountant(2.0, 1e-5)
    ref.step(2)
    r1, r2 = _rows(tmp_path)
    assert r2["privacy"]["epsilon_update"] == pytest.approx(ref.epsilon(), rel=1e-9)
    assert r1["privacy"]["epsilon_update"] < r2["privacy"]["epsilon_update"]
    assert result["privacy"]["covers"] == ["memory", "shared_weights"]
    assert result["privacy"]["epsilon_update"] == pytest.approx(ref.epsilon(), rel=1e-9)


def test_engine_hook_sees_the_memory_before_it_moves(tiny):
    """Per-step accumulation through ``on_step`` without clipping equals the ema memory's own aggregates."""
    from client.local_round import _slot_recorder
    from client.site_runtime import SiteRuntime
    from momkd_fed.engine import make_optimizer, train_epoch
    from momkd_fed.privacy import SlotAccumulator

    cfg = load_config(tiny, {"memory.update": "ema", "memory.slots": 4, "memory.momentum": 0.5})
    rt = SiteRuntime.load(cfg, RunOptions(), {"partition-id": 0})
    bags = rt.normalised("train", *_moments(rt))[:8]
    model = rt.build_model(len(rt.data.genes))
    model.memory.reset_aggregates()
    acc = SlotAccumulator(model.memory.num_slots, int(model.memory.slots.shape[-1]), math.inf)
    calls = []
    recorder = _slot_recorder(model, acc)

    def hook(bag, out):
        calls.append(bag.slide_id)
        recorder(bag, out)

    before = model.memory.slots.clone()
    train_epoch(model, bags, make_optimizer(model, cfg.train), cfg, generator=torch.Generator().manual_seed(0),
                device=torch.device("cpu"), on_step=hook)
    assert len(calls) == len(bags) and not torch.equal(before, model.memory.slots)  # the memory moved
    agg, stats = acc.aggregate()
    ref = model.memory.aggregates()
    assert torch.equal(agg.counts, ref["counts"])  # same assignment as ClassMemory.update: before the move
    assert torch.allclose(agg.sums, ref["sums"], atol=1e-4)
    assert stats.clipped == 0 and stats.slides == len(set(calls))


def _moments(rt):
    from momkd_fed.data.omics import moments_to_mean_std

    return moments_to_mean_std(rt.moments())
