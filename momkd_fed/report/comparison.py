"""Test AUCs of the federated model and of the baselines, gathered from ``summary.json`` into one table.

``summary.json`` holds ``test_auc`` ({"pooled": x, "<site>": y, ...}) and ``baselines``, e.g.
``{"local": {"momkd": {...}, "abmil": {...}}, "centralized": {"momkd": {...}}}``. A leaf AUC may be a number
(one seed), a list of numbers (one per seed) or ``{"mean": m, "std": s, "n": k}``; a level may wrap its AUCs in
``test_auc``; a list of per-seed mappings is merged. Shapes not recognised are skipped with a log line, never
guessed at.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stat:
    """One table cell: mean test AUC over ``n`` seeds and its sample standard deviation (0 for one seed)."""

    mean: float
    std: float
    n: int

    def text(self) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if self.n > 1:
            return f"{self.mean:.3f} ± {self.std:.3f} (n={self.n})"
        return f"{self.mean:.3f}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def to_stat(v: Any) -> Stat | None:
    """One AUC cell from a number, null (NaN), a list of per-seed numbers or {"mean", "std", "n"}; else None."""
    if v is None:  # JSON null: NaN, e.g. a one-class test split
        return Stat(math.nan, math.nan, 0)
    if _is_num(v):
        return Stat(float(v), 0.0, 1)
    if isinstance(v, list) and v and all(_is_num(x) or x is None for x in v):
        a = np.asarray([math.nan if x is None else x for x in v], dtype=np.float64)  # (n_seeds,)
        ok = a[np.isfinite(a)]
        if ok.size == 0:
            return Stat(math.nan, math.nan, 0)
        return Stat(float(ok.mean()), float(ok.std(ddof=1)) if ok.size > 1 else 0.0, int(ok.size))
    if isinstance(v, dict) and _is_num(v.get("mean")):
        std = v.get("std", 0.0)
        n = v.get("n", 1)
        return Stat(float(v["mean"]), float(std) if _is_num(std) else 0.0, int(n) if _is_num(n) else 1)
    return None


def auc_map(obj: Any) -> dict[str, Stat] | None:
    """``{"pooled": .., "<site>": ..}`` in any of the accepted shapes -> where -> Stat; None if not one."""
    if isinstance(obj, dict) and "test_auc" in obj:
        return auc_map(obj["test_auc"])
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):  # one mapping per seed
        maps = [auc_map(x) for x in obj]
        if any(m is None for m in maps):
            return None
        keys = [k for m in maps for k in m]
        merged = {}
        for k in dict.fromkeys(keys):
            merged[k] = to_stat([m[k].mean for m in maps if k in m])  # one value per seed
        return merged
    if not isinstance(obj, dict) or not obj:
        return None
    out = {}
    for k, v in obj.items():
        s = to_stat(v)
        if s is None:
            return None
        out[str(k)] = s
    return out


def _head_label(key: str) -> str:
    """``global_test_auc_memory`` -> ``global model (last round), memory head`` (summary.json
    ``test_auc_by_head`` keys)."""
    model, _, metric = key.partition("_")
    model = {"personal": "personalised model", "global": "global model"}.get(model, model)
    head = "memory head" if metric.endswith("memory") else "classifier"
    return f"{model} (last round), {head}"


def auc_columns(summary: dict, every_head: bool = True) -> dict[str, dict[str, Stat]]:
    """Method label -> where ("pooled" or a site) -> Stat: the federated model files first, then each baseline.

    Parameters
    ----------
    summary : dict
        ``summary.json``.
    every_head : bool
        True: one federated column per model file (``models``: ``best_model.pt``, ``global_model.pt``, the sites'
        ``personal_model.pt``), each labelled with its head; for a summary written before those were recorded, one
        per model and head of ``test_auc_by_head``. False: only the model a new hospital would use
        (``best_model.pt``; older summaries: the headline ``test_auc`` as ``federated``), for the bar chart.
    """
    cols: dict[str, dict[str, Stat]] = {}
    by_head = summary.get("test_auc_by_head")
    models = summary.get("models")
    if isinstance(models, dict) and models:
        for file, m in models.items():
            auc = auc_map(m.get("test_auc")) if isinstance(m, dict) else None
            if auc and (every_head or file == "best_model.pt"):
                cols[str(m.get("label", file))] = auc
    elif every_head and isinstance(by_head, dict) and by_head:
        for key, value in by_head.items():
            m = auc_map(value)
            if m:
                cols[_head_label(str(key))] = m
    else:
        fed = auc_map(summary.get("test_auc"))
        if fed:
            cols["federated"] = fed
        for key, label in (("test_auc_memory", "federated (memory score)"),
                           ("test_auc_personal", "federated personalised")):
            m = auc_map(summary.get(key)) if every_head else None
            if m:
                cols[label] = m
    baselines = summary.get("baselines")
    if not isinstance(baselines, dict):
        return cols
    for kind, sub in baselines.items():
        direct = auc_map(sub)
        if direct is not None:
            cols[str(kind)] = direct
            continue
        if not isinstance(sub, dict):
            log.warning("summary.json baselines.%s: unrecognised shape %s, skipped", kind, type(sub).__name__)
            continue
        for model, leaf in sub.items():
            m = auc_map(leaf)
            if m is None:
                log.warning("summary.json baselines.%s.%s: no test AUCs recognised, skipped", kind, model)
                continue
            cols[f"{kind} {model}"] = m
    return cols


def ordered_wheres(cols: dict[str, dict[str, Stat]]) -> list[str]:
    """Row order of the table: ``pooled`` first, then sites as they first appear."""
    wheres = list(dict.fromkeys(w for m in cols.values() for w in m))
    return sorted(wheres, key=lambda w: (w != "pooled",))
