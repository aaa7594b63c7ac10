"""Centralised or single-site training (the ``train`` command and the federation's baselines).

``run_training`` loads the site(s), z-scores genomics with statistics from TRAINING paired cases only, builds
the model, initialises its memory by k-means, fits with early stopping on validation AUC, evaluates
histology-only on validation and test (classifier head and memory-score head), calibrates each head on the
validation split (Platt map and decision threshold, :mod:`momkd_fed.calibration`), and writes a self-describing
run folder:

- ``config.yaml``: the resolved config
- ``epochs.jsonl``: one JSON object per epoch
- ``metrics.json``: test and validation metrics of both heads, per-site test metrics, thresholds, each head's
  calibration and the expected calibration error of its raw and calibrated test probabilities, slide and
  exclusion counts, seconds
- ``model.pt``: the checkpoint (loadable by :func:`momkd_fed.checkpoint.load_model` / ``predict``); every head
  trained, the classifier primary (:mod:`momkd_fed.heads`), the calibrations stored

Everything is written into a hidden staging folder first and moved into ``out_dir`` only when the run
succeeded, so an interrupted run leaves no half-written files there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .calibration import DEFAULT_THRESHOLD, calibrate_heads, expected_calibration_error, raw_probability
from .checkpoint import save_checkpoint
from .config import Config, SiteConfig, dump_yaml
from .data.bag import Bag, SiteData
from .data.omics import merge_moments, moments_to_mean_std, normalize_omics, omics_moments
from .data.site import load_site
from .device import resolve_device, seed_everything, set_threads
from .engine import Predictions, evaluate, fit, init_memory_from_bags
from .errors import ConfigError, DataError
from .heads import model_heads, primary_head
from .model import build_model
from .run_log import PREDICTIONS_DIR, json_safe, write_predictions_csv

log = logging.getLogger(__name__)

OUTPUT_FILES = ("config.yaml", "epochs.jsonl", PREDICTIONS_DIR, "model.pt", "metrics.json")  # moved in this order


def _select_sites(cfg: Config, site: str | None, pooled: bool) -> list[SiteConfig]:
    if site is not None and pooled:
        raise ConfigError("train: give either a site name or pooled=True, not both")
    if not cfg.sites:
        raise ConfigError("sites: the config lists no sites (fix: add a sites: section with manifest and "
                          "features_dir, or run `momkd-fed synth` for a synthetic federation)")
    if site is not None:
        return [cfg.site(site)]
    if pooled or len(cfg.sites) == 1:
        return list(cfg.sites)
    raise ConfigError(f"train: the config has {len(cfg.sites)} sites ({[s.name for s in cfg.sites]}); "
                      "choose one with --site NAME or pool them with --pooled")


def _gene_panel(datas: list[SiteData], sites: list[SiteConfig]) -> list[str]:
    """The gene panel shared by every site holding genomics ([] when none does)."""
    panel: list[str] | None = None
    first = ""
    for data, sc in zip(datas, sites):
        if not data.has_omics:
            continue
        if panel is None:
            panel, first = list(data.genes), sc.name
        elif list(data.genes) != panel:
            raise DataError(sc.omics, f"gene panel differs from site {first!r} ({len(data.genes)} vs "
                                      f"{len(panel)} genes, or another order)",
                            "set data.gene_panel so that every site uses the same genes in the same order")
    return panel or []


def _case_vectors(bags: list[Bag]) -> list[np.ndarray]:
    """One genomic vector per training case (a case's several slides share one vector; count it once)."""
    seen: dict[str, np.ndarray] = {}
    for b in bags:
        if b.omics is not None and b.split == "train" and b.case_id not in seen:
            seen[b.case_id] = b.omics.numpy()
    return list(seen.values())


def normalise_sites(datas: list[SiteData], sites: list[SiteConfig],
                    cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """Z-score (and clip) every bag's genomics in place with statistics from training paired cases only.

    ``data.omics_stats: federated`` pools the moments of all sites (:func:`merge_moments`); ``site`` uses each
    site's own. Returns the pooled (mean (G,), std (G,)), or None when no site has genomics or stats are
    per site.
    """
    moments = {}
    for data, sc in zip(datas, sites):
        if not data.has_omics:
            continue
        vecs = _case_vectors(data.bags)
        if vecs:
            moments[sc.name] = omics_moments(vecs)
        elif cfg.data.omics_stats == "site":
            raise DataError(sc.omics, "no training case of this site has genomics, so per-site z-score "
                                      "statistics cannot be computed", "set data.omics_stats: federated")
    if not moments:
        if any(d.has_omics for d in datas):
            raise DataError(next(sc.omics for d, sc in zip(datas, sites) if d.has_omics),
                            "genomics are present but no training case has them; statistics would come from "
                            "validation/test cases", "give training cases genomics, or drop the omics path")
        return None
    pooled = moments_to_mean_std(merge_moments(list(moments.values())))
    for data, sc in zip(datas, sites):
        if not data.has_omics:
            continue
        mean, std = pooled if cfg.data.omics_stats == "federated" else moments_to_mean_std(moments[sc.name])
        data.bags = [b if b.omics is None else
                     dataclasses.replace(b, omics=normalize_omics(b.omics, mean, std, cfg.data.omics_clip))
                     for b in data.bags]
    return pooled if cfg.data.omics_stats == "federated" else None


def _check_train_split(train: list[Bag], sites: list[SiteConfig]) -> None:
    classes = {b.label for b in train}
    if len(classes) < 2:
        where = ", ".join(s.manifest for s in sites)
        raise DataError(where, f"the training split holds {len(train)} slides of "
                               f"{'no class' if not classes else 'class ' + str(classes.pop()) + ' only'}",
                        "training needs slides of both classes: check the label column, label_map and splits")


def _head_metrics(pred: Predictions, thr: dict[str, float]) -> dict:
    return pred.metrics(thr["classifier"], thr["memory"])


def calibration_error(test: Predictions, calibration: dict) -> dict:
    """``{head: {"raw": ECE, "calibrated": ECE}}`` on ``test``: the head's uncalibrated output read as a
    probability (softmax P, sigmoid of delta) against its calibrated probability (10 equal-width bins)."""
    out = {}
    for head, cal in calibration.items():
        raw = test.scores(head)
        out[head] = {"raw": expected_calibration_error(test.labels, raw_probability(head, raw)),
                     "calibrated": expected_calibration_error(test.labels, cal.probability(raw)),
                     "bins": "10 equal-width probability bins"}
    return out


def _subset(pred: Predictions, keep: np.ndarray) -> Predictions:
    return Predictions(slide_ids=[s for s, k in zip(pred.slide_ids, keep) if k], labels=pred.labels[keep],
                       probs=pred.probs[keep],
                       memory_scores=None if pred.memory_scores is None else pred.memory_scores[keep])


def run_training(cfg: Config, out_dir: str | Path, *, site: str | None = None, pooled: bool = False) -> dict:
    """Train one model centrally on one site (``site``) or on all sites pooled (``pooled=True``).

    With a single site in the config neither argument is needed.

    Returns
    -------
    dict
        The content of ``metrics.json``.

    Raises
    ------
    ConfigError, DataError
        Bad site choice, unusable data (e.g. a one-class training split), disagreeing gene panels.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    sites = _select_sites(cfg, site, pooled)
    set_threads(cfg.train.threads)
    datas = [load_site(sc, cfg) for sc in sites]
    genes = _gene_panel(datas, sites)
    omics_norm = normalise_sites(datas, sites, cfg)
    n_genes = len(genes)
    split: dict[str, list[Bag]] = {"train": [], "val": [], "test": []}
    for data in datas:
        for name in split:
            split[name] += data.split(name)
    _check_train_split(split["train"], sites)
    t_loaded = time.perf_counter()

    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train)
    model = build_model(cfg, cfg.data.feature_dim, n_genes).to(device)
    memory_points = init_memory_from_bags(model, split["train"], cfg, device=device)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        dump_yaml(cfg, staging / "config.yaml")
        with open(staging / "epochs.jsonl", "w") as epochs_file:
            def log_row(row: dict) -> None:
                epochs_file.write(json.dumps(json_safe(row)) + "\n")
                epochs_file.flush()

            result = fit(model, split["train"], split["val"], cfg, device=device, log_fn=log_row)
        t_fit = time.perf_counter()

        val = evaluate(model, split["val"], device, cfg.train.precision)
        heads = model_heads(cfg)
        where = f"{len(sites)} sites pooled" if len(sites) > 1 else f"site {sites[0].name}"
        calibration = calibrate_heads(cfg, val.labels, {h: val.scores(h) for h in heads},
                                      f"validation split ({len(val.labels)} slides, {where})")
        thr = {h: (calibration[h].threshold if h in calibration else DEFAULT_THRESHOLD[h]) for h in DEFAULT_THRESHOLD}
        test = evaluate(model, split["test"], device, cfg.train.precision)
        test_sites = np.asarray([d.name for d in datas for _ in d.split("test")])  # (N_test,) same order
        for d in datas:  # per-slide test scores for ROC curves (the data is local here)
            part = _subset(test, test_sites == d.name)
            write_predictions_csv(staging / PREDICTIONS_DIR / f"test_{d.name}.csv", part.slide_ids, part.labels,
                                  part.probs, part.memory_scores)
        metrics = {
            "model": cfg.model.name,
            "sites": [sc.name for sc in sites],
            "pooled": len(sites) > 1,
            "test": _head_metrics(test, thr),
            "val": _head_metrics(val, thr),
            "test_per_site": ({name: _head_metrics(_subset(test, test_sites == name), thr)
                               for name in [sc.name for sc in sites]} if len(sites) > 1 else {}),
            "thresholds": thr,
            "threshold_rule": (f"{cfg.calibration.threshold} on validation (calibration.threshold; classifier: "
                               "P(y=1) >= t; memory: delta >= t)"),
            "heads": heads,
            "primary_head": primary_head(heads),
            "calibration": {h: c.to_dict() for h, c in calibration.items()},
            "test_ece": calibration_error(test, calibration),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "monitor": result.monitor,
            "monitor_note": result.note,
            "slides": {name: len(b) for name, b in split.items()},
            "paired_train_slides": sum(b.omics is not None for b in split["train"]),
            "n_genes": n_genes,
            "memory_init_points": {str(k): v for k, v in memory_points.items()},
            "excluded": {d.name: {"count": len(d.excluded), "examples": [list(e) for e in d.excluded[:10]]}
                         for d in datas},
            "device": str(device),
            "precision": cfg.train.precision,
            "seconds": {"load": t_loaded - t_start, "fit": t_fit - t_loaded,
                        "total": time.perf_counter() - t_start},
        }
        save_checkpoint(staging / "model.pt", model, cfg, feature_dim=cfg.data.feature_dim, n_genes=n_genes,
                        omics_norm=None if omics_norm is None else (torch.from_numpy(omics_norm[0]),
                                                                    torch.from_numpy(omics_norm[1])),
                        extra={"epoch": result.best_epoch, "threshold": thr, "genes": genes, "heads": heads,
                               "primary_head": primary_head(heads), "calibration": metrics["calibration"],
                               "metrics": json_safe({"test": metrics["test"], "val": metrics["val"]}),
                               "sites": metrics["sites"], "kind": "train"})
        metrics["seconds"]["total"] = time.perf_counter() - t_start
        (staging / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
        (out_dir / "metrics.json").unlink(missing_ok=True)  # a re-run into the same folder: incomplete until the end
        for name in OUTPUT_FILES:  # metrics.json is moved after model.pt: its presence marks a complete run
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
            os.replace(staging / name, out_dir / name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    clf = metrics["test"]["classifier"]
    mem = metrics["test"]["memory"]
    log.info("train: model.pt test AUC %.3f (classifier, primary head), %s (memory head) on %d test slides in "
             "%.1f s", clf["auc"], "n/a" if mem is None else f"{mem['auc']:.3f}", clf["n"],
             metrics["seconds"]["total"])
    return metrics
