"""Binary classification metrics in pure numpy: AUC first, then AUPRC, balanced accuracy, macro-F1, sens/spec.

A set holding one class (or none) has no ROC curve: its AUC and AUPRC are NaN and ``reason`` says why. They are
never reported as 0.5. Scores need not be probabilities: the same functions serve the classifier head (P(y=1))
and the memory head (the score delta, any real number); only the threshold's scale differs.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

METRIC_KEYS = ("auc", "auprc", "balanced_accuracy", "macro_f1", "sensitivity", "specificity")


def labels_and_scores(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 labels in {0, 1} and (N,) float64 finite scores, checked (ValueError naming the problem)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)  # (N,)
    s = np.asarray(probs, dtype=np.float64).reshape(-1)  # (N,)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()) - {0, 1})}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are NaN or infinite")
    return y, s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` (N,), tied values sharing their mean rank."""
    order = np.argsort(s, kind="mergesort")  # (N,)
    sorted_s = s[order]  # (N,)
    # start index of each run of equal values, and the run each sorted element belongs to
    new_run = np.r_[True, sorted_s[1:] != sorted_s[:-1]]  # (N,)
    run_id = np.cumsum(new_run) - 1  # (N,)
    starts = np.flatnonzero(new_run)  # (R,)
    ends = np.r_[starts[1:], s.size]  # (R,) exclusive
    mean_rank = (starts + ends + 1) / 2.0  # (R,) mean of 1-based ranks start+1 .. end
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def roc_auc(labels, probs) -> float:
    """Tie-aware ROC AUC (Mann-Whitney U from average ranks); NaN unless both classes are present."""
    y, s = labels_and_scores(labels, probs)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(labels, probs) -> float:
    """Average precision (area under the step precision-recall curve, tied scores grouped as one threshold).

    Equals ``sklearn.metrics.average_precision_score``; NaN when there is no positive.
    """
    y, s = labels_and_scores(labels, probs)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")  # (N,) descending score
    y_sorted = y[order]
    s_sorted = s[order]
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # (N,) last index of each distinct score
    tps = np.cumsum(y_sorted)[last_of_run]  # (R,) true positives at each threshold
    fps = np.cumsum(1 - y_sorted)[last_of_run]  # (R,)
    precision = tps / (tps + fps)  # (R,)
    recall = tps / n_pos  # (R,)
    d_recall = np.diff(np.r_[0.0, recall])  # (R,)
    return float(np.sum(d_recall * precision))


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """All metrics of one labelled set.

    Parameters
    ----------
    labels : (N,) array of 0/1.
    probs : (N,) array of scores, higher = more likely class 1 (probabilities or memory scores).
    threshold : float
        ``score >= threshold`` predicts class 1 (choose it on validation with :func:`choose_threshold`).

    Returns
    -------
    dict
        ``auc``, ``auprc``, ``balanced_accuracy``, ``macro_f1``, ``sensitivity``, ``specificity`` (float, NaN
        where undefined), ``n``, ``n_pos`` (int), ``threshold`` (float) and ``reason`` (str, empty when every
        metric is defined; otherwise why some are NaN).
    """
    y, s = labels_and_scores(labels, probs)
    n = int(y.size)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    out: dict = {k: math.nan for k in METRIC_KEYS}
    out.update(n=n, n_pos=n_pos, threshold=float(threshold), reason="")
    if n == 0:
        out["reason"] = "empty set: no slides to score"
        return out
    pred = (s >= threshold).astype(np.int64)  # (N,)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    if n_pos:
        out["sensitivity"] = tp / n_pos
    if n_neg:
        out["specificity"] = tn / n_neg
    if n_pos == 0 or n_neg == 0:
        present = "negative" if n_pos == 0 else "positive"
        out["reason"] = (f"one class only: all {n} slides are {present}; AUC, AUPRC, balanced accuracy and "
                         f"macro-F1 are undefined")
        return out
    out["auc"] = roc_auc(y, s)
    out["auprc"] = average_precision(y, s)
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2.0
    f1_pos = 2 * tp / (2 * tp + fp + fn)  # denominators > 0: both classes are present
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    out["macro_f1"] = (f1_pos + f1_neg) / 2.0
    return out


def choose_threshold(labels, probs, default: float = 0.5) -> float:
    """Decision threshold maximising Youden's J = sensitivity + specificity - 1 on a validation set.

    Candidates are the midpoints between consecutive distinct scores (plus one below the lowest and one above
    the highest, plus ``default`` itself), with the rule ``score >= threshold`` -> class 1. Among equally good
    candidates the one closest to ``default`` wins, so ``default`` is kept whenever it is optimal (e.g. on an
    uninformative set with all scores equal). With fewer than two
    classes J is undefined and ``default`` is returned (logged).

    Parameters
    ----------
    labels : (N,) array of 0/1.
    probs : (N,) scores (probabilities or memory scores).
    default : float
        Fallback threshold, and the tie-break target (0.5 for probabilities, 0.0 for memory scores).
    """
    y, s = labels_and_scores(labels, probs)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        log.warning("choose_threshold: validation set has %d positive and %d negative slides; Youden's J is "
                    "undefined, keeping threshold %.3g", n_pos, n_neg, default)
        return float(default)
    u = np.unique(s)  # (R,) ascending
    cands = np.r_[default, u[0] - 1.0, (u[1:] + u[:-1]) / 2.0, u[-1] + 1.0]  # (R+2,)
    pred = s[None, :] >= cands[:, None]  # (R+2, N)
    sens = (pred & (y == 1)[None, :]).sum(1) / n_pos  # (R+2,)
    spec = (~pred & (y == 0)[None, :]).sum(1) / n_neg  # (R+2,)
    j = sens + spec - 1.0
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0.0, atol=1e-12))
    pick = best[np.argmin(np.abs(cands[best] - default))]
    return float(cands[pick])
