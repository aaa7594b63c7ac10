"""Benchmark: the scientific claim -- histology-only test AUC of MoMKD vs ABMIL, local vs pooled vs federated.

Data: the ``tcga-brca`` synthetic federation (REAL TCGA-BRCA genomics, labels and regions -- one site per region;
SYNTHETIC histology generated from each case's genomic profile, see ``momkd_fed.synth``), one cohort per task
(HER2, PR, ODX), generated once and reused for every seed and model. Splits are the preset's patient-level,
label-stratified splits made within each site (a site's patients never cross sites). Training seeds vary the
model initialisation, slide sampling and dropout; the cohort (and hence the split) is fixed per task by
``--data-seed``.

For each task and seed:

- ``pooled``   : one model on all sites' training slides (centralised), MoMKD and ABMIL;
- ``local``    : one model per site on that site alone, MoMKD and ABMIL;
- ``federated``: :func:`server.simulate.run_simulation` (Flower's simulation engine, a real SuperLink), MoMKD
  with the default memory (gradient) and privacy off, and ABMIL; the benchmark also shares MoMKD's
  classifier head and the attention temperature (``federation.shared`` + ``classifier.``, ``log_tau``) so that
  the global model has a trained classifier that sees the temperature it was trained with (the memory-score
  head needs neither);
- ``privacy``  : federated MoMKD with ``privacy.enabled`` and ``memory.update: ema`` (the private defaults);
- ``ablations``: pooled MoMKD with the memory frozen (k-means init) and in ema mode (gradient = the pooled run),
  and pooled MoMKD with no genomics anywhere (every site histology-only) vs with genomic alignment.

Every model is evaluated histology-only on the held-out test slides of every site: per-site AUC, the mean of the
per-site AUCs over genomic sites and over histology-only sites, and the AUC over the union of all test slides
("pooled AUC"; it also rewards knowing the site, because label prevalence differs between regions, so the
per-site mean is the primary figure). MoMKD reports both heads: the classifier and the memory score
delta(F_wsi).

Usage::

    python benchmarks/accuracy.py --quick                  # reduced cohorts, ~40 min on 2 cores
    python benchmarks/accuracy.py --medium                 # full-size cohorts, small model (benchmarks/README.md)
    python benchmarks/accuracy.py --tasks her2 --seeds 0   # one task, one seed, full-size cohort

Results: ``<out>/results.jsonl`` (one row per trained model), ``<out>/summary.json`` and ``<out>/results.md``
(the tables, with the settings and the command line).

``--fed-variants NAME,...`` (issue 14: is the federation as good as centralised?) runs, per task and seed, the
named federated MoMKD variants (:data:`FED_VARIANTS`, or ``--variant NAME:key=value,...``; each a set of config
overrides on top of the defaults) side by side on the same cohort and splits, with the federation's DEFAULT sharing
(classifier head private), plus the centralised MoMKD run and MoMKD trained alone at each histology-only site, and
tabulates the product heads: the global model's memory head (``best_model.pt``, the round chosen by pooled
validation) and the sites' personal classifiers (:func:`personal_classifier_aucs`) against the centralised model's
memory head and classifier; mean ± std over seeds and the per-seed differences to centralised. Resumable (a rerun
skips what ``results.jsonl`` holds; failed runs are retried) and safe to run in several processes side by side on
the same ``--out`` (each run is claimed by one process)::

    python benchmarks/accuracy.py --medium --fed-variants default,prox1 --tasks odx --seeds 0,1 --out runs/fedgap
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from momkd_fed.config import Config, FederationConfig, SiteConfig, from_flat, load_config, to_flat  # noqa: E402
from momkd_fed.metrics import roc_auc  # noqa: E402

log = logging.getLogger("accuracy")

TASKS = ("her2", "pr", "odx")
PARTS = ("pooled", "local", "federated", "privacy", "ablations")
ABMIL_SHARED = ["embed.", "attn_v.", "attn_u.", "attn_w.", "classifier."]
_DEFAULT_SHARED = ["histology_encoder.", "patch_proj.", "slide_proj.", "omics_encoder.", "omics_proj."]
# Federated MoMKD variants for --fed-variants (issue 14): flat config overrides on top of the defaults (which keep
# the classifier head private). "default" is today's federation; the others change one thing each.
FED_VARIANTS: dict[str, dict] = {
    "default": {},
    "prox1": {"federation.prox_mu": 1.0},  # FedProx; mu = 1 halves a local epoch's encoder drift here
    "prox0.1": {"federation.prox_mu": 0.1},
    "server_lr2": {"federation.server_lr": 2.0},  # FedAvg with server lr 2: twice the averaged step
    # server momentum: 3x the averaged step where rounds agree, round-to-round noise damped
    "fedavgm": {"federation.server_momentum": 0.9, "federation.server_lr": 0.3},
    # Flower's FedAdam / FedYogi; eta and tau sized to this federation's averaged step (~3e-4 per weight and round)
    "fedadam": {"federation.server_optimizer": "fedadam", "federation.server_lr": 1e-3, "federation.server_tau": 1e-4},
    "fedyogi": {"federation.server_optimizer": "fedyogi", "federation.server_lr": 1e-3, "federation.server_tau": 1e-4},
    "cosine": {"federation.lr_schedule": "cosine"},
    # the merged slots taken whole, as the encoders' average is: the default since Run 7 (benchmarks/README.md)
    "mem_mom0": {"federation.slot_momentum": 0.0},
    "slot_mom0.5": {"federation.slot_momentum": 0.5},  # the default before Run 7: half the old slots kept each round
    "lr2x": {"train.lr": 4e-4},  # twice the local lr (the centralised reference keeps the config's)
    # the classifier head and its temperature averaged too: every site's classifier is then the global one
    "clf_shared": {"federation.shared": _DEFAULT_SHARED + ["classifier.", "log_tau"]},
    "steps32": {"federation.local_steps": 32},
    # a step budget instead of whole epochs: every site the same steps per round (128 ~ the default's total steps
    # and averaged movement per round here), so the average weighs sites by slides (n_k), not n_k^2
    "budget128": {"federation.local_steps": 128},
    "budget64r30": {"federation.local_steps": 64, "federation.rounds": 30},  # half the drift, twice the rounds
    "reset_opt": {"federation.reset_optimizer": True},
    # both of the two that each moved ODX up a little (benchmarks/README.md Run 6)
    "reset_mem0": {"federation.reset_optimizer": True, "federation.slot_momentum": 0.0},
    # the memory fixed within a round at every site (ema mode, local momentum 1): all sites' encoders are trained
    # against the same target, and the server alone moves it, from the merged assigned means (patches + genomics)
    "mem_round_frozen": {"memory.update": "ema", "memory.momentum": 1.0},
    # as mem_round_frozen, the server moving it from the paired sites' genomic embeddings only: a server-held
    # genomic reference the histology side is aligned to
    "genomic_ref": {"memory.update": "ema", "memory.momentum": 1.0, "memory.ema_source": "omics"},
    # the memory as genomic_ref, moved per step at each site (memory.momentum's default) as well as by the server
    "ema_omics": {"memory.update": "ema", "memory.ema_source": "omics"},
    "decoder_shared": {"federation.shared": _DEFAULT_SHARED + ["omics_decoder."],
                       "federation.paired_only": ["omics_encoder.", "omics_proj.", "omics_decoder."]},
}
MOMKD_SHARED_EXTRA = ["classifier.", "log_tau"]  # the global model needs a trained head and its temperature


# --------------------------------------------------------------------------------------------------------------
# settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="her2,pr,odx", help="comma list of her2, pr, odx")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (comma list)")
    p.add_argument("--data-seed", type=int, default=0, help="cohort seed (histology and splits)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--models", default="momkd,abmil", help="comma list of momkd, abmil")
    p.add_argument("--histology-only", action="store_true",
                   help="every site without genomics, in every run (rows say so; a resume keeps them apart)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set memory.update=frozen (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="the reduced CPU run: 40 slides per site, median 100 patches, configs/cpu_small.yaml "
                        "dims, 6 epochs = 6 rounds, lr 1e-3, fp32, privacy and ablations on the first seed only "
                        "(flags given explicitly win)")
    p.add_argument("--medium", action="store_true",
                   help="the CPU run of benchmarks/README.md that speaks to the claims: full-size cohorts, median "
                        "100 patches (max 300), configs/cpu_small.yaml dims, 15 epochs (patience 5) = 15 rounds, "
                        "the config's lr, fp32, 1 thread, privacy and ablations on the first seed only")
    p.add_argument("--max-slides-per-site", type=int, default=None, help="cohort size cap per site (0 = all)")
    p.add_argument("--median-patches", type=int, default=None, help="synthetic median bag size")
    p.add_argument("--max-patches", type=int, default=None, help="synthetic largest bag")
    p.add_argument("--cohort-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="synthetic cohort field (momkd_fed.synth: preset or histology), e.g. site_shift_norm=0 "
                        "for a cohort without that site effect (repeatable; the cohort is cached per setting)")
    p.add_argument("--epochs", type=int, default=None, help="pooled/local training epochs")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (epochs)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per federated round")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the config's)")
    p.add_argument("--model-config", default=None,
                   help="YAML of config overrides (model dims etc.), e.g. configs/cpu_small.yaml; "
                        "--quick uses benchmarks' small dims")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32 (default) or bf16 autocast; bf16 pays only on CPUs with AMX (measured on an "
                        "AVX512-BF16 CPU without AMX: MoMKD step 11.1 ms bf16 vs 9.3 ms fp32)")
    p.add_argument("--extra-seeds", default=None,
                   help="seeds for the privacy and ablation parts (default: --seeds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, 1 with --quick)")
    p.add_argument("--fed-variants", default=None, metavar="NAME,...",
                   help="issue 14 mode: these federated MoMKD variants (names of FED_VARIANTS or --variant) beside "
                        "centralised MoMKD and MoMKD alone at the histology-only sites; --parts is ignored")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="define (or redefine) a federated variant for --fed-variants, e.g. "
                        "--variant 'prox3:federation.prox_mu=3' (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="--fed-variants: print the tables of what results.jsonl holds; run nothing")
    p.add_argument("--out", default="runs/accuracy", help="output folder (cohorts are cached under it)")
    p.add_argument("--shared-data", default=None, help="folder holding tcga_brca/ (default: ../shared/data)")
    p.add_argument("--keep-runs", action="store_true", help="keep every run folder (default: delete after use)")
    a = p.parse_args(argv)
    quick = dict(max_slides_per_site=40, median_patches=100, max_patches=300, epochs=6, patience=6, rounds=6,
                 lr=1e-3, precision="fp32", threads=1)
    full = dict(max_slides_per_site=0, median_patches=None, max_patches=None, epochs=20, patience=5, rounds=20,
                lr=None, precision="fp32", threads=2)
    medium = dict(max_slides_per_site=0, median_patches=100, max_patches=300, epochs=15, patience=5, rounds=15,
                  lr=None, precision="fp32", threads=1, model_config=str(ROOT / "configs" / "cpu_small.yaml"))
    if a.quick and a.medium:
        p.error("--quick and --medium: choose one")
    for k, v in (quick if a.quick else medium if a.medium else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if a.extra_seeds is None:
        a.extra_seeds = a.seeds[:1] if (a.quick or a.medium) else a.seeds
    else:
        a.extra_seeds = [int(s) for s in a.extra_seeds.split(",") if s.strip()]
    a.parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    a.models = [s.strip() for s in a.models.split(",") if s.strip()]
    bad = ([t for t in a.tasks if t not in TASKS] + [q for q in a.parts if q not in PARTS]
           + [m for m in a.models if m not in ("momkd", "abmil")])
    if bad:
        p.error(f"unknown task/part {bad}")
    a.variants = dict(FED_VARIANTS)
    for item in a.variant:
        name, sep, body = item.partition(":")
        if not sep or not name.strip():
            p.error(f"--variant {item!r}: expected NAME:KEY=VALUE,...")
        ov = {}
        for kv in filter(None, (x.strip() for x in body.split(","))):
            key, eq, value = kv.partition("=")
            if not eq:
                p.error(f"--variant {item!r}: {kv!r} is not KEY=VALUE")
            ov[key.strip()] = _value(value)
        a.variants[name.strip()] = ov
    if a.fed_variants is not None:
        a.fed_variants = [v.strip() for v in a.fed_variants.split(",") if v.strip()]
        unknown = [v for v in a.fed_variants if v not in a.variants]
        if unknown or not a.fed_variants:
            p.error(f"--fed-variants: unknown {unknown}; known: {', '.join(a.variants)}")
    return a


QUICK_MODEL = {  # the dims of configs/cpu_small.yaml (D_in stays 1536); ABMIL at the same width
    "model.hidden_dim": 128, "model.shared_dim": 32, "model.omics_hidden": 128, "model.omics_embed_dim": 128,
    "model.cls_hidden": 64, "model.abmil_hidden": 128, "memory.slots": 8,
}


def model_overrides(a: argparse.Namespace) -> dict:
    """Flat config overrides shared by every run of the benchmark."""
    ov: dict = {}
    if a.model_config:
        data = yaml.safe_load(Path(a.model_config).read_text()) or {}
        for section, values in data.items():
            for k, v in (values or {}).items():
                ov[f"{section}.{k}"] = v
    elif a.quick:
        ov.update(QUICK_MODEL)
    ov.update({"train.epochs": a.epochs, "train.patience": a.patience, "train.precision": a.precision,
               "train.threads": a.threads, "train.progress": False, "train.device": "cpu",
               "federation.rounds": a.rounds, "federation.local_epochs": a.local_epochs,
               "federation.client_cpus": 1.0})
    if a.lr is not None:
        ov["train.lr"] = a.lr
    ov.update(key_values(a.set))
    return ov


def key_values(items: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` (``--set``, ``--cohort-set``) as a dict, the values read by :func:`_value`."""
    return {key.strip(): _value(value) for key, _, value in (item.partition("=") for item in items)}


def _value(text: str):
    """A command-line value as YAML reads it, and numbers YAML 1.1 leaves as strings (``1e-4``) as floats."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def with_overrides(cfg: Config, ov: dict) -> Config:
    flat = to_flat(cfg)
    flat.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in ov.items()})
    return from_flat(flat)


# --------------------------------------------------------------------------------------------------------------
# cohorts


def cohort(a: argparse.Namespace, task: str) -> Path:
    """The task's synthetic cohort (generated once; reused when its settings match)."""
    from momkd_fed.synth import synthesize

    hist = {k: v for k, v in (("median_patches", a.median_patches), ("max_patches", a.max_patches)) if v}
    hist.update(key_values(a.cohort_set))
    settings = {"task": task, "seed": a.data_seed, "max_slides_per_site": a.max_slides_per_site, **hist}
    tag = "-".join(f"{k}{v}" for k, v in settings.items() if k not in ("task",))
    out = Path(a.out) / "data" / f"{task}-{tag}"
    yaml_path = out / "federation.yaml"
    stamp = out / "settings.json"
    if yaml_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return yaml_path
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    kw = {"task": task, "max_slides_per_site": a.max_slides_per_site, **hist}
    if a.shared_data:
        kw["shared_data"] = Path(a.shared_data)
    path = synthesize("tcga-brca", out, seed=a.data_seed, **kw)
    stamp.write_text(json.dumps(settings))
    log.info("cohort %s written in %.0f s", out, time.perf_counter() - t0)
    return path


# --------------------------------------------------------------------------------------------------------------
# evaluation


def site_predictions(model: torch.nn.Module, cfg: Config, sites: list[SiteConfig]) -> dict[str, dict]:
    """Histology-only test predictions of one model at each of ``sites``."""
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate

    out = {}
    for sc in sites:
        pred = evaluate(model, load_site(sc, cfg).split("test"), torch.device("cpu"), cfg.train.precision)
        out[sc.name] = {"labels": pred.labels, "classifier": pred.probs, "memory": pred.memory_scores}
    return out


def aucs(preds: dict[str, dict]) -> dict:
    """Per-site AUCs and the AUC over the union of the given sites' test slides, per head."""
    res: dict = {"sites": {}, "pooled": {}}
    heads = ["classifier"] + (["memory"] if all(p["memory"] is not None for p in preds.values()) else [])
    for name, p in preds.items():
        res["sites"][name] = {h: roc_auc(p["labels"], p[h]) for h in heads}
        res["sites"][name]["n"] = int(len(p["labels"]))
    if len(preds) > 1:
        y = np.concatenate([p["labels"] for p in preds.values()])
        for h in heads:
            res["pooled"][h] = roc_auc(y, np.concatenate([p[h] for p in preds.values()]))
    return res


def evaluate_checkpoint(path: Path, cfg: Config, sites: list[SiteConfig]) -> dict:
    from momkd_fed.checkpoint import load_model

    model, _, _ = load_model(path)
    return aucs(site_predictions(model, cfg, sites))


# --------------------------------------------------------------------------------------------------------------
# runs


def run_pooled(cfg: Config, out: Path) -> dict:
    from momkd_fed.training import run_training

    metrics = run_training(cfg, out, pooled=True)
    res = evaluate_checkpoint(out / "model.pt", cfg, cfg.sites)
    res["best_epoch"], res["epochs_run"] = metrics.get("best_epoch"), metrics.get("epochs_run")
    return res


def run_local(cfg: Config, out: Path) -> dict:
    """Each site alone; each site's test slides scored by its own model ("pooled" = union of those scores)."""
    from momkd_fed.checkpoint import load_model
    from momkd_fed.errors import MomkdError
    from momkd_fed.training import run_training

    preds, errors = {}, {}
    for sc in cfg.sites:
        try:
            run_training(cfg, out / sc.name, site=sc.name)
        except MomkdError as exc:
            log.warning("local %s at %s failed: %s", cfg.model.name, sc.name, exc)
            errors[sc.name] = str(exc)
            continue
        model, _, _ = load_model(out / sc.name / "model.pt")
        preds.update(site_predictions(model, cfg, [sc]))
    res = aucs(preds)
    res["errors"] = errors
    return res


def run_federated(cfg: Config, out: Path) -> dict:
    from server.simulate import run_simulation

    status, summary = run_simulation(cfg, out)
    if summary is None:
        raise RuntimeError(f"federated run did not complete: {status} (see {out / 'flower' / 'run.log'})")
    # the round with the best pooled validation AUC, as the centralised runs keep their best epoch; the last
    # round's model is scored too (the comparison before best-round selection existed)
    res = evaluate_checkpoint(out / "best_model.pt", cfg, cfg.sites)
    res["best_round"] = summary.get("best", {}).get("round")
    res["last_round"] = evaluate_checkpoint(out / "global_model.pt", cfg, cfg.sites)
    res["rounds_completed"] = summary.get("rounds_completed")
    res["personal_classifier"] = summary.get("test_auc_personal")
    res["privacy"] = summary.get("privacy")
    return res


def fed_config(cfg: Config) -> Config:
    """Share the classifier and tau so the global model's classifier is trained; ABMIL shares all of itself."""
    fed = cfg.federation
    if cfg.model.name == "abmil":
        fed = dataclasses.replace(fed, shared=list(ABMIL_SHARED), paired_only=[])
    else:
        fed = dataclasses.replace(fed, shared=list(dict.fromkeys(fed.shared + MOMKD_SHARED_EXTRA)))
    return dataclasses.replace(cfg, federation=fed)


def histology_only(cfg: Config) -> Config:
    return dataclasses.replace(cfg, sites=[dataclasses.replace(s, omics="") for s in cfg.sites])


def plan(a: argparse.Namespace, base: Config, seed: int) -> list[tuple[str, str, str, Config]]:
    """(setting, model, variant, config) for every run of one task and seed."""
    momkd = with_overrides(base, {"model.name": "momkd"})
    abmil = with_overrides(base, {"model.name": "abmil"})
    runs = []
    if "pooled" in a.parts:
        runs += [("pooled", "momkd", "main", momkd), ("pooled", "abmil", "main", abmil)]
    if "local" in a.parts:
        runs += [("local", "momkd", "main", momkd), ("local", "abmil", "main", abmil)]
    if "federated" in a.parts:
        runs += [("federated", "momkd", "main", fed_config(momkd)), ("federated", "abmil", "main", fed_config(abmil))]
    if "privacy" in a.parts and seed in a.extra_seeds:
        private = with_overrides(momkd, {"privacy.enabled": True, "memory.update": "ema"})
        runs += [("federated", "momkd", "privacy_on", fed_config(private))]
    if "ablations" in a.parts and seed in a.extra_seeds:
        runs += [("pooled", "momkd", "memory_frozen", with_overrides(momkd, {"memory.update": "frozen"})),
                 ("pooled", "momkd", "memory_ema", with_overrides(momkd, {"memory.update": "ema"})),
                 ("pooled", "momkd", "no_genomics", histology_only(momkd))]
    return [r for r in runs if r[1] in a.models]


def execute(setting: str, cfg: Config, out: Path) -> dict:
    if setting == "pooled":
        return run_pooled(cfg, out)
    if setting == "local":
        return run_local(cfg, out)
    return run_federated(cfg, out)


# --------------------------------------------------------------------------------------------------------------
# --fed-variants (issue 14): federated variants vs centralised, on the product heads


def personal_classifier_aucs(run_dir: Path, best_round: int | None) -> dict:
    """Each site's personal classifier test AUC: its ``personal_model.pt``, and the same model at other rounds.

    The personal model of a site is the global encoders and memory of a round plus the site's own private
    classifier head and temperature (trained in that round; ``client.local_round.evaluate_round``); every
    evaluate reply carries its test and validation AUC (``rounds.jsonl`` -> ``evaluate.<site>.personal``) and the
    round and AUCs of the site's ``personal_model.pt`` (the round ``federation.personal_round`` keeps). "sites" is
    that file, as the site's last evaluate reply reports it; also kept, from the same rows: the personal model at
    the round of the site's best own validation AUC (ties: the earlier round; no finite value: the last round;
    ``federation.personal_round: best_validation``), at the federation's best round (``best_model.pt``) and at the
    last round (``last``). Per-slide outputs never leave a site, so there is no AUC over the union of all sites'
    test slides here.

    Returns
    -------
    dict
        ``{"sites": {site: {"classifier": test AUC, "round": r, "val_auc": v}}, "at_own_best_val": {site: AUC},
        "own_best_val_round": {site: r}, "at_best_round": {site: AUC}, "at_last_round": {site: AUC}}``
    """
    from momkd_fed.federation import contract
    from momkd_fed.run_log import read_rounds

    rows = read_rounds(run_dir)
    if not rows:
        raise RuntimeError(f"{run_dir}: no rounds.jsonl rows to read the personal classifiers from")

    def pers(row: dict, site: str, key: str) -> float:
        v = row.get("evaluate", {}).get(site, {}).get("personal", {}).get(key)
        return math.nan if v is None else float(v)

    sites = sorted({s for r in rows for s in r.get("evaluate", {})})
    out: dict = {"sites": {}, "at_own_best_val": {}, "own_best_val_round": {}}
    for site in sites:
        chosen, best = rows[-1], -math.inf
        for r in rows:
            v = pers(r, site, "val_auc")
            if math.isfinite(v) and v > best:
                chosen, best = r, v
        out["at_own_best_val"][site] = pers(chosen, site, "test_auc")
        out["own_best_val_round"][site] = chosen["round"]
        last = next((r for r in reversed(rows) if pers(r, site, contract.PERSONAL_FILE_ROUND) > 0), None)
        if last is not None:
            out["sites"][site] = {"classifier": pers(last, site, contract.PERSONAL_FILE_TEST_AUC),
                                  "round": int(pers(last, site, contract.PERSONAL_FILE_ROUND)),
                                  "val_auc": pers(last, site, contract.PERSONAL_FILE_VAL_AUC)}
    by_round = {r["round"]: r for r in rows}
    best_row = by_round.get(best_round or -1, rows[-1])
    out["at_best_round"] = {s: pers(best_row, s, "test_auc") for s in sites}
    out["at_last_round"] = {s: pers(rows[-1], s, "test_auc") for s in sites}
    return out


def run_fed_variant(cfg: Config, out: Path) -> dict:
    """One federated MoMKD run with the config as given: the product heads' test AUCs (the global model's trained
    heads: the memory head, and the classifier where ``federation.shared`` shares it)."""
    from momkd_fed.heads import TRAINED, global_model_heads
    from momkd_fed.run_log import read_rounds
    from server.simulate import run_simulation

    status, summary = run_simulation(cfg, out)
    if summary is None:
        raise RuntimeError(f"federated run did not complete: {status} (see {out / 'flower' / 'run.log'})")
    best_round = summary.get("best", {}).get("round")
    glob = evaluate_checkpoint(out / "best_model.pt", cfg, cfg.sites)
    last = evaluate_checkpoint(out / "global_model.pt", cfg, cfg.sites)
    heads = [h for h, state in global_model_heads(cfg).items() if state == TRAINED]  # an untrained head: not read

    def keep_trained(res: dict) -> dict:
        return {"sites": {s: {**{h: v[h] for h in heads}, "n": v["n"]} for s, v in res["sites"].items()},
                "pooled": {h: res["pooled"][h] for h in heads}}

    curve = [{"round": r["round"], "val_pooled": r["val_auc"]["pooled"], "memory_test": r["test_auc"]["pooled"],
              "personal_test": r["test_auc_personal"]["pooled"], "seconds": r["seconds"].get("total")}
             for r in read_rounds(out)]  # slide-weighted means of the sites' AUCs, per round ("memory_test": the
    # global model's primary head, its classifier where shared)
    return {"global": keep_trained(glob), "global_last_round": keep_trained(last), "best_round": best_round,
            "rounds_completed": summary.get("rounds_completed"), "curve": curve,
            "personal": personal_classifier_aucs(out, best_round),
            "seconds_federation": summary.get("seconds")}


def run_alone(cfg: Config, out: Path) -> dict:
    """MoMKD trained on each histology-only site alone (the sites whose gain from the federation is claimed)."""
    alone = dataclasses.replace(cfg, sites=[s for s in cfg.sites if not s.omics])
    return run_local(alone, out)


def _claim(path: Path) -> bool:
    """Claim a run for this process (a file holding our PID); False while another live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # a stale claim (its process is gone): take it over
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def fed_variant_runs(a: argparse.Namespace, base: Config) -> list[tuple[str, str, dict, Config]]:
    """(setting, variant, variant overrides, config) of one task and seed: centralised, alone, the variants."""
    momkd = with_overrides(base, {"model.name": "momkd"})
    runs = [("pooled", "centralised", {}, momkd), ("alone", "alone", {}, momkd)]
    for name in a.fed_variants:
        ov = a.variants[name]
        runs.append(("federated", name, ov, with_overrides(momkd, ov)))
    return runs


def _row_key(r: dict) -> tuple:
    """What identifies a run: task, seed, setting, variant and its overrides, and the resolved config's fingerprint
    (so that a changed default reruns what it affects; rows written before fingerprints match without one)."""
    return (r["task"], r["seed"], r["setting"], r["variant"], json.dumps(r.get("variant_overrides", {}),
                                                                        sort_keys=True))


# settings that change no trained weight, only which round's model a site keeps as a file (a results row records
# every rule: ``personal_by_rule``): left out of the fingerprint, so runs from before them are not run again
NOT_TRAINING = ("federation.personal_round",)


def config_fingerprint(cfg: Config, setting: str = "federated") -> str:
    """A short hash of every setting of ``cfg`` except the site paths (the cohort is named by --out and the task)
    and, for a run that is not federated (``setting`` ``pooled`` or ``alone``), the ``federation.*`` settings: a
    changed federation default does not rerun the centralised reference."""
    import hashlib

    local = setting != "federated"
    flat = {k: v for k, v in to_flat(cfg).items()
            if k != "sites" and k not in NOT_TRAINING and not (local and k.startswith("federation."))}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_done(row: dict, rows: list[dict]) -> bool:
    return any(_row_key(r) == _row_key(row) and r.get("config", row["config"]) == row["config"] for r in rows)


def _read_rows(path: Path, ov: dict) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("overrides") == json.loads(json.dumps(ov)) and r.get("mode") == "fed-variants" \
                    and "error" not in r:
                rows.append(r)
    return rows


def main_fed_variants(a: argparse.Namespace, argv: list[str] | None) -> int:
    """The --fed-variants mode (see the module docstring)."""
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ov = model_overrides(a)
    results_path = out / "results.jsonl"
    done = _read_rows(results_path, ov)
    planned: list[dict] = []  # what this invocation's tables show: the rows of these runs, this config
    genomic, histo = {}, {}
    for task in a.tasks:
        base = with_overrides(load_config(cohort(a, task)), ov)
        genomic[task] = [s.name for s in base.sites if s.omics]
        histo[task] = [s.name for s in base.sites if not s.omics]
        for seed in a.seeds:
            seeded = with_overrides(base, {"train.seed": seed})
            for setting, variant, vov, cfg in fed_variant_runs(a, seeded):
                row = {"mode": "fed-variants", "task": task, "seed": seed, "setting": setting, "model": "momkd",
                       "variant": variant, "variant_overrides": vov, "overrides": ov,
                       "config": config_fingerprint(cfg, setting)}
                planned.append(dict(row))
                if _is_done(row, done) or a.report_only:
                    continue
                run_dir = out / "runs" / task / f"seed{seed}" / f"{setting}-{variant}"
                claim = run_dir.parent / f".claim-{setting}-{variant}"
                if not _claim(claim):
                    log.info("%s seed %d %s %s: another process is on it", task, seed, setting, variant)
                    continue
                if _is_done(row, _read_rows(results_path, ov)):  # done meanwhile by another process
                    claim.unlink(missing_ok=True)
                    continue
                t0 = time.perf_counter()
                try:
                    shutil.rmtree(run_dir, ignore_errors=True)
                    run = {"pooled": run_pooled, "alone": run_alone, "federated": run_fed_variant}[setting]
                    row["result"] = run(cfg, run_dir)
                except Exception as exc:  # recorded (and retried by the next invocation), not fatal
                    if type(exc).__name__ == "_Interrupted":
                        claim.unlink(missing_ok=True)
                        raise
                    log.exception("%s seed %d %s %s failed", task, seed, setting, variant)
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row["seconds"] = time.perf_counter() - t0
                with open(results_path, "a") as f:
                    f.write(json.dumps(row, default=_json_default) + "\n")
                claim.unlink(missing_ok=True)
                log.info("%-4s seed %d %-9s %-14s %5.0f s  %s", task, seed, setting, variant, row["seconds"],
                         row.get("error") or _fed_short(row["result"], setting))
                if not a.keep_runs and "error" not in row:
                    shutil.rmtree(run_dir, ignore_errors=True)
    rows = _read_rows(results_path, ov)
    rows = [next(r for r in reversed(rows) if _is_done(want, [r])) for want in planned if _is_done(want, rows)]
    md = report_fed_variants(a, argv, rows, genomic, histo, time.perf_counter() - t_start)
    if not a.report_only:
        (out / "results_fed_variants.md").write_text(md)
    print(md)
    return 0


def _fed_short(res: dict, setting: str) -> str:
    if setting == "federated":
        p = res["personal"]["sites"]
        return (f"global memory pooled {res['global']['pooled']['memory']:.3f} (round {res['best_round']}), "
                f"personal classifier site mean {np.nanmean([v['classifier'] for v in p.values()]):.3f}")
    return f"pooled {_short(res.get('pooled', {}))}"


def _heads(r: dict, task_sites: list[str]) -> dict[str, float]:
    """The product-head figures of one results row: site means over ``task_sites`` and the pooled AUC."""
    res = r["result"]
    if r["setting"] == "federated":
        mem = res["global"]
        pers = {s: {"classifier": v} for s, v in personal_by_rule(r)[personal_rule(r)].items()}
        return {"memory_sites": _site_mean(mem, "memory", task_sites), "memory_pooled": mem["pooled"]["memory"],
                "classifier_sites": _site_mean({"sites": pers}, "classifier", task_sites),
                "classifier_pooled": math.nan}
    return {"memory_sites": _site_mean(res, "memory", task_sites) if r["setting"] == "pooled" else math.nan,
            "memory_pooled": res["pooled"].get("memory", math.nan) if r["setting"] == "pooled" else math.nan,
            "classifier_sites": _site_mean(res, "classifier", task_sites),
            "classifier_pooled": res["pooled"].get("classifier", math.nan) if r["setting"] == "pooled" else math.nan}


def personal_rule(r: dict) -> str:
    """The ``federation.personal_round`` a federated results row's config used (its variant's, or the default)."""
    return r.get("variant_overrides", {}).get("federation.personal_round", FederationConfig().personal_round)


def personal_by_rule(r: dict) -> dict[str, dict[str, float]]:
    """Site -> personal classifier test AUC of a federated results row, for each round rule: "last",
    "best_validation" (the site's best own validation round) and "federation_best" (the round of ``best_model.pt``).
    The row's own rule reads its ``personal_model.pt`` as reported; rows written before ``personal_round`` existed
    kept the site's best own validation round as "sites"."""
    p = r["result"]["personal"]
    files = {s: v["classifier"] for s, v in p["sites"].items()}
    out = {"last": p["at_last_round"], "federation_best": p["at_best_round"],
           "best_validation": p.get("at_own_best_val", files)}
    if "at_own_best_val" in p:  # the file, as the sites reported it
        out[personal_rule(r)] = files
    return out


def round_rule_table(task: str, by: dict, variants: list[str], allsites: list[str], histo: list[str]) -> list[str]:
    """Markdown rows: each variant's models read at another round of the same runs. The global memory head at the
    federation's best round (``best_model.pt``) and at the last (``global_model.pt``), against the centralised
    memory head; the personal classifiers under each ``federation.personal_round`` rule, against the centralised
    classifier and (histology-only sites) against MoMKD trained alone there. Site means, all sites."""
    cen, alone = by.get("centralised", {}), by.get("alone", {})
    lines = [f"{task.upper()}, the same runs read at another round: Δ vs centralised (site mean, all sites; "
             "personal classifiers: / histology-only gain over MoMKD alone), mean±std over seeds.", "",
             "| variant | head | last round | own best validation round | federation's best round | seeds |",
             "|---|---|---|---|---|---|"]
    for name in variants:
        runs = {s: r for s, r in by.get(name, {}).items() if s in cen and s in alone}
        if not runs:
            continue
        mem = {k: [_site_mean(r["result"][k], "memory", allsites) - _site_mean(cen[s]["result"], "memory", allsites)
                   for s, r in runs.items()] for k in ("global_last_round", "global")}
        lines.append(f"| {name} | global memory head | {_fmt_d(mem['global_last_round'])} | | "
                     f"{_fmt_d(mem['global'])} | {len(runs)} |")
        cells = []
        for rule in ("last", "best_validation", "federation_best"):
            d, g = [], []
            for s, r in runs.items():
                pers = {"sites": {k: {"classifier": v} for k, v in personal_by_rule(r)[rule].items()}}
                d.append(_site_mean(pers, "classifier", allsites)
                         - _site_mean(cen[s]["result"], "classifier", allsites))
                g.append(_site_mean(pers, "classifier", histo) - _site_mean(alone[s]["result"], "classifier", histo))
            cells.append(f"{_fmt_d(d)} / {_fmt_d(g)}")
        lines.append(f"| {name} | personal classifiers | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines + [""]


def fed_variant_tables(rows: list[dict], genomic: dict[str, list[str]], histo: dict[str, list[str]],
                       variants: list[str]) -> str:
    """Markdown: per task, the product heads of every variant and of centralised MoMKD (mean ± std over seeds),
    the per-seed differences to centralised, and a per-seed table."""
    lines: list[str] = []
    for task in [t for t in TASKS if any(r["task"] == t for r in rows)]:
        allsites = genomic[task] + histo[task]
        by = {}
        for r in rows:
            if r["task"] == task:
                by.setdefault(r["variant"], {})[r["seed"]] = r
        cen = by.get("centralised", {})
        alone = by.get("alone", {})

        def fig(r, which, sites):
            return _heads(r, sites)[which]

        lines += [f"#### {task.upper()} (test AUC, mean±std over seeds; genomic sites: {', '.join(genomic[task])}; "
                  f"histology-only: {', '.join(histo[task])})", "",
                  "Global model's memory head (federated: `best_model.pt`) vs the centralised model's memory head; "
                  "the sites' personal classifiers (federated, `personal_model.pt`: the round "
                  "`federation.personal_round` keeps) "
                  "vs the centralised model's classifier. \"Δ vs centralised\": per-seed difference (same seed and "
                  "splits), mean±std; \"gain\": histology-only sites' personal classifier minus MoMKD trained there "
                  "alone.", "",
                  "| variant | head | site mean, all | genomic sites | histology-only sites | all test slides pooled "
                  "| Δ vs centralised (site mean) | Δ vs centralised (pooled) | histology-only gain | rounds | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in ["centralised"] + variants:
            runs = by.get(name, {})
            if not runs:
                continue
            seeds = sorted(runs)
            for head in ("memory", "classifier"):
                vals = {w: [fig(runs[s], f"{head}_sites", sites) for s in seeds]
                        for w, sites in (("all", allsites), ("gen", genomic[task]), ("his", histo[task]))}
                pooled = [fig(runs[s], f"{head}_pooled", allsites) for s in seeds]
                d_sites = [fig(runs[s], f"{head}_sites", allsites) - fig(cen[s], f"{head}_sites", allsites)
                           for s in seeds if s in cen] if name != "centralised" else []
                d_pooled = [fig(runs[s], f"{head}_pooled", allsites) - fig(cen[s], f"{head}_pooled", allsites)
                            for s in seeds if s in cen] if name != "centralised" else []
                gain = [fig(runs[s], "classifier_sites", histo[task]) - fig(alone[s], "classifier_sites", histo[task])
                        for s in seeds if s in alone] if head == "classifier" and name != "centralised" else []
                label = {"memory": "global memory head" if name != "centralised" else "memory head",
                         "classifier": "personal classifiers" if name != "centralised" else "classifier"}[head]
                rounds = ""
                if name != "centralised":
                    rounds = _rounds([runs[s]["result"]["best_round"] for s in seeds], "") if head == "memory" else \
                        ", ".join(sorted({personal_rule(runs[s]) for s in seeds}))
                else:
                    rounds = "epochs " + _rounds([runs[s]["result"].get("best_epoch") for s in seeds], "")
                lines.append(f"| {name} | {label} | {_fmt(vals['all'])} | {_fmt(vals['gen'])} | {_fmt(vals['his'])} "
                             f"| {_fmt(pooled)} | {_fmt_d(d_sites)} | {_fmt_d(d_pooled)} | {_fmt_d(gain)} | {rounds} "
                             f"| {len(seeds)} |")
        if alone:
            seeds = sorted(alone)
            lines.append(f"| alone (histology-only sites) | classifier | | | "
                         f"{_fmt([fig(alone[s], 'classifier_sites', histo[task]) for s in seeds])} | | | | | | "
                         f"{len(seeds)} |")
        lines += ["", f"Per seed ({task.upper()}; memory head: all test slides pooled / site mean; classifier: "
                      "site mean, all sites / histology-only sites):", "",
                  "| variant | seed | memory head | classifier | best round |", "|---|---|---|---|---|"]
        for name in ["centralised"] + variants:
            for s in sorted(by.get(name, {})):
                r = by[name][s]
                h_all, h_his = _heads(r, allsites), _heads(r, histo[task])
                br = r["result"].get("best_round") if name != "centralised" else \
                    f"epoch {r['result'].get('best_epoch')}"
                lines.append(f"| {name} | {s} | {h_all['memory_pooled']:.3f} / {h_all['memory_sites']:.3f} | "
                             f"{h_all['classifier_sites']:.3f} / {h_his['classifier_sites']:.3f} | {br} |")
        lines.append("")
        lines += round_rule_table(task, by, variants, allsites, histo[task])
    return "\n".join(lines)


def _fmt_d(vals: list[float]) -> str:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return ""
    return f"{np.mean(v):+.3f}" + (f"±{np.std(v, ddof=1):.3f}" if len(v) > 1 else "")


def report_fed_variants(a, argv, rows, genomic, histo, seconds) -> str:
    cmd = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run_minutes = sum(r.get("seconds", 0.0) for r in rows) / 60
    defs = {n: a.variants[n] for n in a.fed_variants}
    head = [f"Run {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs visible, torch "
            f"{torch.__version__}; {len(rows)} trainings, {run_minutes:.1f} min of run time in all (this invocation: "
            f"{seconds / 60:.1f} min wall).", "", f"Command: `{cmd}`", "",
            "Variants (config overrides on the defaults): `" + json.dumps(defs) + "`", "",
            "Config overrides of every run: `" + json.dumps(model_overrides(a)) + "`", ""]
    return "\n".join(head) + "\n" + fed_variant_tables(rows, genomic, histo, a.fed_variants)


# --------------------------------------------------------------------------------------------------------------
# tables


def _fmt(vals: list[float]) -> str:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{np.mean(v):.3f}±{np.std(v, ddof=1):.3f}"


def _site_mean(result: dict, head: str, sites: list[str]) -> float:
    vals = [result["sites"].get(s, {}).get(head) for s in sites]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _rounds(rounds: list, what: str = "rounds") -> str:
    return (f"{what} " if what else "") + ", ".join("?" if r is None else str(r) for r in rounds)


def tables(rows: list[dict], genomic: dict[str, list[str]], histo: dict[str, list[str]]) -> str:
    """Markdown: per task, one line per (setting, model, variant, head): mean±std over seeds."""
    lines = []
    keyset = []
    for r in rows:
        k = (r["setting"], r["model"], r["variant"])
        if k not in keyset:
            keyset.append(k)
    order = {"pooled": 0, "local": 1, "federated": 2}
    keyset.sort(key=lambda k: (k[2] != "main", order[k[0]], k[1], k[2]))
    for task in sorted({r["task"] for r in rows}, key=TASKS.index):
        lines += [f"#### {task.upper()} (test AUC, mean±std over seeds; sites with genomics: "
                  f"{', '.join(genomic[task])}; histology-only: {', '.join(histo[task])})", "",
                  "| setting | model | variant | head | per-site mean, genomic sites | per-site mean, histology-only "
                  "sites | all test slides pooled | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in keyset:
            rs = [r for r in rows if r["task"] == task and (r["setting"], r["model"], r["variant"]) == k
                  and "result" in r]
            if not rs:
                continue
            heads = ["classifier"] + (["memory"] if k[1] == "momkd" else [])
            variants = [(k[2], [r["result"] for r in rs])]
            if all(r["result"].get("best_epoch") for r in rs):  # pooled: the epoch kept by validation
                variants[0] = (f"{k[2]}, best epoch ({_rounds([r['result']['best_epoch'] for r in rs], 'epochs')} "
                               f"of {_rounds([r['result'].get('epochs_run') for r in rs], '')})", variants[0][1])
            if all("last_round" in r["result"] for r in rs):  # federated: the best round's model, then the last's
                variants[0] = (f"{k[2]}, best round ({_rounds([r['result'].get('best_round') for r in rs])})",
                               variants[0][1])
                variants.append((f"{k[2]}, last round", [r["result"]["last_round"] for r in rs]))
            for variant, results in variants:
                for h in heads:
                    g = _fmt([_site_mean(res, h, genomic[task]) for res in results])
                    ho = _fmt([_site_mean(res, h, histo[task]) for res in results])
                    po = _fmt([res["pooled"].get(h, math.nan) for res in results])
                    lines.append(f"| {k[0]} | {k[1]} | {variant} | {h} | {g} | {ho} | {po} | {len(results)} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------


def quiet_process(threads: int) -> None:
    """A benchmark process: its own progress lines only (the project's loggers at WARNING), Flower's telemetry
    and update check off, ``threads`` torch CPU threads."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("momkd_fed", "server", "client", "flwr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    quiet_process(a.threads)
    if a.fed_variants is not None:
        return main_fed_variants(a, argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ov = model_overrides(a)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():  # resume: skip runs already recorded with the same settings
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            same = r.get("overrides") == json.loads(json.dumps(ov))
            if same and r.get("histology_only", False) == a.histology_only:
                done[(r["task"], r["seed"], r["setting"], r["model"], r["variant"])] = r
    rows = list(done.values())
    ov_tag = hashlib.sha1(json.dumps([ov, a.histology_only], sort_keys=True, default=str).encode()).hexdigest()[:8]
    genomic, histo = {}, {}
    for task in a.tasks:
        base = with_overrides(load_config(cohort(a, task)), ov)
        if a.histology_only:
            base = histology_only(base)
        genomic[task] = [s.name for s in base.sites if s.omics]
        histo[task] = [s.name for s in base.sites if not s.omics]
        for seed in a.seeds:
            seeded = with_overrides(base, {"train.seed": seed})
            for setting, model, variant, cfg in plan(a, seeded, seed):
                key = (task, seed, setting, model, variant)
                if key in done:
                    continue
                # the overrides' hash keeps apart runs of other --set / --histology-only invocations sharing --out
                run_dir = out / "runs" / task / f"seed{seed}" / f"{setting}-{model}-{variant}-{ov_tag}"
                t0 = time.perf_counter()
                row = {"task": task, "seed": seed, "setting": setting, "model": model, "variant": variant,
                       "overrides": ov, **({"histology_only": True} if a.histology_only else {})}
                try:
                    row["result"] = execute(setting, cfg, run_dir)
                except Exception as exc:  # one failed run is recorded, not fatal to the benchmark
                    if type(exc).__name__ == "_Interrupted":  # SIGTERM during a simulation: stop here
                        raise
                    log.exception("%s failed", key)
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row["seconds"] = time.perf_counter() - t0
                with open(results_path, "a") as f:
                    f.write(json.dumps(row, default=_json_default) + "\n")
                rows.append(json.loads(json.dumps(row, default=_json_default)))
                res = row.get("result", {})
                log.info("%-4s seed %d %-9s %-5s %-13s %5.0f s  pooled %s  sites %s", task, seed, setting, model,
                         variant, row["seconds"], _short(res.get("pooled", {})),
                         {s: _short(v) for s, v in res.get("sites", {}).items()} if res else row.get("error"))
                if not a.keep_runs and "error" not in row:  # failed runs keep their folder (logs)
                    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    rows = [r for r in rows if r["task"] in a.tasks and r["seed"] in a.seeds]
    md = report(a, argv, rows, genomic, histo, seconds)
    (out / "results.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, default=_json_default,
                                                 indent=1))
    print(md)
    return 0


def _short(d: dict) -> str:
    return "/".join(f"{d[h]:.2f}" for h in ("classifier", "memory") if h in d and d[h] is not None
                    and math.isfinite(d[h]))


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def report(a, argv, rows, genomic, histo, seconds) -> str:
    cmd = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    settings = {k: getattr(a, k) for k in ("tasks", "seeds", "extra_seeds", "data_seed", "parts", "models",
                                            "histology_only", "set", "cohort_set", "max_slides_per_site",
                                            "median_patches", "max_patches", "epochs", "patience", "rounds",
                                            "local_epochs", "lr",
                                            "precision", "threads", "model_config")}
    run_minutes = sum(r.get("seconds", 0.0) for r in rows) / 60
    head = [f"Run {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} CPUs visible, "
            f"torch {torch.__version__}; {len(rows)} trainings, {run_minutes:.1f} min of run time in all (this "
            f"invocation: {seconds / 60:.1f} min wall).", "", f"Command: `{cmd}`", "",
            "Settings: `" + json.dumps(settings) + "`", "",
            "Config overrides: `" + json.dumps(model_overrides(a)) + "`", ""]
    errs = [r for r in rows if "error" in r]
    if errs:
        head += ["Failed runs: " + "; ".join(f"{r['task']}/{r['seed']}/{r['setting']}/{r['model']}/"
                                             f"{r['variant']}: {r['error']}" for r in errs), ""]
    return "\n".join(head) + "\n" + tables(rows, genomic, histo)


if __name__ == "__main__":
    raise SystemExit(main())
