"""The ClientApp, strategy and server loop on hand-built Flower Messages, all in this process (fast).

``InProcessGrid`` stands in for Flower's Grid: it hands each Message to the real ClientApp (``client_app.app``)
with a per-node Context (``partition-id`` as in simulation) and turns a raised exception into an error reply,
as Flower's runtime does. Everything else -- records, strategy, federation maths, checkpoints, run files -- is
the real code. The real simulation engine runs in tests/test_simulate_e2e.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import records as R
from client.client_app import app as client_app
from client.run_config import RunOptions, make_run_config, split_run_config
from client.site_state import SiteState, load_site_state, save_site_state
from momkd_fed.config import load_config
from momkd_fed.engine import evaluate
from momkd_fed.federation import contract
from server import run_outputs
from server.rounds import run_federation
from server.strategy import nan_weighted_mean


class InProcessGrid:
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process (node id = 100 + partition id)."""

    def __init__(self, run_config: dict, n_nodes: int, fail: dict[tuple[int, str], str] | None = None) -> None:
        self.run_config = run_config
        self.nodes = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                                                             "num-partitions": n_nodes},
                                       state=RecordDict(), run_config=run_config) for i in range(n_nodes)}
        self.fail = fail or {}  # (node, message type) -> reason: that node raises for that message type
        self.sent: list[Message] = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                if (node, msg.metadata.message_type) in self.fail:
                    raise RuntimeError(self.fail[(node, msg.metadata.message_type)])
                out.append(client_app(msg, self.nodes[node]))
            except Exception as exc:  # the runtime turns a ClientApp exception into an error reply
                out.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return out[::-1]  # arrival order must not matter


def predict_test_slides(model_path: Path, cfg, sites: list[str], out: Path, head: str | None = None):
    """``momkd-fed predict`` on the test slides of ``sites`` (their .h5 files copied into one folder, as a hospital
    would hand them over); returns (AUC of raw_score, AUC of probability, the PredictReport)."""
    import shutil

    from momkd_fed.data.site import load_site
    from momkd_fed.metrics import roc_auc
    from momkd_fed.predict import predict_paths

    feats = out / "slides"
    feats.mkdir(parents=True, exist_ok=True)
    labels = {}
    for name in sites:
        sc = cfg.site(name)
        for b in load_site(sc, cfg).split("test"):
            shutil.copy(next(Path(sc.features_dir).rglob(f"{b.slide_id}.h5")), feats / f"{b.slide_id}.h5")
            labels[b.slide_id] = b.label
    report = predict_paths(model_path, feats, out / "pred", head=head, device="cpu")
    assert not report.failed and sorted(r["slide_id"] for r in report.ok) == sorted(labels)
    y = [labels[r["slide_id"]] for r in report.ok]
    return (roc_auc(y, [r["raw_score"] for r in report.ok]), roc_auc(y, [r["probability"] for r in report.ok]),
            report)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from momkd_fed.synth import synthesize

    torch.set_num_threads(1)
    return synthesize("tiny", tmp_path_factory.mktemp("tiny") / "data", seed=0)


def _run_config(tiny: Path, out: Path, rounds: int = 2, resume: bool = False, **over) -> dict:
    cfg = load_config(tiny, {"federation.rounds": rounds, "memory.kmeans_iters": 3, **over})
    return make_run_config(cfg, RunOptions(out_dir=str(out), resume=resume, state_dir=str(out / "site_state")))


def test_run_config_round_trip(tiny, tmp_path):
    rc = _run_config(tiny, tmp_path)
    cfg, opts = split_run_config(rc)
    assert opts.out_dir == str(tmp_path) and opts.state_dir.endswith("site_state") and not opts.resume
    assert [s.name for s in cfg.sites] == ["hospital_a", "hospital_b", "hospital_c"]
    with pytest.raises(Exception, match="run.bogus"):
        split_run_config({**rc, "run.bogus": 1})


def test_site_state_round_selection(tmp_path):
    for r in (1, 2, 4):
        save_site_state(tmp_path, SiteState(round=r, private={"w": torch.full((2,), float(r))}, optimizer={}))
    assert load_site_state(tmp_path, 1) is None
    assert load_site_state(tmp_path, 4).round == 2  # train in round 4 reads the newest < 4
    assert load_site_state(tmp_path, 4, inclusive=True).round == 4  # evaluate reads <= 4
    save_site_state(tmp_path, SiteState(round=5, private={}, optimizer={}))
    assert sorted(p.name for p in tmp_path.glob("round_*.pt")) == ["round_0002.pt", "round_0004.pt", "round_0005.pt"]


def test_nan_weighted_mean_skips_nan():
    recs = [RecordDict({"m": R.metrics_record({"num-examples": 10, "a": 1.0, "b": math.nan})}),
            RecordDict({"m": R.metrics_record({"num-examples": 30, "a": 3.0, "b": 2.0})})]
    out = nan_weighted_mean(recs, "num-examples")
    assert out["a"] == pytest.approx(2.5) and out["b"] == pytest.approx(2.0) and "num-examples" not in out


def test_federation_in_process(tiny, tmp_path):
    """Setup + 2 rounds through the real ClientApp: run files, contract replies, histology-only site."""
    rc = _run_config(tiny, tmp_path)
    grid = InProcessGrid(rc, 3)
    cfg, opts = split_run_config(rc)
    result = run_federation(grid, cfg, opts)

    assert result["rounds_completed"] == 2
    assert set(result["test_auc"]) == {"pooled", "hospital_a", "hospital_b", "hospital_c"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["test_auc"].values())
    assert result["sites"]["hospital_c"]["paired"] is False and result["sites"]["hospital_a"]["paired"] is True
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    r1 = rows[0]
    # identical metric keys from every site; omics terms 0 at the histology-only site
    assert {tuple(sorted(m)) for m in r1["train"].values()} == {tuple(sorted(contract.TRAIN_METRIC_KEYS))}
    assert r1["train"]["hospital_c"]["loss_align_omics"] == 0.0 and r1["train"]["hospital_c"]["paired"] == 0
    assert r1["train"]["hospital_a"]["loss_recon"] > 0.0
    assert all(r1["bytes_sent"][s] > 0 and r1["bytes_received"][s] > 0 for s in r1["sampled"])
    # a histology-only site does not send the genomic encoder
    assert r1["bytes_received"]["hospital_c"] < r1["bytes_received"]["hospital_a"]
    assert r1["memory"]["memory_slots_updated"] > 0 and r1["dropouts"] == []
    # every loss term is sent (commit and ortho included); privacy off: no epsilon, nothing rejected
    assert all(m["loss_commit"] > 0 and m["loss_ortho"] >= 0 for m in r1["train"].values())
    assert all(m[contract.PRIVACY_EPSILON] is None for m in r1["train"].values())
    assert r1["rejected"] == {} and r1["privacy"]["epsilon"] is None and r1["privacy"]["covers"] == []
    assert result["privacy"]["enabled"] is False
    assert R.SITE_RECORD is contract.SITE_RECORD and R.CFG_RUN_KEY == contract.CFG_RUN_KEY  # names defined once
    assert (tmp_path / "global_model.pt").is_file() and (tmp_path / "config.yaml").is_file()
    assert run_outputs.checkpoint_rounds(tmp_path) == [1, 2]
    # site-private state stayed at the sites' state folders, one per round
    assert len(list((tmp_path / "site_state" / "hospital_c").glob("*/round_0002.pt"))) == 1

    from momkd_fed.checkpoint import load_model

    model, _, meta = load_model(tmp_path / "global_model.pt")
    assert meta["round"] == 2
    st = run_outputs.load_latest(tmp_path, cfg)
    assert torch.equal(model.state_dict()["memory.slots"], st.slots)

    # the best round by pooled validation AUC of the global model (memory head: the classifier is not shared)
    assert {tuple(sorted(v["global"])) for v in r1["evaluate"].values()} == {tuple(sorted(contract.EVALUATE_METRIC_KEYS))}
    assert all(v["global"][contract.VAL_SLIDES] > 0 for v in r1["evaluate"].values())
    pooled = [r["val_auc"]["pooled"] for r in rows]
    assert all(r["val_auc"]["monitor"] == contract.VAL_AUC_MEMORY for r in rows)
    assert pooled[0] is not None and pooled[1] is not None
    best = result["best"]
    assert best["round"] == (2 if pooled[1] > pooled[0] else 1) and best["val_auc"] == pytest.approx(max(pooled))
    assert best["test_auc_by_head"]["global_test_auc_memory"]["pooled"] == rows[best["round"] - 1]["test_auc"]["pooled"]
    best_model, _, best_meta = load_model(tmp_path / "best_model.pt")
    assert best_meta["round"] == best["round"]
    at_best, _, _ = load_model(tmp_path / "checkpoints" / f"round_{best['round']:04d}.pt")
    for k, v in at_best.state_dict().items():
        assert torch.equal(best_model.state_dict()[k], v), k

    # the paired sites' train messages carried the genomic statistics and the genomic encoder; the histology-only
    # site was sent neither (it never uses them), in train and evaluate messages alike
    by_site = {100 + i: s.name for i, s in enumerate(cfg.sites)}  # node id = 100 + partition id
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 6
    for m in grid.sent:
        if m.metadata.message_type not in ("train", "evaluate"):
            continue
        paired = by_site[m.metadata.dst_node_id] != "hospital_c"
        if contract.ARRAYS_RECORD in m.content.array_records:  # (round 2's train messages refer to a cache)
            keys = set(m.content.array_records[contract.ARRAYS_RECORD].keys())
            assert any(k.startswith("omics_encoder.") for k in keys) == paired
        assert (contract.OMICS_RECORD in m.content.array_records) == (paired and m.metadata.message_type == "train")
    assert r1["bytes_sent"]["hospital_c"] < r1["bytes_sent"]["hospital_a"]
    # round 2's train messages refer to the global model of round 1's evaluate message, which every site cached:
    # one copy of the model per site per round instead of two
    r2_train = [m for m in train_msgs if m.content.config_records[contract.CONFIG_RECORD][contract.CFG_ROUND] == 2]
    assert len(r2_train) == 3
    for m in r2_train:
        assert contract.ARRAYS_RECORD not in m.content.array_records
        assert contract.MEMORY_RECORD not in m.content.array_records
        assert m.content.config_records[contract.CONFIG_RECORD][contract.CFG_CACHED_ROUND] == 1
    r2 = rows[1]
    assert all(r2["bytes_sent"][s] < 0.6 * r1["bytes_sent"][s] for s in r1["bytes_sent"])

    # the model files a hospital uses, and the numbers summary.json gives for them (model file and head named)
    from momkd_fed.calibration import Calibration, calibrate_pooled, site_histograms
    from momkd_fed.data.site import load_site
    from momkd_fed.errors import CheckpointError
    from momkd_fed.heads import checkpoint_heads

    assert best_meta["heads"] == {"classifier": "untrained", "memory": "trained"}
    assert best_meta["primary_head"] == "memory" == result["models"]["best_model.pt"]["head"]
    assert result["models"]["best_model.pt"]["label"] == f"global model (best_model.pt, round {best['round']}), " \
                                                         "memory head"
    # best_model.pt's calibration is the Platt fit on the sites' pooled validation histograms of its round
    site_counts = {}
    for sc in cfg.sites:
        val = evaluate(best_model, load_site(sc, cfg).split("val"), torch.device("cpu"))
        site_counts[sc.name] = {h: r.counts for h, r in site_histograms(cfg, val.labels,
                                                                        {"memory": val.memory_scores}).items()}
    refit = calibrate_pooled(cfg, site_counts)["memory"]
    stored = Calibration.from_dict(best_meta["calibration"]["memory"])
    assert stored.slope == pytest.approx(refit.slope, abs=1e-9) and stored.threshold == refit.threshold
    assert stored.positives + stored.negatives == sum(v["global"][contract.VAL_SLIDES] for v in r1["evaluate"].values())
    assert rows[best["round"] - 1]["calibration"]["memory"] == best_meta["calibration"]["memory"]
    # predict answers with the calibrated memory head and reproduces each site's AUC in summary.json
    for site in ("hospital_a", "hospital_c"):
        auc_raw, auc_prob, rep = predict_test_slides(tmp_path / "best_model.pt", cfg, [site], tmp_path / f"p_{site}")
        assert rep.head == "memory" and rep.calibration == stored
        assert auc_raw == pytest.approx(result["models"]["best_model.pt"]["test_auc"][site], abs=1e-6)
        assert auc_prob == pytest.approx(auc_raw, abs=1e-12)  # calibration keeps the ranking
    # the untrained classifier is never used, and asking for it fails with the fix
    with pytest.raises(CheckpointError, match="classifier head of this model is untrained.*--head memory"):
        predict_test_slides(tmp_path / "best_model.pt", cfg, ["hospital_a"], tmp_path / "p_clf", head="classifier")
    assert checkpoint_heads(meta, cfg)["classifier"] == "untrained"  # global_model.pt too

    # each site's personal model: in its own state folder, of the last round (federation.personal_round)
    pers = result["models"]["personal_model.pt"]
    assert pers["rounds"] == {s.name: 2 for s in cfg.sites}
    assert "personal_model.pt at each site, its last round" in pers["label"]
    assert pers["head"] == "classifier" and set(pers["rounds"]) == {s.name for s in cfg.sites}
    site = "hospital_b"
    (path,) = (tmp_path / "site_state" / site).glob("*/personal_model.pt")
    _, _, pmeta = load_model(path)
    assert pmeta["extra"]["kind"] == "personal" and pmeta["round"] == pers["rounds"][site]
    assert pmeta["heads"] == {"classifier": "trained", "memory": "trained"} and pmeta["primary_head"] == "classifier"
    assert "validation split of site hospital_b" in pmeta["calibration"]["classifier"]["source"]
    auc_raw, auc_prob, rep = predict_test_slides(path, cfg, [site], tmp_path / "p_personal")
    assert rep.head == "classifier" and auc_raw == pytest.approx(pers["test_auc"][site], abs=1e-6)
    assert auc_prob == pytest.approx(auc_raw, abs=1e-12)
    assert pers["test_auc"][site] == pytest.approx(rows[-1]["evaluate"][site]["personal"][contract.TEST_AUC])


def test_personal_model_of_the_sites_best_validation_round(tiny, tmp_path):
    """federation.personal_round: best_validation: each site keeps the round of its best own validation AUC."""
    rc = _run_config(tiny, tmp_path, rounds=3, **{"federation.personal_round": "best_validation"})
    cfg, opts = split_run_config(rc)
    result = run_federation(InProcessGrid(rc, 3), cfg, opts)
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    pers = result["models"]["personal_model.pt"]
    assert "its own best validation round" in pers["label"]
    from momkd_fed.checkpoint import load_model

    chosen = []
    for sc in cfg.sites:
        val = [r["evaluate"][sc.name]["personal"][contract.VAL_AUC] for r in rows]
        best = 1 + max(range(len(rows)), key=lambda i: (val[i], -i))  # ties: the earlier round
        assert pers["rounds"][sc.name] == best and pers["val_auc"][sc.name] == pytest.approx(max(val))
        (path,) = (tmp_path / "site_state" / sc.name).glob("*/personal_model.pt")
        assert load_model(path)[2]["round"] == best
        chosen.append(best)
    assert chosen != [3, 3, 3]  # a site peaked before the last round: the rule differs from "last" here


class CacheLosingGrid(InProcessGrid):
    """Deletes a node's cached global model just before a train message that refers to it reaches the node."""

    def __init__(self, *a, lose: int, state_root: Path, **k) -> None:
        super().__init__(*a, **k)
        self.lose, self.state_root = lose, state_root

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            cfg = m.content.config_records.get(contract.CONFIG_RECORD, {})
            if m.metadata.dst_node_id == self.lose and contract.CFG_CACHED_ROUND in cfg:
                for f in self.state_root.glob("*/*/global_cache.pt"):
                    if f.parent.parent.name == self.site:
                        f.unlink()
        return super().send_and_receive(messages, timeout=timeout)


def test_a_site_that_lost_its_cache_is_sent_the_model_in_full(tiny, tmp_path):
    """Same result as the run where nothing is lost; the site's round-2 train message is resent with weights."""
    full, lost = tmp_path / "full", tmp_path / "lost"
    rc = _run_config(tiny, full)
    cfg, opts = split_run_config(rc)
    run_federation(InProcessGrid(rc, 3), cfg, opts)
    rc2 = _run_config(tiny, lost)
    cfg2, opts2 = split_run_config(rc2)
    grid = CacheLosingGrid(rc2, 3, lose=101, state_root=lost / "site_state")
    grid.site = cfg2.sites[1].name
    result = run_federation(grid, cfg2, opts2)
    assert result["rounds_completed"] == 2
    to_lost = [m for m in grid.sent if m.metadata.dst_node_id == 101 and m.metadata.message_type == "train"
               and m.content.config_records[contract.CONFIG_RECORD][contract.CFG_ROUND] == 2]
    assert [contract.ARRAYS_RECORD in m.content.array_records for m in to_lost] == [False, True]  # miss, resend
    row = json.loads((lost / "rounds.jsonl").read_text().splitlines()[1])
    assert set(row["train"]) == {s.name for s in cfg2.sites} and row["dropouts"] == []
    a, b = run_outputs.load_latest(full, cfg), run_outputs.load_latest(lost, cfg2)
    for k in a.shared:
        assert torch.equal(a.shared[k], b.shared[k]), k
    assert torch.equal(a.slots, b.slots)


def test_error_reply_is_dropped_and_logged(tiny, tmp_path):
    rc = _run_config(tiny, tmp_path, rounds=1)
    grid = InProcessGrid(rc, 3, fail={(101, "train"): "disk on fire"})
    cfg, opts = split_run_config(rc)
    result = run_federation(grid, cfg, opts)
    row = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert result["rounds_completed"] == 1
    assert [d["phase"] for d in row["dropouts"]] == ["train"] and "disk on fire" in row["dropouts"][0]["reason"]
    assert sorted(row["train"]) == ["hospital_a", "hospital_c"]


def test_resume_equals_uninterrupted(tiny, tmp_path):
    """Stop after round 1, resume to round 2 == two rounds without stopping (same seed), to 1e-6."""
    full, part = tmp_path / "full", tmp_path / "part"
    cfg, opts = split_run_config(_run_config(tiny, full, rounds=2))
    run_federation(InProcessGrid(_run_config(tiny, full, rounds=2), 3), cfg, opts)

    cfg1, opts1 = split_run_config(_run_config(tiny, part, rounds=1))
    run_federation(InProcessGrid(_run_config(tiny, part, rounds=1), 3), cfg1, opts1)
    rc2 = _run_config(tiny, part, rounds=2, resume=True)
    cfg2, opts2 = split_run_config(rc2)
    result = run_federation(InProcessGrid(rc2, 3), cfg2, opts2)
    assert result["rounds_completed"] == 2

    a, b = run_outputs.load_latest(full, cfg), run_outputs.load_latest(part, cfg2)
    assert a.round == b.round == 2
    for k in a.shared:
        assert torch.allclose(a.shared[k], b.shared[k], atol=1e-6, rtol=0), k
    assert torch.allclose(a.slots, b.slots, atol=1e-6, rtol=0)
    rows = [json.loads(line) for line in (part / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    np.testing.assert_allclose(rows[1]["test_auc"]["hospital_a"],
                               json.loads((full / "rounds.jsonl").read_text().splitlines()[1])["test_auc"]
                               ["hospital_a"], atol=1e-9)
    # the best-round choice survives the stop, and best_model.pt is the same model
    full_best = json.loads((full / "summary.json").read_text())["best"]
    assert result["best"]["round"] == full_best["round"]
    from momkd_fed.checkpoint import load_model

    ma, _, meta_a = load_model(full / "best_model.pt")
    mb, _, meta_b = load_model(part / "best_model.pt")
    assert meta_b["round"] == full_best["round"]
    cal_a, cal_b = meta_a["calibration"]["memory"], meta_b["calibration"]["memory"]  # the calibration too
    assert cal_a["threshold"] == cal_b["threshold"] and cal_a["slope"] == pytest.approx(cal_b["slope"], abs=1e-6)
    assert run_outputs.load_latest(part, cfg2).calibration["memory"]["source"] == cal_b["source"]
    for k, v in ma.state_dict().items():
        assert torch.allclose(v.float(), mb.state_dict()[k].float(), atol=1e-6, rtol=0), k


def test_resume_rewrites_a_best_model_the_stop_lost(tiny, tmp_path):
    """A stop between the round checkpoint and best_model.pt: resume writes best_model.pt from the checkpoint."""
    rc = _run_config(tiny, tmp_path, rounds=1)
    cfg, opts = split_run_config(rc)
    run_federation(InProcessGrid(rc, 3), cfg, opts)
    (tmp_path / "best_model.pt").unlink()  # round 1 is the best so far (the only one); its file is lost
    state = run_outputs.load_latest(tmp_path, cfg)
    assert state.best.round == 1
    run_outputs.restore_best_model(tmp_path, cfg, state)
    from momkd_fed.checkpoint import load_model

    best, _, meta = load_model(tmp_path / "best_model.pt")
    at1, _, _ = load_model(tmp_path / "checkpoints" / "round_0001.pt")
    assert meta["round"] == 1
    for k, v in at1.state_dict().items():
        assert torch.equal(best.state_dict()[k], v), k


def test_train_reply_shape_and_why_the_strategy_strips_memory(tiny, tmp_path):
    """A site's train reply holds two ArrayRecords; Flower's own FedAvgM rejects that, ours aggregates it."""
    from flwr.serverapp.strategy import FedAvgM

    rc = _run_config(tiny, tmp_path, rounds=1)
    grid = InProcessGrid(rc, 3)
    cfg, opts = split_run_config(rc)
    run_federation(grid, cfg, opts)  # setup + one round, to get real state folders and a real global model
    st = run_outputs.load_latest(tmp_path, cfg)
    from server.strategy import MomkdFedAvgM

    strat = MomkdFedAvgM(cfg, st, {})
    msgs = list(strat.configure_train(2, None, None, grid))
    assert [m.metadata.dst_node_id for m in msgs] == [100, 101, 102]
    replies = grid.send_and_receive(msgs)
    for rep in replies:
        c = rep.content
        assert set(c.array_records) == {contract.ARRAYS_RECORD, contract.MEMORY_RECORD}
        assert set(c.array_records[contract.MEMORY_RECORD]) == set(contract.GRADIENT_MEMORY_KEYS)
        assert c.metric_records[contract.METRICS_RECORD][contract.NUM_EXAMPLES] == \
            c.config_records[R.SITE_RECORD][R.SITE_TRAIN_SLIDES]  # num-examples = training slides
    with pytest.raises(Exception, match="exactly one ArrayRecord"):
        FedAvgM().aggregate_train(2, replies)
    before = {k: v.clone() for k, v in st.shared.items()}
    arrays, metrics = strat.aggregate_train(2, replies)
    assert arrays is not None and metrics["loss_total"] > 0
    # the genomic encoder moved (2 paired sites), and so did the histology encoder
    po = [k for k in st.shared if k.startswith("omics_encoder.")]
    assert po and not torch.equal(before[po[0]], st.shared[po[0]])
    assert not torch.equal(before["patch_proj.weight"], st.shared["patch_proj.weight"])


def test_ema_mode_and_withheld_slots(tiny, tmp_path):
    """ema memory: sums/counts replies; a min_slot_count no site reaches withholds every slot (memory stays)."""
    rc = _run_config(tiny, tmp_path, rounds=1, **{"memory.update": "ema", "federation.min_slot_count": 10_000})
    grid = InProcessGrid(rc, 3)
    cfg, opts = split_run_config(rc)
    with pytest.raises(Exception, match="memory initialisation|non-empty local clusters"):
        run_federation(grid, cfg, opts)  # k-means clusters are withheld too: the federation refuses to start
    rc = _run_config(tiny, tmp_path, rounds=1, **{"memory.update": "ema", "federation.min_slot_count": 1})
    cfg, opts = split_run_config(rc)
    grid = InProcessGrid(rc, 3)
    run_federation(grid, cfg, opts)
    row = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert row["memory"]["memory_slots_updated"] > 0
    train_replies = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train_replies


def test_deployment_node_config_resolves_the_local_site(tiny):
    from client.site_runtime import resolve_site

    cfg = load_config(tiny)
    site = resolve_site({"site": "hospital_b", "config-path": str(tiny)}, cfg.__class__())
    assert site.name == "hospital_b" and site.manifest.endswith("manifest.csv")
    assert resolve_site({"partition-id": 2}, cfg).name == "hospital_c"
    with pytest.raises(Exception, match="partition-id=7"):
        resolve_site({"partition-id": 7}, cfg)
    with pytest.raises(Exception, match="no 'site' key"):
        resolve_site({}, cfg)
