"""Read a run folder (simulate, server or train) into plain series the plots draw, tolerating absent keys.

What is read (design.md, "Outputs of a run"; writers: ``server/rounds.py``, ``momkd_fed/training.py``):

federated run (``rounds.jsonl`` and/or ``summary.json``)
    ``rounds.jsonl``   one object per round: ``round``; per site ``train.<site>`` (``loss_*`` terms, ``val_auc``,
                       ``val_auc_memory`` of the trained local model), ``evaluate.<site>.global`` / ``.personal``
                       (``test_auc`` = classifier head, ``test_auc_memory`` = memory score, ``val_auc``,
                       ``val_auc_memory``: validation, preferred over the train reply's), ``bytes_sent.<site>``,
                       ``bytes_received.<site>``; ``val_auc`` (``monitor``, ``pooled``: the best-round criterion);
                       ``evaluate_aggregate`` (``global_test_auc``... slide-weighted means over the sites),
                       ``train_aggregate``, ``seconds`` (a number or ``{"total": ..}``), ``dropouts`` (list of
                       ``{"site", "phase", "reason"}``), optionally the privacy budget ``epsilon`` or
                       ``privacy.epsilon``. A site-major layout, ``sites.<site>.{train, eval_global, eval_personal,
                       bytes_sent, bytes_received}``, is read as well.
    ``summary.json``   ``rounds_completed``, ``test_auc`` {"pooled": x, "<site>": y}, ``test_auc_by_head``,
                       ``models`` (per model file: ``label`` naming file, round and head, ``test_auc``),
                       ``best`` (``round``: marked on the AUC plot), ``baselines`` (see :mod:`.comparison`).
train run (``epochs.jsonl`` and/or ``metrics.json``)
    ``epochs.jsonl``   one object per epoch: ``epoch``, ``train_<term>`` (or ``loss_<term>``) losses, ``val_auc``,
                       ``val_memory_auc``.
    ``metrics.json``   ``test.classifier`` / ``test.memory`` metric dicts, ``test_per_site``, run facts.
either
    ``config.yaml``    the resolved config, shown verbatim.
    ``predictions/test_<site>.csv``  slide_id, label[, probability (or prob)][, memory_score]: per-slide test
                       scores of the heads the model trained (a federation: ``best_model.pt``; a train run:
                       ``model.pt``), written only where the slides are local (simulation, train runs); the ROC
                       curves.

JSON NaN is written as ``null``: a null value draws no point. A key that is absent leaves its series empty; the
plot that needs it is skipped and the page says why. Nothing is ever filled in.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MomkdError

log = logging.getLogger(__name__)

FEDERATED_FILES = ("rounds.jsonl", "summary.json")
TRAIN_FILES = ("epochs.jsonl", "metrics.json")
PREDICTIONS_DIR = "predictions"
CLASSIFIER = "classifier"
MEMORY = "memory score"
HEAD_KEYS = {  # head -> keys an evaluation record may give its AUC under
    CLASSIFIER: ("test_auc", "auc"),
    MEMORY: ("test_auc_memory", "auc_memory"),
}
VAL_KEYS = {CLASSIFIER: ("val_auc",), MEMORY: ("val_auc_memory", "val_memory_auc")}
MEAN_OF_SITES = "sites' mean"  # series of the slide-weighted mean over sites (not a pooled AUC)
Series = dict[str, tuple[list, list]]  # who (site, or the mean) -> (xs, ys)


@dataclass
class Predictions:
    """Per-slide test scores of one site (or the pooled set).

    Attributes
    ----------
    labels : (N,) int array of 0/1.
    prob : (N,) classifier P(y=1), or None when the file has none (a federated global model whose classifier was
        not trained).
    memory_score : (N,) memory score delta(F_wsi), or None when the file has no such values.
    """

    labels: np.ndarray
    prob: np.ndarray | None
    memory_score: np.ndarray | None


@dataclass
class RunData:
    """Everything the report draws, as plain series keyed by site (``x`` = round or epoch numbers)."""

    run_dir: Path
    kind: str  # "federated" or "train"
    config_text: str = ""
    auc: dict[tuple[str, str], Series] = field(default_factory=dict)  # (model, head) -> series
    losses: dict[str, Series] = field(default_factory=dict)  # loss term -> series
    bytes_sent: Series = field(default_factory=dict)
    bytes_received: Series = field(default_factory=dict)
    epsilon: tuple[list, list] = field(default_factory=lambda: ([], []))
    seconds: tuple[list, list] = field(default_factory=lambda: ([], []))
    dropouts: list[dict] = field(default_factory=list)  # {"round", "site", "phase", "reason"}
    summary: dict = field(default_factory=dict)  # summary.json (federated) or metrics.json (train)
    predictions: dict[str, Predictions] = field(default_factory=dict)  # site (or "pooled") -> scores


def _number(v: Any) -> float | None:
    """A float from a JSON value, or None when it is not a number (``null`` = NaN draws no point)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def as_dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _first(mapping: Any, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = _number(as_dict(mapping).get(k))
        if v is not None:
            return v
    return None


def _append(series: Series, who: str, x: float, y: float | None) -> None:
    if y is None:
        return
    xs, ys = series.setdefault(who, ([], []))
    xs.append(x)
    ys.append(y)


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSON-lines file. A final line without its newline (a run stopped mid-write) is skipped with a
    warning; any other malformed line raises MomkdError naming the file and line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no newline after it: a partial write
                log.warning("%s:%d: incomplete last line skipped (the run was stopped while writing it)", path, i)
                break
            raise MomkdError(f"{path}:{i}: not valid JSON ({exc.msg}) (fix: delete the broken line)") from exc
        if not isinstance(obj, dict):
            raise MomkdError(f"{path}:{i}: expected one JSON object per line, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MomkdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(obj, dict):
        raise MomkdError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _loss_terms(record: Any, prefix: str) -> dict[str, float | None]:
    """``<prefix><term>`` keys of a metrics mapping -> term -> value; counts and timings are not loss terms."""
    out = {}
    for k, v in as_dict(record).items():
        term = k[len(prefix):]
        if k.startswith(prefix) and not term.startswith("num") and "seconds" not in term:
            if v is None or _number(v) is not None:
                out[term] = _number(v)
    return out


def _site_records(row: dict) -> dict[str, dict]:
    """A round row as ``{site: {"train", "eval_global", "eval_personal", "bytes_sent", "bytes_received"}}``."""
    if isinstance(row.get("sites"), dict):  # site-major layout
        return {str(s): r for s, r in row["sites"].items() if isinstance(r, dict)}
    out: dict[str, dict] = {}
    for site, rec in as_dict(row.get("train")).items():
        out.setdefault(str(site), {})["train"] = rec
    for site, rec in as_dict(row.get("evaluate")).items():
        out.setdefault(str(site), {}).update(eval_global=as_dict(rec).get("global"),
                                             eval_personal=as_dict(rec).get("personal"))
    for key in ("bytes_sent", "bytes_received"):
        for site, v in as_dict(row.get(key)).items():
            out.setdefault(str(site), {})[key] = v
    return out


def _has_any(mapping: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(mapping, dict) and any(k in mapping for k in keys)


def _read_rounds(run: RunData, rows: list[dict]) -> None:
    for i, row in enumerate(rows, start=1):
        r = _number(row.get("round"))
        r = float(i) if r is None else r
        sites = _site_records(row)
        for site, rec in sites.items():
            for head, keys in HEAD_KEYS.items():
                _append(run.auc.setdefault(("global", head), {}), site, r, _first(rec.get("eval_global"), keys))
                _append(run.auc.setdefault(("personalised", head), {}), site, r,
                        _first(rec.get("eval_personal"), keys))
            for head, keys in VAL_KEYS.items():  # the global model's (evaluate reply); older runs: the trained
                # local model's (train reply)
                src = rec.get("eval_global") if _has_any(rec.get("eval_global"), keys) else rec.get("train")
                _append(run.auc.setdefault(("validation", head), {}), site, r, _first(src, keys))
            for term, v in _loss_terms(rec.get("train"), "loss_").items():
                _append(run.losses.setdefault(term, {}), site, r, math.nan if v is None else v)
            _append(run.bytes_sent, site, r, _number(rec.get("bytes_sent")))
            _append(run.bytes_received, site, r, _number(rec.get("bytes_received")))
        agg = as_dict(row.get("evaluate_aggregate"))
        for model, prefix in (("global", "global_"), ("personalised", "personal_")):
            for head, keys in HEAD_KEYS.items():
                _append(run.auc.setdefault((model, head), {}), MEAN_OF_SITES, r,
                        _first(agg, tuple(prefix + k for k in keys)))
        val = as_dict(row.get("val_auc"))  # the server's pooled validation AUC of the monitored head
        for head, keys in VAL_KEYS.items():
            mean = _number(val.get("pooled")) if val.get("monitor") in keys else None
            _append(run.auc.setdefault(("validation", head), {}), MEAN_OF_SITES, r,
                    mean if val else _first(row.get("train_aggregate"), keys))
        if not sites:  # totals only when there is no per-site split
            _append(run.bytes_sent, "all sites", r, _number(row.get("bytes_sent")))
            _append(run.bytes_received, "all sites", r, _number(row.get("bytes_received")))
        eps = _number(row.get("epsilon"))
        eps = _first(row.get("privacy"), ("epsilon",)) if eps is None else eps
        if eps is not None:
            run.epsilon[0].append(r)
            run.epsilon[1].append(eps)
        sec = row.get("seconds")
        sec = _number(sec) if _number(sec) is not None else _first(sec, ("total",))
        if sec is not None:
            run.seconds[0].append(r)
            run.seconds[1].append(sec)
        for d in row.get("dropouts") or []:
            if isinstance(d, dict):
                run.dropouts.append({"round": int(r), "site": d.get("site", "?"), "phase": d.get("phase", "?"),
                                     "reason": d.get("reason", "")})


def _read_epochs(run: RunData, rows: list[dict]) -> None:
    for i, row in enumerate(rows, start=1):
        e = _number(row.get("epoch"))
        e = float(i) if e is None else e
        terms = _loss_terms(row, "loss_")
        terms.update(_loss_terms(row, "train_"))
        for term, v in terms.items():
            _append(run.losses.setdefault(term, {}), "train", e, math.nan if v is None else v)
        for head, keys in VAL_KEYS.items():
            _append(run.auc.setdefault(("validation", head), {}), "validation split", e, _first(row, keys))
        sec = _number(row.get("seconds"))
        if sec is not None:
            run.seconds[0].append(e)
            run.seconds[1].append(sec)


def read_predictions(path: Path) -> Predictions:
    """One ``predictions/test_<site>.csv`` (slide_id, label, probability or prob[, memory_score]).

    An all-empty ``memory_score`` column (a model without memory) counts as absent; bad files raise MomkdError.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise MomkdError(f"{path}: cannot read predictions CSV ({exc})") from exc
    prob_col = next((c for c in ("probability", "prob") if c in df.columns), None)
    if "label" not in df.columns or (prob_col is None and "memory_score" not in df.columns):
        raise MomkdError(f"{path}: columns {list(df.columns)} lack 'label' or a score ('probability' or "
                         f"'memory_score'); expected slide_id, label[, probability][, memory_score]")
    labels = df["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise MomkdError(f"{path}: column 'label' must hold 0/1, found {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    prob = df[prob_col].to_numpy(np.float64) if prob_col else None  # (N,)
    mem = df["memory_score"].to_numpy(np.float64) if "memory_score" in df.columns else None  # (N,)
    if mem is not None and np.isnan(mem).all():
        mem = None
    if prob is None and mem is None:
        raise MomkdError(f"{path}: no scores: the memory_score column is empty and there is no probability column")
    for name, v in ((prob_col, prob), ("memory_score", mem)):
        if v is not None and not np.isfinite(v).all():
            raise MomkdError(f"{path}: column {name!r} has {int((~np.isfinite(v)).sum())} empty or non-finite "
                             f"value(s)")
    return Predictions(labels.astype(np.int64), prob, mem)


def _pool(preds: dict[str, Predictions]) -> Predictions:
    parts = list(preds.values())
    mem = prob = None
    if all(p.memory_score is not None for p in parts):
        mem = np.concatenate([p.memory_score for p in parts])
    if all(p.prob is not None for p in parts):
        prob = np.concatenate([p.prob for p in parts])
    return Predictions(np.concatenate([p.labels for p in parts]), prob, mem)


def _read_predictions_dir(run: RunData) -> None:
    folder = run.run_dir / PREDICTIONS_DIR
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("test_*.csv")):
        run.predictions[path.stem[len("test_"):]] = read_predictions(path)
    sites = {k: v for k, v in run.predictions.items() if k != "pooled"}
    if "pooled" not in run.predictions and len(sites) > 1:
        run.predictions["pooled"] = _pool(sites)


def load_run(run_dir: Path) -> RunData:
    """Read ``run_dir``; raise MomkdError naming the folder and the files expected when it holds none of them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MomkdError(f"{run_dir}: no such run folder (give the --out folder of simulate, server or train)")
    present = [f for f in (*FEDERATED_FILES, *TRAIN_FILES) if (run_dir / f).is_file()]
    if not present:
        raise MomkdError(f"{run_dir}: not a run folder: none of {', '.join(FEDERATED_FILES + TRAIN_FILES)} is "
                         f"there (a federated run writes rounds.jsonl and summary.json, a train run epochs.jsonl "
                         f"and metrics.json)")
    kind = "federated" if any(f in present for f in FEDERATED_FILES) else "train"
    run = RunData(run_dir=run_dir, kind=kind)
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        run.config_text = cfg.read_text(encoding="utf-8")
    if (run_dir / "rounds.jsonl").is_file():
        _read_rounds(run, read_jsonl(run_dir / "rounds.jsonl"))
    if (run_dir / "summary.json").is_file():
        run.summary = _read_json(run_dir / "summary.json")
    if (run_dir / "epochs.jsonl").is_file():
        _read_epochs(run, read_jsonl(run_dir / "epochs.jsonl"))
    if (run_dir / "metrics.json").is_file():
        run.summary = _read_json(run_dir / "metrics.json")
    _read_predictions_dir(run)
    log.info("read %s run folder %s (%s)", kind, run_dir, ", ".join(present))
    return run


def finite(values: list) -> bool:
    """True when at least one value is a finite number (a series of NaN draws nothing)."""
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
