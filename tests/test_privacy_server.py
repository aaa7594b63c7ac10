"""Server side: reply validation, robust and DP aggregation of the shared weights; the site's audit log."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from momkd_fed.config import PrivacyConfig, config_from_dict
from momkd_fed.federation import contract
from momkd_fed.federation.aggregate import SharedUpdate
from momkd_fed.federation.replies import SiteReply
from momkd_fed.privacy import (AuditLog, DPMeanAggregator, MeanAggregator, MedianAggregator, PlainMemorySum,
                               TrimmedMeanAggregator, audit_record, clip_shared_weights, clip_update, make_aggregator,
                               validate_replies)
from momkd_fed.privacy.robust import trim_count

K, S = 3, 4
GLOBAL = {"enc.w": torch.zeros(5, 3), "enc.b": torch.zeros(3), "omics.w": torch.zeros(2, 2),
          "enc.steps": torch.zeros((), dtype=torch.long)}
PAIRED_ONLY = ["omics.w"]


def _metrics(n: int, paired: bool) -> dict:
    return contract.train_metrics(n, paired, {t: 0.1 for t in contract.LOSS_TERMS}, 0.7, 0.6, 1.0)


def _memory(counts: float = 4.0, slides: float = 2.0) -> dict:
    sums = torch.zeros(2, K, S)
    sums[1, 0, 0] = counts * 0.9
    c = torch.zeros(2, K)
    c[1, 0] = counts
    sl = torch.zeros(2, K)
    sl[1, 0] = slides
    return {contract.SUMS: sums, contract.COUNTS: c, contract.SLIDES: sl}


def _reply(site: str, scale: float, n: int = 10, paired: bool = True, seed: int = 0, memory=None) -> SiteReply:
    g = torch.Generator().manual_seed(seed)
    shared = {k: (GLOBAL[k].float() + scale * torch.randn(GLOBAL[k].shape, generator=g)).to(GLOBAL[k].dtype)
              for k in GLOBAL if paired or k not in PAIRED_ONLY}
    return SiteReply(site, shared, _memory() if memory is None else memory, _metrics(n, paired))


def _validate(replies, privacy=PrivacyConfig(), noised=False):
    return validate_replies(replies, GLOBAL, "ema", PAIRED_ONLY, (2, K, S), privacy, noised)


def test_a_scaled_update_is_rejected_with_site_and_reason_and_the_round_goes_on(caplog):
    honest = [_reply(f"h{i}", 0.01 * (1 + i), seed=i) for i in range(3)]
    poisoned = _reply("evil", 5.0, seed=9)
    with caplog.at_level(logging.WARNING, logger="momkd_fed.privacy.validation"):
        kept, rejected = _validate(honest + [poisoned])
    assert [r.site for r in kept] == ["h0", "h1", "h2"]
    assert len(rejected) == 1 and rejected[0][0] == "evil" and "update norm" in rejected[0][1]
    assert "evil" in caplog.text and "update norm" in caplog.text
    # with two sites the leave-one-out median still catches it
    kept, rejected = _validate([honest[0], poisoned])
    assert [r.site for r in kept] == ["h0"] and rejected[0][0] == "evil"
    # the check can be switched off
    kept, _ = _validate(honest + [poisoned], PrivacyConfig(max_update_norm_factor=0.0))
    assert len(kept) == 4


def test_usable_replies_checks_still_apply_and_memory_plausibility_is_checked():
    bad_shape = _reply("shape", 0.01)
    bad_shape.shared["enc.w"] = torch.zeros(4, 3)
    nan = _reply("nan", 0.01)
    nan.shared["enc.b"] = torch.tensor([0.0, math.nan, 0.0])
    err = SiteReply("down", error="Node Unavailable")
    fractional = _reply("frac", 0.01, memory=_memory(counts=4.5))
    long_sum = _reply("long", 0.01, memory=_memory())
    long_sum.memory[contract.SUMS][1, 0, 0] = 9.0  # 4 unit vectors cannot sum to length 9
    ghost = _reply("ghost", 0.01, memory=_memory(counts=4.0, slides=5.0))  # 5 slides, 4 embeddings
    good = _reply("good", 0.01)
    kept, rejected = _validate([bad_shape, nan, err, fractional, long_sum, ghost, good])
    reasons = dict(rejected)
    assert [r.site for r in kept] == ["good"]
    assert "shape" in reasons["shape"] and "non-finite" in reasons["nan"] and "error reply" in reasons["down"]
    assert "whole numbers" in reasons["frac"] and "longer than its count" in reasons["long"]
    assert "more slides" in reasons["ghost"]
    # in DP mode fractional counts are expected, but a noised sum on a zero-count slot is not
    noisy = _reply("noisy", 0.01, memory=_memory(counts=4.5))
    leaky = _reply("leaky", 0.01)
    leaky.memory[contract.SUMS][0, 2, 1] = 0.3
    kept, rejected = _validate([noisy, leaky, good], noised=True)
    assert [r.site for r in kept] == ["noisy", "good"] and rejected[0][0] == "leaky"


def _updates(values: list[float], paired: list[bool] | None = None) -> list[SharedUpdate]:
    paired = paired or [True] * len(values)
    out = []
    for i, (v, p) in enumerate(zip(values, paired)):
        w = {k: torch.full(GLOBAL[k].shape, v, dtype=GLOBAL[k].dtype) for k in GLOBAL if p or k not in PAIRED_ONLY}
        w["enc.w"] = w["enc.w"] + torch.linspace(-0.1, 0.1, 15).reshape(5, 3) * (i + 1)
        out.append(SharedUpdate(f"s{i}", w, num_examples=10.0 * (i + 1), paired=p))
    return out


@pytest.mark.parametrize("agg", [MedianAggregator(), TrimmedMeanAggregator(0.2)])
def test_one_poisoned_site_among_four_cannot_move_a_robust_average_outside_the_honest_range(agg):
    honest = _updates([0.1, 0.2, 0.3])
    for poison in (1e6, -1e6, 0.25):
        evil = SharedUpdate("evil", {k: torch.full(GLOBAL[k].shape, poison, dtype=GLOBAL[k].dtype) for k in GLOBAL},
                            num_examples=1000.0, paired=True)
        out = agg.aggregate(GLOBAL, honest + [evil], PAIRED_ONLY)
        for k in ("enc.w", "enc.b", "omics.w"):
            stack = torch.stack([u.weights[k] for u in honest])
            lo, hi = stack.min(dim=0).values, stack.max(dim=0).values
            assert bool(((out.weights[k] >= lo - 1e-6) & (out.weights[k] <= hi + 1e-6)).all()), k
        assert out.weights["enc.steps"] == GLOBAL["enc.steps"] and "enc.steps" in out.frozen
    # the slide-weighted mean, by contrast, is dragged far away
    evil = SharedUpdate("evil", {k: torch.full(GLOBAL[k].shape, 1e6).to(GLOBAL[k].dtype) for k in GLOBAL}, 1000.0,
                        True)
    mean = MeanAggregator().aggregate(GLOBAL, honest + [evil], PAIRED_ONLY)
    assert float(mean.weights["enc.b"].max()) > 1e5


def test_robust_aggregators_average_the_genomic_encoder_over_paired_sites_only():
    ups = _updates([0.1, 0.2, 0.3, 9.0], paired=[True, True, True, False])
    out = MedianAggregator().aggregate(GLOBAL, ups, PAIRED_ONLY)
    assert torch.allclose(out.weights["omics.w"], torch.full((2, 2), 0.2))
    assert out.paired_sites == 3
    none_paired = _updates([0.1, 0.2], paired=[False, False])
    out = TrimmedMeanAggregator(0.2).aggregate(GLOBAL, none_paired, PAIRED_ONLY)
    assert "omics.w" in out.frozen and torch.equal(out.weights["omics.w"], GLOBAL["omics.w"])
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 10)] == [0, 0, 1, 1, 2]


def test_dp_mean_clips_each_update_and_adds_noise_scaled_to_the_clip_over_n():
    ups = _updates([0.1, 0.2, 5.0])
    agg = DPMeanAggregator(clip_norm=0.5, noise_multiplier=0.0)
    out = agg.aggregate(GLOBAL, ups, PAIRED_ONLY)
    assert agg.last_norms["s2"] > 10 and all(v > 0 for v in agg.last_norms.values())
    # without noise: the uniform mean of the clipped deltas, so its norm is at most the clip bound
    delta = {k: out.weights[k].float() - GLOBAL[k].float() for k in ("enc.w", "enc.b", "omics.w")}
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values())) <= 0.5 + 1e-6
    clipped, norm = clip_update({"a": torch.tensor([3.0, 4.0])}, 1.0)
    assert norm == 5.0 and torch.allclose(clipped["a"], torch.tensor([0.6, 0.8]))
    sent, norm = clip_shared_weights(ups[2].weights, GLOBAL, 0.5)  # site-side clipping before sending
    assert norm == pytest.approx(agg.last_norms["s2"]) and sent["enc.steps"].dtype == torch.long
    assert DPMeanAggregator(0.5, 0.0).aggregate(GLOBAL, ups[:2] + [SharedUpdate("s2", sent, 30.0, True)],
                                                PAIRED_ONLY).weights["enc.w"].allclose(out.weights["enc.w"], atol=1e-6)
    # with noise: the empirical std matches z * C / n
    noisy = DPMeanAggregator(0.5, 2.0, torch.Generator().manual_seed(0))
    draws = torch.stack([noisy.aggregate(GLOBAL, ups, PAIRED_ONLY).weights["enc.w"] - out.weights["enc.w"]
                         for _ in range(200)])
    assert float(draws.std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.1)
    cfg = config_from_dict({"memory": {"update": "ema"}, "privacy": {
        "enabled": True, "update_clip_norm": 0.5, "update_noise_multiplier": 1.0}})
    assert isinstance(make_aggregator(cfg), DPMeanAggregator)
    assert isinstance(make_aggregator(config_from_dict({"privacy": {"aggregator": "median"}})), MedianAggregator)
    assert isinstance(make_aggregator(config_from_dict({})), MeanAggregator)


def test_plain_memory_sum_adds_per_slot():
    from momkd_fed.federation.memory_merge import MemoryAggregate

    a = MemoryAggregate(**{k: v for k, v in zip(("sums", "counts", "slides"), _memory().values())})
    tot = PlainMemorySum().total([a, a])
    assert float(tot.counts[1, 0]) == 8.0 and float(tot.slides[1, 0]) == 4.0


def test_audit_log_appends_one_json_line_per_round_with_shapes_norms_and_budget(tmp_path):
    log = AuditLog.in_folder(tmp_path / "state")
    sent = {"arrays": {"enc.w": torch.ones(2, 2)}, "memory": {"sums": torch.zeros(2, K, S), "counts": torch.ones(2)}}
    for r in (1, 2):
        log.append(audit_record(r, "site-a", "train", sent, withheld={"few_slides": [[1, 2]], "withheld": 1},
                                clip={"clip_fraction": 0.5}, privacy={"epsilon_round": 4.7, "epsilon": 4.7 * r},
                                covers=["memory"], extra={"val_auc": math.nan}))
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2 and log.path.name == "privacy_audit.jsonl"
    rec = json.loads(lines[1])
    assert rec["round"] == 2 and rec["site"] == "site-a" and rec["dp_covers"] == ["memory"]
    assert rec["sent"]["arrays"]["enc.w"] == {"shape": [2, 2], "l2": 2.0}
    assert rec["sent"]["memory"]["sums"]["shape"] == [2, K, S] and rec["withheld"]["few_slides"] == [[1, 2]]
    assert rec["privacy"]["epsilon"] == pytest.approx(9.4) and rec["extra"]["val_auc"] is None
    assert "1.0, 1.0" not in log.path.read_text()  # values are never written, only shapes and norms
    assert [r["round"] for r in log.read()] == [1, 2]
    assert not list(log.path.parent.glob("*.tmp"))  # the temp file was renamed away
    # a torn last line (crash of a foreign writer) is not glued to the next record
    with open(log.path, "a") as fh:
        fh.write('{"round": 3')
    log.append(audit_record(4, "site-a", "train", {}))
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        log.read()
    assert json.loads(log.path.read_text().splitlines()[3])["round"] == 4
