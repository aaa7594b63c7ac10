"""Federation maths against independent NumPy references: averaging, FedAvgM, memory merge, reply filtering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from momkd_fed.errors import ConfigError
from momkd_fed.federation import contract
from momkd_fed.federation.aggregate import (FedAvgMState, SharedUpdate, aggregate_shared, fedavgm_step,
                                            weighted_average)
from momkd_fed.federation.memory_merge import (MemoryAggregate, SlotUsage, memory_aggregate_for_reply,
                                               merge_memory, merge_memory_slots, slot_usage_for_reply)
from momkd_fed.federation.replies import ReplyError, SiteReply, usable_replies

RNG = np.random.default_rng(0)


def _state(rng, paired_keys=True):
    s = {"histology_encoder.w": rng.normal(size=(4, 3)).astype(np.float32),
         "patch_proj.b": rng.normal(size=(3,)).astype(np.float32),
         "histology_encoder.norm.num_batches_tracked": np.array(int(rng.integers(0, 100)), dtype=np.int64)}
    if paired_keys:
        s["omics_encoder.w"] = rng.normal(size=(2, 5)).astype(np.float32)
    return s


def _t(d):
    return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


# ---- weighted averaging ------------------------------------------------------------------------------------------
def test_weighted_average_matches_numpy_reference():
    states = [_state(RNG) for _ in range(3)]
    w = [10.0, 3.0, 7.0]
    out = weighted_average([(_t(s), wi) for s, wi in zip(states, w)])
    for k in ("histology_encoder.w", "patch_proj.b", "omics_encoder.w"):
        ref = sum(s[k].astype(np.float64) * wi for s, wi in zip(states, w)) / sum(w)
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=1e-6, atol=1e-6)
        assert out[k].dtype == torch.float32
    assert "histology_encoder.norm.num_batches_tracked" not in out  # integer buffers are not averaged


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [1.0, math.inf]])
def test_weighted_average_rejects_bad_weights(weights):
    s = _t(_state(RNG))
    with pytest.raises(ValueError):
        weighted_average([(s, w) for w in weights])


def test_aggregate_shared_paired_only_and_integer_buffers():
    glob = _state(RNG)
    a, b, c = _state(RNG), _state(RNG), _state(RNG, paired_keys=False)  # c: histology-only, omits omics keys
    updates = [SharedUpdate("a", _t(a), 4, True), SharedUpdate("b", _t(b), 12, True),
               SharedUpdate("c", _t(c), 20, False)]
    res = aggregate_shared(_t(glob), updates, paired_only=["omics_encoder.w"])
    ref_common = (a["histology_encoder.w"] * 4 + b["histology_encoder.w"] * 12 + c["histology_encoder.w"] * 20) / 36
    np.testing.assert_allclose(res.weights["histology_encoder.w"].numpy(), ref_common, atol=1e-6)
    ref_omics = (a["omics_encoder.w"] * 4 + b["omics_encoder.w"] * 12) / 16  # paired sites only
    np.testing.assert_allclose(res.weights["omics_encoder.w"].numpy(), ref_omics, atol=1e-6)
    k_int = "histology_encoder.norm.num_batches_tracked"
    assert int(res.weights[k_int]) == int(glob[k_int]) and k_int in res.frozen
    assert res.paired_sites == 2 and res.num_examples == 36
    assert list(res.weights) == list(glob)


def test_aggregate_shared_without_paired_sites_keeps_genomic_weights():
    glob = _state(RNG)
    updates = [SharedUpdate("c", _t(_state(RNG)), 5, False), SharedUpdate("d", _t(_state(RNG, False)), 5, False)]
    res = aggregate_shared(_t(glob), updates, paired_only=["omics_encoder.w"])
    np.testing.assert_array_equal(res.weights["omics_encoder.w"].numpy(), glob["omics_encoder.w"])
    assert "omics_encoder.w" in res.frozen


def test_aggregate_shared_rejects_missing_and_misshapen_keys():
    glob = _t(_state(RNG))
    with pytest.raises(ReplyError, match="missing"):  # a paired site must send the genomic keys
        aggregate_shared(glob, [SharedUpdate("a", _t(_state(RNG, False)), 1, True)], ["omics_encoder.w"])
    bad = _t(_state(RNG))
    bad["patch_proj.b"] = torch.zeros(4)
    with pytest.raises(ReplyError, match="shape"):
        aggregate_shared(glob, [SharedUpdate("a", bad, 1, True)], ["omics_encoder.w"])


# ---- FedAvgM ---------------------------------------------------------------------------------------------------
def _fedavgm_reference(w0, avgs, lr, beta):
    """Independent NumPy FedAvgM (Hsu et al.; SGD momentum, m_1 = d_1)."""
    w, m, out = {k: v.astype(np.float64) for k, v in w0.items()}, None, []
    for avg in avgs:
        d = {k: w[k] - avg[k] for k in w}
        m = d if m is None else {k: beta * m[k] + d[k] for k in w}
        w = {k: w[k] - lr * m[k] for k in w}
        out.append(w)
    return out


def test_fedavgm_step_matches_reference_over_rounds():
    w0 = {"a": RNG.normal(size=(5, 4)).astype(np.float32), "b": RNG.normal(size=(3,)).astype(np.float32)}
    avgs = [{k: (v + RNG.normal(size=v.shape, scale=0.1)).astype(np.float32) for k, v in w0.items()}
            for _ in range(4)]
    ref = _fedavgm_reference(w0, avgs, lr=0.7, beta=0.9)
    st = FedAvgMState(server_lr=0.7, server_momentum=0.9)
    w = _t(w0)
    for r, avg in enumerate(avgs):
        w = st.step(w, _t(avg))
        for k in w0:
            np.testing.assert_allclose(w[k].numpy(), ref[r][k], rtol=1e-5, atol=1e-5)
    st2 = FedAvgMState.from_state_dict(st.state_dict())
    assert torch.equal(st2.momentum["a"], st.momentum["a"])


def test_fedavgm_plain_fedavg_and_frozen_keys():
    w0 = _t({"a": RNG.normal(size=(3,)).astype(np.float32), "n": np.array(3, dtype=np.int64)})
    avg = _t({"a": RNG.normal(size=(3,)).astype(np.float32), "n": np.array(7, dtype=np.int64)})
    new, m = fedavgm_step(w0, avg, None, 1.0, 0.0)  # server optimisation off: exactly the average
    assert torch.equal(new["a"], avg["a"]) and m is None and int(new["n"]) == 3
    new, m = fedavgm_step(w0, avg, {"a": torch.ones(3)}, 1.0, 0.9, frozen=["a"])
    assert torch.equal(new["a"], w0["a"]) and torch.equal(m["a"], torch.ones(3))  # frozen: weight and momentum kept
    with pytest.raises(ConfigError):
        fedavgm_step(w0, avg, {"zzz": torch.ones(3)}, 1.0, 0.9)


def flower_train_replies(sites: list[tuple[dict[str, np.ndarray], int]], rnd: int) -> list:
    """Hand-built Flower train replies, one per (arrays, num-examples) site, for a strategy's aggregate_train."""
    from flwr import app as flwr_app
    from flwr.common import Metadata

    msgs = []
    for arrs, n in sites:
        content = flwr_app.RecordDict({
            "arrays": flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in arrs.items()}),
            "metrics": flwr_app.MetricRecord({"num-examples": n})})
        meta = Metadata(run_id=1, message_id="", src_node_id=2, dst_node_id=1, reply_to_message_id="m",
                        group_id=str(rnd), created_at=0.0, ttl=60.0, message_type="train")
        msgs.append(flwr_app.Message(content=content, metadata=meta))
    return msgs


def test_fedavgm_matches_flower_strategy():
    """Two rounds through flwr's own FedAvgM.aggregate_train on hand-built replies (flwr used in tests only)."""
    flwr_app = pytest.importorskip("flwr.app")
    from flwr.serverapp.strategy import FedAvgM

    rng = np.random.default_rng(1)
    glob = {"x": rng.normal(size=(4, 2)).astype(np.float32), "y": rng.normal(size=(3,)).astype(np.float32)}
    strat = FedAvgM(server_learning_rate=0.5, server_momentum=0.8)
    strat.current_arrays = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in glob.items()})
    state = FedAvgMState(server_lr=0.5, server_momentum=0.8)
    ours = _t(glob)
    for rnd in (1, 2):
        sites = [({k: (v + rng.normal(size=v.shape, scale=0.2)).astype(np.float32) for k, v in glob.items()}, n)
                 for n in (3, 9, 5)]
        msgs = flower_train_replies(sites, rnd)
        flwr_arrays, _ = strat.aggregate_train(rnd, msgs)
        avg = aggregate_shared(ours, [SharedUpdate(str(i), _t(a), n, False) for i, (a, n) in enumerate(sites)], [])
        ours = state.step(ours, avg.weights, avg.frozen)
        for k in glob:
            np.testing.assert_allclose(ours[k].numpy(), flwr_arrays[k].numpy(), rtol=1e-5, atol=1e-6)


# ---- memory merge ----------------------------------------------------------------------------------------------
def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_merge_memory_ema_against_numpy():
    k, s, mu = 4, 6, 0.5
    C = _unit(RNG.normal(size=(2, k, s)))
    reps = []
    for _ in range(3):
        counts = RNG.integers(1, 9, size=(2, k)).astype(np.float64)
        reps.append([RNG.normal(size=(2, k, s)) * counts[..., None], counts, counts.copy()])
    reps[0][1][0, 1] = reps[0][0][0, 1] = 0  # site 0 never used slot (0,1) ...
    reps[0][2][0, 1] = 0
    for r in reps:  # ... and nobody used slot (1,3)
        r[0][1, 3], r[1][1, 3], r[2][1, 3] = 0, 0, 0
    reps[2][2][0, 2] = 1  # site 2: slot (0,2) summarises a single slide: below min_slot_count=2
    min_count = 2
    # NumPy reference
    sums, cnts = np.zeros((2, k, s)), np.zeros((2, k))
    for su, co, sl in reps:
        ok = sl >= min_count
        sums += su * ok[..., None]
        cnts += co * ok
    ref = C.copy()
    for c in range(2):
        for j in range(k):
            if cnts[c, j] > 0:
                v = mu * C[c, j] + (1 - mu) * sums[c, j] / cnts[c, j]
                ref[c, j] = v / np.linalg.norm(v)
    aggs = [MemoryAggregate(*(torch.tensor(a, dtype=torch.float32) for a in r)) for r in reps]
    new, info = merge_memory(torch.tensor(C, dtype=torch.float32), aggs, mu, min_slot_count=min_count)
    np.testing.assert_allclose(new.numpy(), ref, atol=1e-5)
    assert torch.equal(new[1, 3], torch.tensor(C[1, 3], dtype=torch.float32))  # unused slot kept exactly
    assert not bool(info.updated[1, 3]) and info.withheld == 1 and info.replies == 3
    assert np.allclose(np.linalg.norm(new.numpy(), axis=-1), 1.0, atol=1e-5)


def test_merge_memory_no_replies_is_identity():
    C = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    new, info = merge_memory(C, [], 0.5)
    assert torch.equal(new, C) and math.isnan(info.mean_cos)


def test_merge_memory_slots_gradient_against_numpy():
    k, s, mu = 3, 5, 0.3
    C = _unit(RNG.normal(size=(2, k, s)))
    slots = [RNG.normal(size=(2, k, s)) * 3 for _ in range(2)]  # un-normalised trained parameters
    usage = [RNG.integers(0, 5, size=(2, k)).astype(np.float64) for _ in range(2)]
    usage[0][1, 2] = usage[1][1, 2] = 0
    usage[0][0, 0], usage[1][0, 0] = 4, 0
    acc, tot = np.zeros((2, k, s)), np.zeros((2, k))
    for sl, us in zip(slots, usage):
        acc += _unit(sl) * us[..., None]
        tot += us
    ref = C.copy()
    for c in range(2):
        for j in range(k):
            if tot[c, j] > 0:
                v = mu * C[c, j] + (1 - mu) * acc[c, j] / tot[c, j]
                ref[c, j] = v / np.linalg.norm(v)
    replies = [SlotUsage(torch.tensor(sl, dtype=torch.float32), torch.tensor(us, dtype=torch.float32),
                         torch.tensor(us, dtype=torch.float32)) for sl, us in zip(slots, usage)]
    new, info = merge_memory_slots(torch.tensor(C, dtype=torch.float32), replies, mu)
    np.testing.assert_allclose(new.numpy(), ref, atol=1e-5)
    assert torch.equal(new[1, 2], torch.tensor(C[1, 2], dtype=torch.float32))
    # site 0 alone used slot (0,0): the merged vector is its own normalised slot
    v = mu * C[0, 0] + (1 - mu) * _unit(slots[0][0, 0])
    np.testing.assert_allclose(new[0, 0].numpy(), v / np.linalg.norm(v), atol=1e-5)


def test_site_side_withholds_slots_below_min_count():
    k, s = 3, 4
    slides = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 0.0]])
    state = {"sums": torch.randn(2, k, s), "counts": slides * 10, "slides": slides}  # ClassMemory.aggregates()
    agg = memory_aggregate_for_reply(state, min_slot_count=2)
    sent = torch.tensor([[False, False, True], [True, True, False]])
    assert torch.equal(agg.counts > 0, sent) and torch.equal(agg.slides > 0, sent)
    assert bool((agg.sums[~sent] == 0).all()) and torch.equal(agg.sums[sent], state["sums"][sent])
    su = slot_usage_for_reply(torch.randn(2, k, s), state, min_slot_count=2)
    assert torch.equal(su.usage > 0, sent) and bool((su.slots[~sent] == 0).all())
    # a withheld slot is unused at the server: it keeps its value
    C = torch.nn.functional.normalize(torch.randn(2, k, s), dim=-1)
    new, info = merge_memory(C, [agg], 0.5, min_slot_count=2)
    assert torch.equal(new[~sent], C[~sent]) and torch.equal(info.updated, sent)
    back = MemoryAggregate.from_arrays(agg.to_arrays())
    assert torch.equal(back.sums, agg.sums) and torch.equal(back.counts, agg.counts)


# ---- reply filtering -------------------------------------------------------------------------------------------
def _metrics(n=5, paired=True):
    return contract.train_metrics(n, paired, {t: 0.1 for t in contract.LOSS_TERMS}, val_auc=math.nan)


def _mem(k=2, s=3):
    return {contract.SUMS: torch.ones(2, k, s), contract.COUNTS: torch.ones(2, k), contract.SLIDES: torch.ones(2, k)}


def test_usable_replies_drops_error_and_malformed_replies():
    shapes = {"a": (2,), "omics_encoder.w": (3,)}
    good = SiteReply("good", {"a": torch.ones(2), "omics_encoder.w": torch.ones(3)}, _mem(), _metrics())
    histo = SiteReply("histo", {"a": torch.ones(2)}, _mem(), _metrics(paired=False))  # may omit paired-only keys
    err = SiteReply("err", error="Node Unavailable")
    nan = SiteReply("nan", {"a": torch.tensor([1.0, math.nan]), "omics_encoder.w": torch.ones(3)}, _mem(),
                    _metrics())
    no_omics = SiteReply("paired-missing", {"a": torch.ones(2)}, _mem(), _metrics())
    zero = SiteReply("zero", {"a": torch.ones(2), "omics_encoder.w": torch.ones(3)}, _mem(), _metrics(n=0))
    bad_mem = SiteReply("badmem", {"a": torch.ones(2), "omics_encoder.w": torch.ones(3)}, _mem(k=3), _metrics())
    neg = _mem()
    neg[contract.COUNTS][0, 0] = -1
    neg_mem = SiteReply("neg", {"a": torch.ones(2), "omics_encoder.w": torch.ones(3)}, neg, _metrics())
    short = dict(_metrics())
    del short[contract.VAL_AUC]
    no_metric = SiteReply("nometric", {"a": torch.ones(2), "omics_encoder.w": torch.ones(3)}, _mem(), short)
    kept, dropped = usable_replies([good, histo, err, nan, no_omics, zero, bad_mem, neg_mem, no_metric], "ema",
                                   shapes, paired_only=["omics_encoder.w"], memory_shape=(2, 2, 3))
    assert [r.site for r in kept] == ["good", "histo"]
    reasons = dict(dropped)
    assert set(reasons) == {"err", "nan", "paired-missing", "zero", "badmem", "neg", "nometric"}
    assert "Node Unavailable" in reasons["err"] and "non-finite" in reasons["nan"]
    # gradient mode wants slots/usage/slides instead
    kept, dropped = usable_replies([good], "gradient")
    assert not kept and "expected" in dropped[0][1]


def test_train_metrics_contract():
    m = _metrics()
    assert tuple(m) == contract.TRAIN_METRIC_KEYS and m[contract.PAIRED] == 1
    with pytest.raises(KeyError):
        contract.train_metrics(3, False, {"ce": 0.1})
    e = contract.evaluate_metrics(4, 0.7, 0.6, 0.5, 3, 0.8, 0.75)
    assert tuple(e) == contract.EVALUATE_METRIC_KEYS and e[contract.VAL_SLIDES] == 3
    with pytest.raises(ValueError, match="val_slides"):
        contract.evaluate_metrics(4, 0.7, 0.6, 0.5, -1, 0.8, 0.75)
    arrs = contract.to_numpy({"x": torch.ones(2, dtype=torch.bfloat16)})
    assert arrs["x"].dtype == np.float32 and torch.equal(contract.from_numpy(arrs)["x"], torch.ones(2))
    p = contract.personal_metrics(e, 2, 0.9, 0.85)
    assert tuple(p) == contract.PERSONAL_METRIC_KEYS and p[contract.PERSONAL_FILE_ROUND] == 2
    assert contract.check_metrics(p, "personal") == p
    with pytest.raises(KeyError, match="missing"):
        contract.check_metrics(e, "personal")


def test_calibration_record_contract():
    good = {"memory": np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.5]])}
    out = contract.check_calibration(good, ["memory"], 3, val_slides=7)
    assert out["memory"].dtype == np.float64 and np.array_equal(out["memory"], good["memory"])
    assert contract.check_calibration({}, [], 3, 0) == {}  # no trained global head: nothing sent
    with pytest.raises(KeyError, match="unknown \\['classifier'\\]"):
        contract.check_calibration({**good, "classifier": good["memory"]}, ["memory"], 3, 7)
    with pytest.raises(ValueError, match="shape"):
        contract.check_calibration(good, ["memory"], 4, 7)
    with pytest.raises(ValueError, match="negative or non-finite"):
        contract.check_calibration({"memory": -good["memory"]}, ["memory"], 3, 7)
    with pytest.raises(ValueError, match="6.5 slides, the site has 5"):
        contract.check_calibration(good, ["memory"], 3, 5)


# ---- one round, composed -----------------------------------------------------------------------------------------
def test_merge_round_composes_filter_average_momentum_and_memory():
    from momkd_fed.config import FederationConfig
    from momkd_fed.federation.round_merge import merge_round

    fed = FederationConfig()
    glob = {"histology_encoder.w": torch.zeros(3), "omics_encoder.w": torch.zeros(2)}
    C = torch.nn.functional.normalize(torch.randn(2, 2, 3), dim=-1)

    def reply(site, h, o, n, paired, slides=3.0):
        sums = torch.zeros(2, 2, 3)
        sums[0, 0] = torch.tensor([2.0, 0, 0])
        mem = {contract.SUMS: sums, contract.COUNTS: torch.tensor([[2.0, 0], [0, 0]]),
               contract.SLIDES: torch.tensor([[slides, 0], [0, 0]])}
        w = {"histology_encoder.w": torch.full((3,), h)}
        if o is not None:
            w["omics_encoder.w"] = torch.full((2,), o)
        losses = {t: 1.0 for t in contract.LOSS_TERMS}
        return SiteReply(site, w, mem, contract.train_metrics(n, paired, losses, val_auc=0.5 if paired else math.nan))

    replies = [reply("a", 1.0, 4.0, 1, True), reply("b", 4.0, None, 3, False), SiteReply("c", error="boom")]
    opt = FedAvgMState(fed.server_lr, fed.server_momentum)
    out = merge_round(glob, C, replies, fed, "ema", opt)
    assert out.dropped == [("c", "error reply: boom")]
    # first FedAvgM step with lr 1: m = d, w - m = average
    assert torch.allclose(out.shared["histology_encoder.w"], torch.full((3,), (1.0 * 1 + 4.0 * 3) / 4))
    assert torch.allclose(out.shared["omics_encoder.w"], torch.full((2,), 4.0))  # paired site only
    v = fed.memory_momentum * C[0, 0] + (1 - fed.memory_momentum) * torch.tensor([1.0, 0, 0])
    assert torch.allclose(out.slots[0, 0], v / v.norm(), atol=1e-6) and torch.equal(out.slots[1], C[1])
    assert out.metrics["val_auc"] == 0.5 and out.metrics["num-examples"] == 4 and out.metrics["sites_used"] == 2


# ---- best round --------------------------------------------------------------------------------------------------
def test_best_round_selection_rules():
    from momkd_fed.federation.selection import BestRound, monitor_key, pooled_validation

    assert monitor_key(["wsi_encoder.", "classifier."]) == contract.VAL_AUC
    assert monitor_key(["wsi_encoder."]) == contract.VAL_AUC_MEMORY
    m = {"a": {contract.VAL_AUC: 0.8, contract.VAL_SLIDES: 30}, "b": {contract.VAL_AUC: 0.5, contract.VAL_SLIDES: 10},
         "c": {contract.VAL_AUC: math.nan, contract.VAL_SLIDES: 50}, "d": {contract.VAL_AUC: 0.1, contract.VAL_SLIDES: 0}}
    assert pooled_validation(m, contract.VAL_AUC) == pytest.approx((0.8 * 30 + 0.5 * 10) / 40)
    assert math.isnan(pooled_validation({"c": m["c"]}, contract.VAL_AUC))

    b = BestRound()
    assert b.offer(1, math.nan, "val_auc")  # nothing yet: taken
    assert b.offer(2, 0.6, "val_auc")  # finite beats NaN
    assert not b.offer(3, math.nan, "val_auc")  # NaN never displaces a finite value
    assert not b.offer(4, 0.6, "val_auc")  # ties keep the earlier round
    assert b.offer(5, 0.7, "val_auc") and not b.offer(6, 0.65, "val_auc")
    assert (b.round, b.score) == (5, 0.7)
    assert BestRound.from_state_dict(b.state_dict()) == b and BestRound.from_state_dict(None).round == 0
    nan_only = BestRound()
    assert all(nan_only.offer(r, math.nan, "val_auc") for r in (1, 2, 3)) and nan_only.round == 3  # latest kept
