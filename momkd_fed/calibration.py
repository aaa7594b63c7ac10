"""Calibrated probabilities and decision thresholds of a model's heads, fitted on validation data (pure numpy).

A head's *raw score* is what it outputs: P(y=1) = softmax(logits)[1] for the classifier, the memory score
delta(F_wsi) for the memory head. Neither is a probability a clinician can read: the classifier's softmax is
over-confident after training on small cohorts, and delta has no probability scale at all. A
:class:`Calibration` maps the raw score to a calibrated probability and carries the decision threshold chosen on
validation data.

The map is **Platt scaling**, ``p = sigmoid(a * x + b)`` with ``x = delta`` (memory head) or ``x = logit(P)``
(classifier; Platt on the logit is temperature scaling with a bias), fitted by weighted maximum likelihood with
Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``. Why Platt and not isotonic regression:

- it is strictly increasing (the slope is kept >= :data:`MIN_SLOPE` > 0), so the calibrated probability ranks
  slides exactly as the raw score does: AUC, ROC curve and every threshold rule are unchanged; isotonic regression
  is a step function that ties slides with different scores and changes the AUC;
- two parameters are estimated reliably from the 100-150 validation slides a federation pools (tens at a single
  site); isotonic regression has as many degrees of freedom as distinct scores and over-fits such sets;
- the smoothed targets keep the fit finite when validation separates the classes perfectly (common on small
  sets), where plain logistic regression diverges.

The threshold rule (``calibration.threshold``) is Youden's J (maximise sensitivity + specificity - 1) or, with
``sensitivity``, the highest threshold whose validation sensitivity is at least ``calibration.target_sensitivity``
(the most specific rule that keeps the sensitivity target). The threshold lives on the raw scale;
``raw >= threshold`` is the same decision as ``probability >= probability_threshold``.

Two sources of validation data, one fit:

- **points** (:func:`calibrate_points`): per-slide raw scores where the slides are local (a centralised ``train``
  run, a site's personal model); every slide has weight 1.
- **counts** (:func:`calibrate_counts`): a federation cannot move per-slide scores. Each site sends the
  class-conditional histogram of its validation raw scores on fixed bin edges (:func:`bin_edges`; both scores are
  bounded, so the edges follow from the config alone: [0, 1] for P, [-2, 2] for the memory score delta), with small bins merged by :func:`coarsen_histogram` under the
  same minimum count as the memory slots (``federation.min_slot_count``). The server sums the histograms
  (:func:`pool_histograms`) and fits on the bin centres weighted by the pooled counts: the pooled validation ROC
  is exact at the bin edges, and Platt on binned scores differs from Platt on the points by at most the bin width
  in x (50 bins: 0.08 in delta).

:func:`expected_calibration_error` measures the result (10 equal-width probability bins).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .metrics import labels_and_scores

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

HEADS = ("classifier", "memory")
DEFAULT_THRESHOLD = {"classifier": 0.5, "memory": 0.0}  # fallback and tie-break target of the threshold rules
FEATURE = {"classifier": "logit(P)", "memory": "delta"}  # what the Platt map is linear in
MIN_SLOPE = 1e-3  # the Platt slope is kept at least this: the map stays strictly increasing (ranking kept)
ECE_BINS = 10  # equal-width probability bins of expected_calibration_error


# --------------------------------------------------------------------------------------------------------------
# raw scores


def score_range(head: str, memory_slots: int, align_t: float) -> tuple[float, float]:
    """The interval every raw score of ``head`` lies in.

    classifier: [0, 1]. memory: delta = phi(F, C+) - phi(F, C-) with phi(F, C) = (1/t) logsumexp_j(t <F, c_j>)
    over K unit slots and a unit F: every cosine lies in [-1, 1], so phi lies in [-1 + ln(K)/t, 1 + ln(K)/t] and
    |delta| <= 2 whatever K and t (reached when every C+ slot equals F and every C- slot equals -F).
    ``memory_slots`` and ``align_t`` are kept in the signature so that a score of another form states its bound
    here.
    """
    _check_head(head)
    if head == "classifier":
        return 0.0, 1.0
    del memory_slots, align_t
    return -2.0, 2.0


def bin_edges(head: str, n_bins: int, memory_slots: int, align_t: float) -> np.ndarray:
    """(n_bins + 1,) equal-width edges over :func:`score_range`; the same at every site and the server."""
    lo, hi = score_range(head, memory_slots, align_t)
    return np.linspace(lo, hi, int(n_bins) + 1)


def platt_feature(head: str, raw) -> np.ndarray:
    """(N,) float64 x of the Platt map: delta itself, or logit(P) for the classifier (+-inf at P = 0 or 1)."""
    _check_head(head)
    r = np.asarray(raw, dtype=np.float64).reshape(-1)
    if head == "memory":
        return r
    r = np.clip(r, 0.0, 1.0)  # a float32 softmax can round a hair past 1
    with np.errstate(divide="ignore"):
        return np.log(r) - np.log1p(-r)  # (N,) strictly increasing in P


def raw_probability(head: str, raw) -> np.ndarray:
    """The uncalibrated head output read as a probability (the baseline of the calibration benchmark):
    the classifier's softmax P itself, sigmoid(delta) for the memory score."""
    _check_head(head)
    r = np.asarray(raw, dtype=np.float64).reshape(-1)
    return r if head == "classifier" else _sigmoid(r)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")


# --------------------------------------------------------------------------------------------------------------
# histograms (what a site sends)


def class_histogram(labels, scores, edges: np.ndarray) -> np.ndarray:
    """(2, B) counts of the slides of class 0 / class 1 per bin of ``edges`` (B + 1,).

    Bins are ``[e_i, e_{i+1})``, the last one closed; a score outside the range (it cannot be, see
    :func:`score_range`; rounding aside) is counted in the end bin.
    """
    y, s = labels_and_scores(labels, scores)
    edges = np.asarray(edges, dtype=np.float64)
    b = edges.size - 1
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, b - 1)  # (N,)
    out = np.zeros((2, b), dtype=np.float64)
    np.add.at(out, (y, idx), 1.0)
    return out


@dataclass
class HistogramRelease:
    """What :func:`coarsen_histogram` lets leave a site.

    Attributes
    ----------
    counts : (2, B) float64, the class-conditional counts, small runs merged and spread evenly over their bins
    runs : int, number of runs (merged groups of adjacent bins) the counts are constant over
    withheld : [int, int], validation slides of class 0 / 1 not sent (a class with fewer than the minimum count
        in the whole split)
    """

    counts: np.ndarray
    runs: int
    withheld: list[int]

    def as_dict(self) -> dict:
        """For the audit log: never the counts themselves."""
        return {"runs": int(self.runs), "withheld_slides": [int(w) for w in self.withheld],
                "sent_slides": [int(round(float(c))) for c in self.counts.sum(axis=1)]}


def coarsen_histogram(counts: np.ndarray, min_count: int) -> HistogramRelease:
    """Merge adjacent bins so that every run holds, per class, either no slide or at least ``min_count``.

    The same rule as a memory slot (``federation.min_slot_count`` slides behind each released aggregate): no run
    of the released histogram says anything about fewer than ``min_count`` slides of a class. Runs are grown left
    to right until the rule holds; an incomplete last run is merged back into the runs before it. A class with
    fewer than ``min_count`` slides in total is withheld (its counts are zero). A run's counts are spread evenly
    over its bins, so the release keeps the fixed (2, B) shape and only loses resolution: the pooled fit flattens
    as runs mix the classes (``min_count`` 2 with ~130 validation slides per site: the slope ~15 % flatter,
    ``tests/test_calibration.py``; the default ``federation.min_slot_count`` 1 merges nothing).

    Parameters
    ----------
    counts : (2, B) whole-number counts (:func:`class_histogram`).
    min_count : int, 1 or less = no merging.
    """
    c = np.asarray(counts, dtype=np.float64).copy()  # (2, B)
    k = int(min_count)
    withheld = [0, 0]
    if k <= 1:
        return HistogramRelease(c, int(c.shape[1]), withheld)
    for cls in (0, 1):
        total = float(c[cls].sum())
        if 0 < total < k:
            withheld[cls] = int(round(total))
            c[cls] = 0.0

    def ok(acc: np.ndarray) -> bool:
        return bool(((acc == 0) | (acc >= k)).all())

    runs: list[list[int]] = []  # [start, end) bin ranges
    start, acc = 0, np.zeros(2)
    for i in range(c.shape[1]):
        acc = acc + c[:, i]
        if ok(acc):
            runs.append([start, i + 1])
            start, acc = i + 1, np.zeros(2)
    if start < c.shape[1]:  # an incomplete last run: merge it backwards until the rule holds
        tail = [start, c.shape[1]]
        while runs and not ok(c[:, tail[0]:tail[1]].sum(axis=1)):
            tail[0] = runs.pop()[0]
        runs.append(tail)
    out = np.zeros_like(c)
    for s, e in runs:
        out[:, s:e] = c[:, s:e].sum(axis=1, keepdims=True) / (e - s)
    return HistogramRelease(out, len(runs), withheld)


def pool_histograms(histograms: Iterable[np.ndarray]) -> np.ndarray | None:
    """Sum of the sites' (2, B) histograms; None when there is none."""
    total = None
    for h in histograms:
        h = np.asarray(h, dtype=np.float64)
        total = h.copy() if total is None else total + h
    return total


# --------------------------------------------------------------------------------------------------------------
# thresholds and the Platt fit on weighted points


def _candidates(s: np.ndarray, default: float) -> np.ndarray:
    u = np.unique(s)  # (R,) ascending
    return np.r_[default, u[0] - 1.0, (u[1:] + u[:-1]) / 2.0, u[-1] + 1.0]  # (R + 2,)


def _weighted_points(values, w_pos, w_neg) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(M,) values and class weights as float64, the points without weight dropped; and the two class totals."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    wp = np.asarray(w_pos, dtype=np.float64).reshape(-1)
    wn = np.asarray(w_neg, dtype=np.float64).reshape(-1)
    keep = (wp + wn) > 0
    v, wp, wn = v[keep], wp[keep], wn[keep]
    return v, wp, wn, float(wp.sum()), float(wn.sum())

def choose_threshold_weighted(scores, w_pos, w_neg, rule: str = "youden", target_sensitivity: float = 0.9,
                              default: float = 0.5) -> float:
    """Decision threshold (``score >= t`` -> class 1) on weighted points.

    Candidates are the midpoints between consecutive distinct scores, one below the lowest, one above the
    highest, and ``default``; ties between equally good candidates go to the one closest to ``default``. With
    unit weights and ``rule="youden"`` this is :func:`momkd_fed.metrics.choose_threshold`.

    Parameters
    ----------
    scores : (M,) raw scores (slides, or bin centres).
    w_pos, w_neg : (M,) weight of class 1 / class 0 at each score (counts).
    rule : "youden" (max sensitivity + specificity - 1) or "sensitivity" (the highest threshold whose
        sensitivity is at least ``target_sensitivity``).
    default : float, returned when either class has no weight.
    """
    s, wp, wn, n_pos, n_neg = _weighted_points(scores, w_pos, w_neg)
    if n_pos <= 0 or n_neg <= 0:
        return float(default)
    cands = _candidates(s, default)  # (R + 2,)
    pred = s[None, :] >= cands[:, None]  # (R + 2, M)
    sens = (pred * wp[None, :]).sum(1) / n_pos  # (R + 2,)
    spec = (~pred * wn[None, :]).sum(1) / n_neg  # (R + 2,)
    if rule == "youden":
        score = sens + spec - 1.0
        eligible = np.ones_like(score, dtype=bool)
    elif rule == "sensitivity":
        score = spec
        eligible = sens >= float(target_sensitivity) - 1e-12
    else:
        raise ValueError(f"threshold rule must be 'youden' or 'sensitivity', got {rule!r}")
    score = np.where(eligible, score, -np.inf)
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0.0, atol=1e-12))
    if rule == "sensitivity":  # equally specific: the highest threshold keeping the target
        return float(cands[best].max())
    return float(cands[best[np.argmin(np.abs(cands[best] - default))]])


def fit_platt(x, w_pos, w_neg, min_slope: float = MIN_SLOPE) -> tuple[float, float, bool]:
    """Weighted Platt fit ``p = sigmoid(a x + b)`` with smoothed targets; ``a >= min_slope``.

    Parameters
    ----------
    x : (M,) features (:func:`platt_feature`); infinite values (P = 0 or 1) are clipped to the finite range of
        the others for the fit only.
    w_pos, w_neg : (M,) weight of class 1 / class 0 at each x.

    Returns
    -------
    a, b : float
    at_floor : bool, True when the unconstrained slope was below ``min_slope`` (validation does not show higher
        scores for positives); ``a`` is then ``min_slope`` and ``b`` refitted.
    """
    x, wp, wn, n_pos, n_neg = _weighted_points(x, w_pos, w_neg)
    if n_pos <= 0 or n_neg <= 0:
        raise ValueError(f"Platt fit needs both classes (weights: {n_pos:g} positive, {n_neg:g} negative)")
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    x = np.clip(x, lo - 1.0, hi + 1.0)
    t_pos, t_neg = (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)
    w = wp + wn  # (M,)
    t = (wp * t_pos + wn * t_neg) / w  # (M,) smoothed target per point
    centre = float((w * x).sum() / w.sum())
    scale = float(np.sqrt((w * (x - centre) ** 2).sum() / w.sum())) or 1.0
    z = (x - centre) / scale  # standardised for a well-conditioned Newton step
    a, b = _newton(z, t, w, fix_a=None)
    at_floor = a / scale < min_slope
    if at_floor:
        a, b = _newton(z, t, w, fix_a=min_slope * scale)
    # back to the original x: a z + b = (a / scale) x + (b - a centre / scale)
    return float(a / scale), float(b - a * centre / scale), bool(at_floor)


def _nll(a: float, b: float, z: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
    f = a * z + b
    return float((w * (np.logaddexp(0.0, f) - t * f)).sum())  # -sum w [t log p + (1-t) log(1-p)]


def _newton(z: np.ndarray, t: np.ndarray, w: np.ndarray, fix_a: float | None, ridge: float = 1e-9,
            iters: int = 100) -> tuple[float, float]:
    """Minimise the weighted cross-entropy over (a, b), or over b alone with ``a = fix_a`` (backtracking Newton)."""
    a = 0.0 if fix_a is None else float(fix_a)
    prior = float((w * t).sum() / w.sum())
    b = math.log(prior / (1.0 - prior))
    for _ in range(iters):
        p = _sigmoid(a * z + b)  # (M,)
        r = w * (p - t)  # (M,)
        h = w * p * (1.0 - p)  # (M,)
        if fix_a is None:
            g = np.array([(r * z).sum() + ridge * a, r.sum()])
            hess = np.array([[(h * z * z).sum() + ridge, (h * z).sum()], [(h * z).sum(), h.sum() + ridge]])
            step = np.linalg.solve(hess, g)
        else:
            g = np.array([0.0, r.sum()])
            step = np.array([0.0, g[1] / (h.sum() + ridge)])
        if float(np.abs(g).max()) < 1e-10 * float(w.sum()):
            break
        f0, lr = _nll(a, b, z, t, w), 1.0
        while lr > 1e-10:
            a1, b1 = a - lr * step[0], b - lr * step[1]
            if _nll(a1, b1, z, t, w) <= f0 + 1e-12:
                break
            lr /= 2.0
        a, b = a1, b1
    return a, b


# --------------------------------------------------------------------------------------------------------------
# the calibration of one head


@dataclass
class Calibration:
    """A head's calibrated probability ``sigmoid(slope * x + intercept)`` and its decision threshold.

    Attributes
    ----------
    head : "classifier" or "memory"
    slope, intercept : float, the Platt map on ``x`` = :data:`FEATURE` [head]
    threshold : float, on the raw score: ``raw >= threshold`` predicts class 1
    probability_threshold : float, the same threshold on the calibrated probability
    rule : "youden" or "sensitivity"
    target_sensitivity : float or None, the sensitivity target of the ``sensitivity`` rule
    positives, negatives : float, validation slides behind the fit (pooled counts in a federation)
    source : str, where the validation data came from (said in every file that stores it)
    slope_at_floor : bool, validation did not show higher raw scores for positives (see :func:`fit_platt`)
    method : "platt"
    feature : str, :data:`FEATURE` [head]
    """

    head: str
    slope: float
    intercept: float
    threshold: float
    probability_threshold: float
    rule: str
    target_sensitivity: float | None
    positives: float
    negatives: float
    source: str
    slope_at_floor: bool = False
    method: str = "platt"
    feature: str = ""

    def probability(self, raw) -> np.ndarray:
        """(N,) calibrated P(y=1) of raw scores (N,): strictly increasing in the raw score."""
        x = platt_feature(self.head, raw)
        with np.errstate(invalid="ignore"):
            z = self.slope * x + self.intercept
        return _sigmoid(z)

    def predict(self, raw) -> np.ndarray:
        """(N,) int64 decisions ``raw >= threshold``."""
        return (np.asarray(raw, dtype=np.float64).reshape(-1) >= self.threshold).astype(np.int64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Calibration":
        """Inverse of :meth:`to_dict`; raises ValueError naming a missing or unknown field."""
        names = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("head", "slope", "intercept", "threshold", "probability_threshold", "rule")
                   if f not in d]
        unknown = [k for k in d if k not in names]
        if missing or unknown:
            raise ValueError(f"calibration record: missing {missing}, unknown {unknown}")
        _check_head(str(d["head"]))
        return cls(**{k: d[k] for k in d})


def _fit(head: str, scores: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, rule: str, target: float,
         source: str) -> Calibration | None:
    n_pos, n_neg = float(np.sum(w_pos)), float(np.sum(w_neg))
    if n_pos <= 0 or n_neg <= 0:
        log.warning("calibration of the %s head: validation holds %g positive and %g negative slides; no "
                    "calibration (%s)", head, n_pos, n_neg, source)
        return None
    a, b, at_floor = fit_platt(platt_feature(head, scores), w_pos, w_neg)
    if at_floor:
        log.warning("calibration of the %s head: on validation the raw score is not higher for positive slides; "
                    "its calibrated probability is close to the validation prevalence (%s)", head, source)
    thr = choose_threshold_weighted(scores, w_pos, w_neg, rule, target, DEFAULT_THRESHOLD[head])
    cal = Calibration(head=head, slope=a, intercept=b, threshold=thr, probability_threshold=math.nan, rule=rule,
                      target_sensitivity=float(target) if rule == "sensitivity" else None, positives=n_pos,
                      negatives=n_neg, source=source, slope_at_floor=at_floor, feature=FEATURE[head])
    cal.probability_threshold = float(cal.probability(np.array([thr]))[0])
    return cal


def calibrate_points(head: str, labels, raw, rule: str = "youden", target_sensitivity: float = 0.9,
                     source: str = "validation split") -> Calibration | None:
    """Calibration from per-slide validation raw scores (local data); None when a class is missing (logged)."""
    _check_head(head)
    y, s = labels_and_scores(labels, raw)
    return _fit(head, s, (y == 1).astype(np.float64), (y == 0).astype(np.float64), rule, target_sensitivity,
                source)


def calibrate_counts(head: str, counts: np.ndarray, edges: np.ndarray, rule: str = "youden",
                     target_sensitivity: float = 0.9, source: str = "pooled validation histogram"
                     ) -> Calibration | None:
    """Calibration from pooled class-conditional counts (2, B) on ``edges`` (B + 1,): bin centres as points,
    the counts as weights. None when a class has no count (logged)."""
    _check_head(head)
    c = np.asarray(counts, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if c.shape != (2, e.size - 1):
        raise ValueError(f"counts of shape {c.shape} do not fit {e.size - 1} bins")
    centres = (e[1:] + e[:-1]) / 2.0  # (B,)
    return _fit(head, centres, c[1], c[0], rule, target_sensitivity, source)


# --------------------------------------------------------------------------------------------------------------
# with the run's settings (config: ``calibration.*``, ``federation.min_slot_count``, ``memory.slots``)


def edges_for(cfg: "Config", head: str) -> np.ndarray:
    """The fixed bin edges of ``head`` for this config (``calibration.bins``)."""
    return bin_edges(head, cfg.calibration.bins, cfg.memory.slots, cfg.loss.align_t)


def calibrate_heads(cfg: "Config", labels, raw_by_head: Mapping[str, np.ndarray | None],
                    source: str) -> dict[str, Calibration]:
    """``{head: Calibration}`` from local validation scores (a head without scores, or whose validation holds one
    class, is left out; logged)."""
    out = {}
    for head, raw in raw_by_head.items():
        if raw is None:
            continue
        cal = calibrate_points(head, labels, raw, cfg.calibration.threshold, cfg.calibration.target_sensitivity,
                               source)
        if cal is not None:
            out[head] = cal
    return out


def site_histograms(cfg: "Config", labels, raw_by_head: Mapping[str, np.ndarray | None]
                    ) -> dict[str, HistogramRelease]:
    """What a site releases for the federated calibration: per head, the class-conditional histogram of its
    validation raw scores on :func:`edges_for`, small runs merged under ``federation.min_slot_count``."""
    return {head: coarsen_histogram(class_histogram(labels, raw, edges_for(cfg, head)),
                                    cfg.federation.min_slot_count)
            for head, raw in raw_by_head.items() if raw is not None}


def calibrate_pooled(cfg: "Config", site_counts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Calibration]:
    """The server's fit: per head, pool the sites' histograms (site -> head -> (2, B)) and calibrate on them
    (a head no site sent, or whose pooled counts hold one class, is left out; logged)."""
    out = {}
    heads = sorted({h for counts in site_counts.values() for h in counts})
    for head in heads:
        sites = sorted(s for s, counts in site_counts.items() if head in counts)
        pooled = pool_histograms(site_counts[s][head] for s in sites)
        cal = calibrate_counts(head, pooled, edges_for(cfg, head), cfg.calibration.threshold,
                               cfg.calibration.target_sensitivity,
                               source=f"pooled validation histograms of {len(sites)} sites ({', '.join(sites)}; "
                                      f"{cfg.calibration.bins} bins, min count {cfg.federation.min_slot_count})")
        if cal is not None:
            out[head] = cal
    return out


# --------------------------------------------------------------------------------------------------------------
# measuring it


def expected_calibration_error(labels, probs, n_bins: int = ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width probability bins on [0, 1] (the last one closed):
    sum over bins of (slides in bin / N) * |fraction positive - mean probability|; NaN for an empty set."""
    y, p = labels_and_scores(labels, probs)
    if y.size == 0:
        return math.nan
    idx = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)  # (N,)
    n = np.bincount(idx, minlength=n_bins).astype(np.float64)  # (n_bins,)
    pos = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    used = n > 0
    return float((np.abs(pos[used] - conf[used])).sum() / y.size)
