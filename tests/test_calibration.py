"""Calibration maths: monotone Platt map (ranking and AUC kept), threshold rules, histograms under minimum counts,
the federated fit from pooled counts, ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from momkd_fed import calibration as C
from momkd_fed.losses import memory_delta
from momkd_fed.metrics import choose_threshold, roc_auc


def _scores(n=120, seed=0, head="memory"):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    if head == "memory":
        s = np.clip(rng.normal(0.4 * (2 * y - 1), 0.5), -2.3, 2.3)
    else:
        s = 1.0 / (1.0 + np.exp(-rng.normal(1.5 * (2 * y - 1), 2.0)))
    return y, s


@pytest.mark.parametrize("head", ["memory", "classifier"])
def test_calibrated_probability_is_strictly_increasing_in_the_raw_score_and_keeps_the_auc(head):
    y, s = _scores(head=head)
    cal = C.calibrate_points(head, y, s)
    lo, hi = C.score_range(head, 16, 5.0)
    grid = np.linspace(lo + 1e-9, hi - 1e-9, 2001)  # (2001,)
    p = cal.probability(grid)
    assert np.all(np.diff(p) > 0) and np.all((p > 0) & (p < 1))
    assert roc_auc(y, cal.probability(s)) == pytest.approx(roc_auc(y, s), abs=1e-12)
    # the decision on the raw scale is the decision on the probability scale
    assert np.array_equal(cal.predict(s), (cal.probability(s) >= cal.probability_threshold).astype(np.int64))
    # from counts too (the federated fit)
    edges = C.bin_edges(head, 50, 16, 5.0)
    cc = C.calibrate_counts(head, C.class_histogram(y, s, edges), edges)
    assert np.all(np.diff(cc.probability(grid)) > 0)


def test_an_anti_informative_validation_set_keeps_the_map_increasing_at_the_slope_floor():
    y, s = _scores()
    cal = C.calibrate_points("memory", y, -s)  # higher score = more often negative
    assert cal.slope_at_floor and cal.slope == pytest.approx(C.MIN_SLOPE)
    p = cal.probability(np.linspace(-2, 2, 101))
    assert np.all(np.diff(p) > 0)
    assert p.mean() == pytest.approx((y.sum() + 1) / (len(y) + 2), abs=0.02)  # ~ the (smoothed) prevalence


def test_platt_fit_is_the_weighted_smoothed_target_optimum_and_finite_on_separable_data():
    rng = np.random.default_rng(3)
    x = np.sort(rng.normal(size=40))
    wp, wn = rng.poisson(np.linspace(0.5, 3, 40)).astype(float), rng.poisson(np.linspace(3, 0.5, 40)).astype(float)
    a, b, floor = C.fit_platt(x, wp, wn)
    assert not floor and a > 0
    n_pos, n_neg = wp.sum(), wn.sum()
    t = (wp * (n_pos + 1) / (n_pos + 2) + wn / (n_neg + 2))
    p = 1 / (1 + np.exp(-(a * x + b)))
    w = wp + wn
    assert abs(float((w * p - t).sum())) < 1e-6 * w.sum()  # first-order conditions
    assert abs(float(((w * p - t) * x).sum())) < 1e-6 * w.sum()
    # perfectly separated classes: plain logistic regression diverges, Platt's targets keep it finite
    xs = np.r_[np.linspace(-2, -0.5, 10), np.linspace(0.5, 2, 10)]
    a, b, _ = C.fit_platt(xs, (xs > 0).astype(float), (xs < 0).astype(float))
    assert math.isfinite(a) and math.isfinite(b) and 0 < a < 50


def test_threshold_rules():
    for seed in range(5):
        y, s = _scores(60, seed)
        s = np.round(s, 1)  # ties
        assert C.choose_threshold_weighted(s, y == 1, y == 0, "youden", default=0.0) == pytest.approx(
            choose_threshold(y, s, default=0.0))
    y, s = _scores(200, 7)
    t = C.choose_threshold_weighted(s, y == 1, y == 0, "sensitivity", 0.9, default=0.0)
    sens = lambda thr: ((s >= thr) & (y == 1)).sum() / (y == 1).sum()  # noqa: E731
    assert sens(t) >= 0.9
    above = np.unique(s)[np.unique(s) > t]
    assert above.size == 0 or sens(above[0] + 1e-12) < 0.9  # the next higher threshold misses the target
    assert C.choose_threshold_weighted([0.1, 0.2], [1, 1], [0, 0], default=0.5) == 0.5  # one class: default
    with pytest.raises(ValueError, match="rule"):
        C.choose_threshold_weighted(s, y == 1, y == 0, "f1")


def test_histogram_and_minimum_counts():
    y, s = _scores(150, 1)
    edges = C.bin_edges("memory", 50, 16, 5.0)
    h = C.class_histogram(y, s, edges)
    assert h.shape == (2, 50) and h.sum() == 150 and h[1].sum() == y.sum()
    assert np.array_equal(C.class_histogram([1, 0], [99.0, -99.0], edges)[:, [0, -1]], [[1, 0], [0, 1]])
    assert np.array_equal(C.coarsen_histogram(h, 1).counts, h)
    for k in (2, 3, 5, 8):
        rel = C.coarsen_histogram(h, k)
        c = rel.counts
        assert c.shape == h.shape and c.sum() == pytest.approx(h.sum()) and rel.withheld == [0, 0]
        # reconstruct the runs: maximal groups of equal adjacent values in both classes that sum to a whole count
        starts = [0] + [i for i in range(1, 50) if not np.allclose(c[:, i], c[:, i - 1])]
        ends = starts[1:] + [50]
        for a, b in zip(starts, ends):
            run = c[:, a:b].sum(axis=1)
            assert np.all((np.isclose(run, 0)) | (run >= k - 1e-9)), (k, a, b, run)
        assert rel.runs <= 50
    # a class with fewer slides than the minimum is withheld entirely
    few = np.zeros((2, 10))
    few[0, 2], few[1, 5], few[0, 7] = 3, 1, 2
    rel = C.coarsen_histogram(few, 2)
    assert rel.withheld == [0, 1] and rel.counts[1].sum() == 0 and rel.counts[0].sum() == 5
    assert rel.as_dict()["sent_slides"] == [5, 0]


def test_federated_fit_from_pooled_counts_matches_the_fit_on_the_points():
    y, s = _scores(400, 2)
    edges = C.bin_edges("memory", 50, 16, 5.0)
    sites = np.array_split(np.arange(400), 3)
    cp = C.calibrate_points("memory", y, s)
    grid = np.linspace(-1.5, 1.5, 31)
    # min count 1 (the default): only the binning differs (bin width 0.08 in delta); min count 2: runs of merged
    # bins lose resolution, which flattens the fit (measured 0.06 here, 133 slides per site)
    for k, tol in ((1, 0.01), (2, 0.1)):
        pooled = C.pool_histograms(C.coarsen_histogram(C.class_histogram(y[i], s[i], edges), k).counts
                                   for i in sites)
        assert pooled.sum() == pytest.approx(400)
        cc = C.calibrate_counts("memory", pooled, edges)
        assert np.abs(cc.probability(grid) - cp.probability(grid)).max() < tol
        assert abs(cc.threshold - cp.threshold) <= 3 * (edges[1] - edges[0])
        assert cc.positives == pytest.approx(y.sum()) and "histogram" in cc.source
    with pytest.raises(ValueError, match="bins"):
        C.calibrate_counts("memory", pooled[:, :10], edges)
    assert C.calibrate_counts("memory", np.vstack([pooled[0], 0 * pooled[1]]), edges) is None  # one class


def test_memory_score_bound_holds_at_the_extremes():
    k, t = 4, 5.0
    lo, hi = C.score_range("memory", k, t)
    e = torch.nn.functional.normalize(torch.randn(64), dim=0)
    pos = e.expand(k, 64)  # every C+ slot on the embedding, every C- slot opposite: the largest delta
    mem = torch.stack([-pos, pos])  # (2, K, S)
    d = float(memory_delta(e, mem, t))
    assert (lo, hi) == (-2.0, 2.0) and d == pytest.approx(hi, abs=1e-5)
    assert float(memory_delta(e, mem.flip(0), t)) == pytest.approx(lo, abs=1e-5)
    rand = torch.nn.functional.normalize(torch.randn(2, k, 64), dim=-1)
    embs = torch.nn.functional.normalize(torch.randn(500, 64), dim=-1)
    assert float(memory_delta(embs, rand, t).abs().max()) < 2.0


def test_ece_and_serialisation():
    assert C.expected_calibration_error([0, 1, 1, 0], [0.0, 1.0, 1.0, 0.0]) == 0.0
    assert C.expected_calibration_error([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert C.expected_calibration_error([0, 0, 0, 0], [0.95, 0.95, 0.05, 0.05]) == pytest.approx(0.5)
    assert math.isnan(C.expected_calibration_error([], []))
    y, s = _scores(head="classifier")
    cal = C.calibrate_points("classifier", y, s, rule="sensitivity", target_sensitivity=0.8)
    again = C.Calibration.from_dict(cal.to_dict())
    assert again == cal and again.target_sensitivity == 0.8 and again.feature == "logit(P)"
    with pytest.raises(ValueError, match="unknown"):
        C.Calibration.from_dict({**cal.to_dict(), "temperature": 2.0})
    assert np.array_equal(C.raw_probability("memory", [0.0]), [0.5])
