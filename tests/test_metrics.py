"""Metrics against scikit-learn, and the edge cases the reference code got wrong (one class -> NaN, not 0.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from momkd_fed.metrics import average_precision, binary_metrics, choose_threshold, roc_auc

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    # coarse rounding makes many ties (within and across classes)
    s = np.round(rng.random(n) * (3 if seed % 2 else 50)) / 50
    m = binary_metrics(y, s, threshold=0.3)
    pred = (s >= 0.3).astype(int)
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert m["auprc"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, pred), abs=1e-12)
    assert m["specificity"] == pytest.approx(sk.recall_score(1 - y, 1 - pred), abs=1e-12)
    assert m["n"] == n and m["n_pos"] == int(y.sum()) and m["reason"] == ""


def test_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half
    assert average_precision([0, 1, 1], [0.2, 0.2, 0.9]) == pytest.approx(
        sk.average_precision_score([0, 1, 1], [0.2, 0.2, 0.9]))


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0, 0]])
def test_one_class_gives_nan_with_reason(labels):
    m = binary_metrics(labels, np.linspace(0.1, 0.9, len(labels)))
    assert math.isnan(m["auc"]) and math.isnan(m["auprc"]) and math.isnan(m["balanced_accuracy"])
    assert "one class" in m["reason"]
    if labels[0] == 1:
        assert m["sensitivity"] == pytest.approx(2 / 3) and math.isnan(m["specificity"])
    else:
        assert m["specificity"] == pytest.approx(0.5) and math.isnan(m["sensitivity"])


def test_empty_set():
    m = binary_metrics([], [])
    assert m["n"] == 0 and "empty" in m["reason"]
    assert all(math.isnan(m[k]) for k in ("auc", "auprc", "sensitivity", "specificity", "macro_f1"))


def test_all_equal_scores():
    y = [0, 1, 0, 1, 1]
    m = binary_metrics(y, [0.7] * 5, threshold=0.5)
    assert m["auc"] == 0.5
    assert m["auprc"] == pytest.approx(0.6)  # = prevalence
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0
    assert choose_threshold(y, [0.7] * 5) == 0.5  # J = 0 everywhere: keep the default


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="length"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics([0, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="finite"):
        binary_metrics([0, 1], [0.5, float("nan")])


def test_choose_threshold_youden():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.55, 0.8, 0.9])
    t = choose_threshold(y, s)
    m = binary_metrics(y, s, threshold=t)
    # the best J here is 2/3 (e.g. t in (0.6, 0.8]: sens 2/3, spec 1; or t in (0.2, 0.55]: sens 1, spec 2/3)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(2 / 3)
    # perfectly separable scores on any scale: threshold lies between the classes
    assert 0.3 < choose_threshold([0, 0, 1, 1], [-2.0, 0.3, 0.9, 4.0], default=0.0) < 0.9
    assert choose_threshold([1, 1], [0.2, 0.3], default=0.0) == 0.0
