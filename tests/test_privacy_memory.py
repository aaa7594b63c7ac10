"""Minimum counts, per-slide clipping and the Gaussian mechanism on the memory a site releases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momkd_fed.config import Config, FederationConfig, MemoryConfig, PrivacyConfig, config_from_dict
from momkd_fed.errors import ConfigError
from momkd_fed.federation import contract
from momkd_fed.federation.memory_merge import MemoryAggregate, merge_memory
from momkd_fed.model.memory import ClassMemory
from momkd_fed.privacy import (PrivacyAccountant, SlotAccumulator, assign_slots, check_privacy, memory_release,
                               noisy_threshold, privatize_memory, withhold_small_slots)

K, S = 4, 8


def _slide(gen: torch.Generator, n: int, centre: torch.Tensor, spread: float = 0.1) -> torch.Tensor:
    return F.normalize(centre + spread * torch.randn(n, centre.shape[-1], generator=gen), dim=-1)  # (n, S)


def _memory_with_slides(min_slot_count: int = 1) -> ClassMemory:
    torch.manual_seed(0)
    mem = ClassMemory(MemoryConfig(slots=K, update="ema"), S)
    gen = torch.Generator().manual_seed(1)
    # class 1: slot 0 gets 3 slides x 5 patches; slot 1 a single slide of 2 patches
    for _ in range(3):
        mem.update(1, _slide(gen, 5, mem.normalized()[1, 0], 0.01))
    mem.update(1, _slide(gen, 2, mem.normalized()[1, 1], 0.01))
    return mem


def test_a_slot_below_the_minimum_slides_or_embeddings_never_appears_in_a_reply():
    mem = _memory_with_slides()
    agg = mem.aggregates()
    assert agg["slides"][1, 0] == 3 and agg["slides"][1, 1] == 1 and agg["counts"][1, 1] == 2
    cfg = config_from_dict({"memory": {"update": "ema", "slots": K}, "federation": {"min_slot_count": 2}})
    rel = memory_release(cfg, aggregates=agg)
    sent = rel.as_tensors()
    assert sent[contract.COUNTS][1, 1] == 0 and sent[contract.SLIDES][1, 1] == 0
    assert float(sent[contract.SUMS][1, 1].abs().sum()) == 0.0
    assert sent[contract.COUNTS][1, 0] == 15 and torch.equal(sent[contract.SUMS][1, 0], agg["sums"][1, 0])
    assert rel.withheld.few_slides == [[1, 1]] and rel.withheld.sent == 1
    # the embeddings minimum: slot 0 has 15 embeddings, so a minimum of 16 withholds it too (with 3 slides)
    agg2, why = withhold_small_slots(MemoryAggregate(agg["sums"], agg["counts"], agg["slides"]), 1, 16)
    assert float(agg2.counts.sum()) == 0.0 and float(agg2.sums.abs().sum()) == 0.0
    assert sorted(why.few_embeddings) == [[1, 0], [1, 1]] and why.sent == 0
    # the server then treats the withheld slot as unused: it keeps its value exactly
    slots = mem.normalized()
    new, info = merge_memory(slots, [rel.aggregate], 0.5, 2)
    assert torch.equal(new[1, 1], slots[1, 1]) and not bool(info.updated[1, 1]) and bool(info.updated[1, 0])


def test_slot_accumulator_matches_the_memory_aggregates_without_clipping():
    mem = ClassMemory(MemoryConfig(slots=K, update="gradient"), S)
    acc = SlotAccumulator(K, S, clip_norm=math.inf)
    gen = torch.Generator().manual_seed(2)
    for i in range(6):
        y = i % 2
        x = _slide(gen, 7 + i, torch.randn(S, generator=gen), 0.8)
        acc.add_slide(assign_slots(x, mem.normalized()[y]), y, x, slide_id=f"s{i}")
        mem.update(y, x)
    agg, stats = acc.aggregate()
    ref = mem.aggregates()
    assert torch.allclose(agg.sums, ref["sums"], atol=1e-5)
    assert torch.equal(agg.counts, ref["counts"]) and torch.equal(agg.slides, ref["slides"])
    assert stats.slides == 6 and stats.clipped == 0


def _raw_concat_diff(a: MemoryAggregate, b: MemoryAggregate) -> float:
    return math.sqrt(float((a.sums - b.sums).pow(2).sum()) + float((a.counts - b.counts).pow(2).sum()))


@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0])
def test_adding_or_changing_one_slide_moves_the_pre_noise_release_by_at_most_the_clip_bound(clip):
    gen = torch.Generator().manual_seed(3)
    slots = F.normalize(torch.randn(2, K, S, generator=gen), dim=-1)  # (2, K, S)
    slides = [(i % 2, _slide(gen, 50 + 40 * i, slots[i % 2, i % K], 0.05)) for i in range(8)]

    def build(extra=None, replace=None) -> MemoryAggregate:
        acc = SlotAccumulator(K, S, clip)
        for i, (y, x) in enumerate(slides):
            if replace is not None and i == 0:
                y, x = replace
            acc.add_slide(assign_slots(x, slots[y]), y, x, slide_id=i)
        if extra is not None:
            y, x = extra
            acc.add_slide(assign_slots(x, slots[y]), y, x, slide_id="extra")
        return acc.aggregate()[0]

    base = build()
    # a huge slide (2000 patches in one slot) would move unclipped sums by ~2000 and counts by 2000
    big = (1, _slide(gen, 2000, slots[1, 2], 0.01))
    with_big = build(extra=big)
    assert _raw_concat_diff(base, with_big) <= clip + 1e-5
    assert float((with_big.sums - base.sums).norm()) <= clip + 1e-5
    assert float((with_big.counts - base.counts).norm()) <= clip + 1e-5
    # a slide spread over every slot, of the other class
    spread = (0, F.normalize(torch.randn(500, S, generator=gen), dim=-1))
    assert _raw_concat_diff(base, build(extra=spread)) <= clip + 1e-5
    # replacing one slide: at most 2C (remove + add)
    assert _raw_concat_diff(base, build(replace=big)) <= 2 * clip + 1e-5
    # clipped slides keep their direction: every released slot mean has norm <= 1
    means = base.sums.norm(dim=-1)[base.counts > 0] / base.counts[base.counts > 0]
    assert bool((means <= 1 + 1e-5).all())


def test_visits_of_one_slide_are_summed_before_clipping():
    gen = torch.Generator().manual_seed(4)
    slots = F.normalize(torch.randn(K, S, generator=gen), dim=-1)
    x = _slide(gen, 30, slots[0], 0.01)
    acc = SlotAccumulator(K, S, clip_norm=1.0)
    for _ in range(5):  # five local epochs
        contrib = acc.add_slide(assign_slots(x, slots), 0, x, slide_id="slide-7")
    agg, stats = acc.aggregate()
    assert len(acc) == 1 and stats.slides == 1 and stats.clipped == 1
    assert math.sqrt(float(agg.sums.pow(2).sum()) + float(agg.counts.pow(2).sum())) == pytest.approx(1.0, rel=1e-5)
    assert contrib.scale == pytest.approx(1.0 / contrib.raw_norm)
    with pytest.raises(ValueError, match="class 0, now 1"):
        acc.add_slide(assign_slots(x, slots), 1, x, slide_id="slide-7")


def test_the_gaussian_mechanism_noises_every_coordinate_with_std_sigma_c_and_withholds_on_noisy_counts():
    agg = MemoryAggregate(torch.zeros(2, K, S), torch.zeros(2, K), torch.zeros(2, K))
    agg.counts[1, 0], agg.sums[1, 0, 0], agg.slides[1, 0] = 50.0, 40.0, 60.0
    sigma, clip = 2.0, 0.5
    thr = noisy_threshold(1, 1, clip, sigma)
    assert thr == pytest.approx(3.0)
    draws = [privatize_memory(agg, sigma, clip, thr, torch.Generator().manual_seed(i)) for i in range(400)]
    sent_sums = torch.stack([d[0].sums[1, 0] for d in draws])  # (400, S)
    assert float((sent_sums[:, 1:]).std()) == pytest.approx(sigma * clip, rel=0.1)
    assert float(sent_sums[:, 0].mean()) == pytest.approx(40.0, abs=0.2)
    # empty slots almost never pass the 3-sigma threshold; the busy one always does
    passed_empty = sum(int((d[0].counts > 0).sum()) - 1 for d in draws)
    assert passed_empty <= 10  # expected 400 * 7 * 0.00135 ~ 3.8
    assert all(float(d[0].counts[1, 0]) > 0 for d in draws)
    out, why = draws[0]
    # the exact slide count is never released: the slides field is the noisy count
    assert torch.equal(out.slides, out.counts) and float(out.slides[1, 0]) != 60.0
    assert why.sent == int((out.counts > 0).sum()) and len(why.below_noisy_threshold) == 2 * K - why.sent


def test_memory_release_with_dp_steps_the_accountant_and_reports_epsilon():
    cfg = config_from_dict({"memory": {"update": "ema", "slots": K}, "privacy": {"enabled": True}})
    check_privacy(cfg)
    gen = torch.Generator().manual_seed(5)
    slots = F.normalize(torch.randn(2, K, S, generator=gen), dim=-1)
    acc = SlotAccumulator(K, S, cfg.privacy.clip_norm)
    for i in range(40):
        y = i % 2
        x = _slide(gen, 100, slots[y, i % K], 0.05)
        acc.add_slide(assign_slots(x, slots[y]), y, x, slide_id=i)
    accountant = PrivacyAccountant(cfg.privacy.noise_multiplier, cfg.privacy.delta)
    rel = memory_release(cfg, accumulator=acc, accountant=accountant, generator=torch.Generator().manual_seed(0))
    assert rel.dp and accountant.steps == 1 and rel.clip.clip_fraction == 1.0
    assert rel.privacy["epsilon"] == pytest.approx(rel.privacy["epsilon_round"])
    assert 4.0 < rel.privacy["epsilon"] < 5.5
    # 5 slides per slot of clipped mass ~0.7 each: mass ~3.5 vs threshold 3
    assert rel.withheld.sent >= 1
    with pytest.raises(ValueError, match="SlotAccumulator"):
        memory_release(cfg, aggregates={})


def test_privacy_settings_that_cannot_hold_are_rejected():
    with pytest.raises(ConfigError, match="memory.update 'ema'"):
        check_privacy(config_from_dict({"privacy": {"enabled": True}}))  # default memory.update is gradient
    with pytest.raises(ConfigError, match="update_clip_norm > 0"):
        check_privacy(config_from_dict({"privacy": {"update_noise_multiplier": 1.0}}))
    with pytest.raises(ConfigError, match="privacy.delta"):
        check_privacy(config_from_dict({"privacy": {"delta": 0.0}}))
    with pytest.raises(ConfigError, match="calibrated to the mean"):
        check_privacy(config_from_dict({"memory": {"update": "ema"}, "privacy": {
            "enabled": True, "update_clip_norm": 1.0, "update_noise_multiplier": 0.5, "aggregator": "median"}}))
    check_privacy(Config())  # defaults are valid
    assert Config().privacy == PrivacyConfig() and not Config().privacy.enabled
    assert FederationConfig().min_slot_count >= 1
