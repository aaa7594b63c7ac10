"""Histology-only inference with a trained checkpoint, and attention export for heat maps (h5 + QuPath GeoJSON).

The model answers with one head (:mod:`momkd_fed.heads`): the checkpoint's primary head, or ``head`` if given.
It never answers with an untrained head: the federated global model's classifier, site-private under the default
sharing, is refused with a one-line error naming the fix. For each feature file: the head's raw score, its
calibrated probability and the predicted label at the threshold chosen on validation (both stored in the
checkpoint, :mod:`momkd_fed.calibration`), and the per-patch attention row-aligned with ``coords``. A slide that
cannot be read is reported and skipped; the others complete.

Outputs in ``out_dir``:

- ``predictions.csv``, one row per slide (:data:`CSV_COLUMNS`):

  - ``slide_id``: the feature file's name without ``.h5``;
  - ``head``: the head that scored it, ``classifier`` or ``memory``;
  - ``probability``: calibrated P(y=1), Platt-scaled on validation slides the model never trained on; a strictly
    increasing function of ``raw_score`` (same ranking, same AUC); empty when the checkpoint holds no calibration
    of that head (written by an older momkd-fed, or validation held one class: a note says so);
  - ``label_pred``: 1 if ``raw_score >= threshold`` (the same decision as the probability reaching the
    calibrated threshold), the threshold chosen on validation by ``calibration.threshold``;
  - ``raw_score``: the head's uncalibrated output, softmax P(y=1) of the classifier or the memory score
    delta(F_wsi) in [-2, 2] (no probability scale);
- ``attention/<slide_id>.h5``: ``attention_scores`` (P,) float32, ``coords`` (P, 2) int64, attribute
  ``patch_size_level0`` (CLAM heat-map layout)
- ``attention/<slide_id>.geojson``: QuPath FeatureCollection, one square tile per patch with measurement
  ``attention`` (in QuPath: Measure > Show measurement maps > attention)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .calibration import DEFAULT_THRESHOLD, Calibration
from .checkpoint import load_model
from .data.cache import parse_slide
from .errors import CheckpointError, DataError, MomkdError
from .heads import choose_head
from .report.heatmap import render_heatmap

log = logging.getLogger(__name__)

CSV_COLUMNS = ("slide_id", "head", "probability", "label_pred", "raw_score")


@dataclass
class PredictReport:
    """What :func:`predict_paths` did.

    Attributes
    ----------
    ok : list of dict, one per scored slide (the ``predictions.csv`` row plus ``path`` and ``num_patches``)
    failed : list of (path, reason), slides skipped
    notes : list of str, things the user should know (e.g. a GeoJSON not written)
    head : str, the head that scored the slides
    calibration : Calibration or None, its calibrated probability and threshold (None: none stored)
    """

    ok: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head: str = ""
    calibration: Calibration | None = None


def feature_files(features: str | Path) -> list[Path]:
    """The .h5 files to score: ``features`` itself, or every .h5 under a folder (recursively, sorted)."""
    p = Path(features)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.h5") if f.is_file())
        if not files:
            raise DataError(str(p), "no .h5 feature files in this folder",
                            "point at a TRIDENT features_<encoder>/ or CLAM h5_files/ folder")
        return files
    raise DataError(str(p), "feature file or folder not found", "check the path")


def infer_patch_size(coords: np.ndarray) -> int:
    """Grid step of level-0 coordinates (smallest positive gap along x or y); 0 when it cannot be told."""
    gaps = []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])  # sorted
        d = np.diff(u)
        if d.size:
            gaps.append(int(d.min()))
    return min(gaps) if gaps else 0


def write_attention_h5(path: Path, attention: np.ndarray, coords: np.ndarray, patch_size_level0: int) -> None:
    """CLAM-style heat-map file: ``attention_scores`` (P,) float32, ``coords`` (P, 2) int64 (atomic write)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("attention_scores", data=np.asarray(attention, dtype=np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        c.attrs["patch_size_level0"] = int(patch_size_level0)
        f.attrs["patch_size_level0"] = int(patch_size_level0)
    os.replace(tmp, path)


def write_attention_geojson(path: Path, attention: np.ndarray, coords: np.ndarray, patch_size: int) -> None:
    """QuPath GeoJSON: one ``tile`` Polygon per patch square [x, y, x+ps, y+ps] (level-0 pixels), with the
    patch's attention as a QuPath measurement and as a plain property (atomic write)."""
    features = []
    for (x, y), a in zip(coords.tolist(), attention.tolist()):
        ring = [[x, y], [x + patch_size, y], [x + patch_size, y + patch_size], [x, y + patch_size], [x, y]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": "Attention", "color": [230, 60, 40]},
                "measurements": {"attention": a},
                "attention": a,
            },
        })
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f, separators=(",", ":"))
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "probability": "" if r["probability"] is None else repr(r["probability"]),
                        "raw_score": repr(r["raw_score"])})
    os.replace(tmp, path)


def _calibration(meta: dict, head: str, path: str | Path) -> Calibration | None:
    stored = (meta.get("calibration") or {}).get(head)
    if stored is None:
        return None
    try:
        return Calibration.from_dict(stored)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the stored calibration of the {head} head is unreadable ({exc})") from exc


def _threshold(meta: dict, head: str, cal: Calibration | None) -> float:
    """The validation-chosen threshold on the head's raw score: the calibration's, else the stored one."""
    if cal is not None:
        return float(cal.threshold)
    thr = meta.get("threshold")
    if isinstance(thr, dict):
        thr = thr.get(head)
    return DEFAULT_THRESHOLD[head] if thr is None or not math.isfinite(float(thr)) else float(thr)


@torch.no_grad()
def predict_paths(model_path: str | Path, features: str | Path, out_dir: str | Path, *, heatmaps: bool = False,
                  device: str | None = None, head: str | None = None) -> PredictReport:
    """Score one feature file or a folder of them with a checkpoint, histology-only.

    Parameters
    ----------
    model_path : a checkpoint: ``model.pt`` (train), ``best_model.pt`` / ``global_model.pt`` (federation), a
        site's ``personal_model.pt``.
    features : one TRIDENT/CLAM .h5 file, or a folder searched recursively for .h5 files.
    out_dir : where ``predictions.csv`` and ``attention/`` are written (created).
    heatmaps : also render each slide's attention over its patch grid as ``heatmaps/<slide_id>.png``.
    device : "cpu" or "cuda"; None = CUDA when available.
    head : "classifier" or "memory"; None = the checkpoint's primary head. An untrained head is refused.

    Returns
    -------
    PredictReport; ``failed`` non-empty means some slides were skipped (the CLI exits non-zero).

    Raises
    ------
    CheckpointError, DataError
        Unreadable checkpoint, a head the model lacks or did not train (one line naming the fix); missing
        features path or a folder without .h5 files.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, meta = load_model(model_path, map_location=dev)
    head = choose_head(meta, cfg, head, model_path)
    cal = _calibration(meta, head, model_path)
    threshold = _threshold(meta, head, cal)
    feature_dim = int(meta["feature_dim"])
    files = feature_files(features)
    out_dir = Path(out_dir)
    att_dir = out_dir / "attention"
    att_dir.mkdir(parents=True, exist_ok=True)
    report = PredictReport(head=head, calibration=cal)
    if cal is None:
        report.notes.append(f"{model_path}: no calibration of the {head} head is stored; the probability column "
                            f"is left empty and label_pred uses the stored threshold {threshold:.4g}")
    seen: dict[str, Path] = {}
    for path in files:
        slide_id = path.stem
        if slide_id in seen:
            report.failed.append((str(path), f"duplicate slide id {slide_id!r} (also {seen[slide_id]})"))
            continue
        try:  # the same reading and graph rule as training (stored edge_index_k8 when knn_k == 8, else kNN)
            sf = parse_slide(path, feature_dim, cfg.data.knn_k)
        except (MomkdError, OSError) as exc:
            report.failed.append((str(path), str(exc)))
            log.warning("predict: skipping %s", exc)
            continue
        num_patches = int(sf.features.shape[0])
        coords = sf.coords.numpy()  # (P, 2)
        if num_patches == 0:
            report.failed.append((str(path), "empty slide: no patches to score"))
            continue
        seen[slide_id] = path
        feats = sf.features.to(dev)  # (P, D)
        nbrs = sf.neighbors.to(dev)  # (P, k+1)
        try:
            out = model(feats, nbrs, None)
        except torch.OutOfMemoryError as exc:
            report.failed.append((str(path), f"out of memory with {num_patches} patches: {exc}"))
            continue
        raw = float(torch.softmax(out.logits.float(), dim=-1)[1]) if head == "classifier" \
            else float(out.memory_score)
        prob = None if cal is None else float(cal.probability([raw])[0])
        attention = out.attention.float().cpu().numpy()  # (P,)
        write_attention_h5(att_dir / f"{slide_id}.h5", attention, coords, sf.patch_size_level0)
        ps = sf.patch_size_level0 or infer_patch_size(coords)
        if ps > 0:
            write_attention_geojson(att_dir / f"{slide_id}.geojson", attention, coords, ps)
        else:
            report.notes.append(f"{path}: patch size unknown and not inferable from one patch; no GeoJSON")
        if heatmaps:
            render_heatmap(coords, attention, max(ps, 1), out_dir / "heatmaps" / f"{slide_id}.png", title=slide_id)
        report.ok.append({"slide_id": slide_id, "head": head, "probability": prob, "label_pred": int(raw >= threshold),
                          "raw_score": raw, "path": str(path), "num_patches": num_patches})
    _write_csv(out_dir / "predictions.csv", report.ok)
    log.info("predict: %d slides scored with the %s head of %s (%s), %d skipped -> %s", len(report.ok), head,
             model_path, "calibrated: " + cal.source if cal else "no calibration stored", len(report.failed),
             out_dir)
    return report
