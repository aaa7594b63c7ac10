"""Benchmark: the authors' reference MoMKD trained beside ours on the same cohort, splits and slide order.

Data: one task of the ``tcga-brca`` synthetic federation (REAL TCGA-BRCA genomics, labels and regions; SYNTHETIC
histology; ``--medium`` bag sizes of accuracy.py), the genomic (paired) sites only, pooled: the reference cannot
train without genomics. Splits are the preset's patient-level splits; genomics are z-scored with the training
cases' statistics and clipped (our pipeline, ``training.normalise_sites``) and both models get the same tensors.

Per seed:

- ``reference``: the authors' ``MKD`` (``../shared/reference/momkd``, imported, never copied; its own
  initialisation: kaiming-uniform codebooks, no k-means) trained by the authors' own ``mkd_train_loop`` (its loss
  composition, with our config's weights and margin as its ``hparams``, gradient clipping at 16) with AdamW
  (lr 2e-4, weight decay 1e-4), one slide per step in a class-balanced order, early stopping on the validation
  AUC of the authors' ``mkd_validate_loop`` (histology-only ``forward_inference``), best epoch restored; test AUC
  by ``mkd_validate_loop``;
- ``ours``: our MoMKD with the same config, trained by ``engine.fit`` (our initialisation: torch_geometric's
  layer init, the memory by spherical k-means on the initial network's patch projections), the same
  class-balanced slide order (the same generator draws), the same early-stopping rule; test AUC of the
  classifier head by ``engine.evaluate`` (histology-only);
- ``ours_refinit`` (diagnostic, ``--models``): ours started from the reference run's initial weights (the
  mapping of tests/reference_momkd.py; no k-means), so that only the implementation and the dropout streams
  differ; ``ours_refinit_ulp`` (diagnostic): the same, every initial weight one float32 step (ulp) up, to show how
  far a rounding-sized difference alone carries a training run (with ``--no-dropout`` the two implementations
  differ by rounding only: tests/test_reference_parity.py).

Dims: ``configs/cpu_small.yaml`` (hidden 128, shared 32, K = 8) except the genomic MLP's hidden width, 512,
which the reference fixes. ``--set KEY=VALUE`` changes our config (e.g. ``loss.commit_slot=moving``); rows are
kept apart by their overrides, and a rerun skips what ``<out>/results.jsonl`` already holds.

Usage::

    python benchmarks/reference_parity.py --task odx --seeds 1,2,3 --out runs/reference_parity
    python benchmarks/reference_parity.py --models reference,ours_refinit --no-dropout --out runs/reference_parity
    python benchmarks/reference_parity.py --models ours --set loss.commit_slot=moving --out runs/reference_parity
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference loops draw tqdm bars

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import reference_momkd as R  # noqa: E402  (tests/reference_momkd.py: locating and importing the reference)
from momkd_fed.config import Config, from_flat, load_config, to_flat  # noqa: E402
from momkd_fed.data.site import load_site  # noqa: E402
from momkd_fed.device import seed_everything  # noqa: E402
from momkd_fed.engine import evaluate, fit, init_memory_from_bags, sample_order  # noqa: E402
from momkd_fed.model import build_model  # noqa: E402
from momkd_fed.training import normalise_sites  # noqa: E402

log = logging.getLogger("reference_parity")
MODELS = ("reference", "ours", "ours_refinit", "ours_refinit_ulp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="odx", choices=("her2", "pr", "odx"))
    p.add_argument("--seeds", default="1,2,3", help="training seeds (comma list)")
    p.add_argument("--models", default="reference,ours", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--data-seed", type=int, default=0, help="cohort seed (histology and splits)")
    p.add_argument("--median-patches", type=int, default=100, help="synthetic median bag size (--medium)")
    p.add_argument("--max-patches", type=int, default=300, help="synthetic largest bag (--medium)")
    p.add_argument("--max-slides-per-site", type=int, default=0, help="cohort size cap per site (0 = all)")
    p.add_argument("--cohort", default=None, help="an existing federation.yaml of that cohort (else generated)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-config", default=str(ROOT / "configs" / "cpu_small.yaml"))
    p.add_argument("--no-dropout", action="store_true",
                   help="dropout off in both models (ours: model.dropout/attn_dropout/omics_dropout = 0; the "
                        "reference: every dropout p = 0); with ours_refinit the two runs then share every random draw")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of our config")
    p.add_argument("--out", default="runs/reference_parity")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        p.error(f"unknown model {bad}")
    return a


def overrides(a: argparse.Namespace) -> dict:
    """Flat config overrides of every run (model dims; the genomic hidden width the reference fixes)."""
    ov: dict = {}
    for section, values in (yaml.safe_load(Path(a.model_config).read_text()) or {}).items():
        for k, v in (values or {}).items():
            ov[f"{section}.{k}"] = v
    ov.update({"model.omics_hidden": 512, "train.epochs": a.epochs, "train.patience": a.patience,
               "train.precision": "fp32", "train.threads": a.threads, "train.device": "cpu", "train.progress": False})
    if a.no_dropout:  # in the reference's key too: both models run without dropout
        ov.update({"model.dropout": 0.0, "model.attn_dropout": 0.0, "model.omics_dropout": 0.0})
    for item in a.set:
        key, _, value = item.partition("=")
        ov[key.strip()] = yaml.safe_load(value)
    return ov


def with_overrides(cfg: Config, ov: dict) -> Config:
    flat = to_flat(cfg)
    flat.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in ov.items()})
    return from_flat(flat)


def cohort(a: argparse.Namespace) -> Path:
    if a.cohort:
        return Path(a.cohort)
    from momkd_fed.synth import synthesize

    out = Path(a.out) / "data" / f"{a.task}-seed{a.data_seed}-m{a.median_patches}-x{a.max_patches}-s{a.max_slides_per_site}"
    if not (out / "federation.yaml").is_file():
        synthesize("tcga-brca", out, seed=a.data_seed, task=a.task, max_slides_per_site=a.max_slides_per_site,
                   median_patches=a.median_patches, max_patches=a.max_patches)
    return out / "federation.yaml"


def paired_splits(cfg: Config) -> tuple[dict[str, list], int, list[str]]:
    """Train/val/test bags of the genomic sites, genomics normalised as our training does; (splits, G, sites)."""
    sites = [sc for sc in cfg.sites if sc.omics]
    datas = [load_site(sc, cfg) for sc in sites]
    normalise_sites(datas, sites, cfg)
    split = {name: [b for d in datas for b in d.split(name) if b.omics is not None] for name in ("train", "val", "test")}
    dropped = sum(b.omics is None for d in datas for b in d.bags)
    if dropped:
        log.info("left out %d slides without genomics at the genomic sites", dropped)
    n_genes = int(split["train"][0].omics.shape[0])
    return split, n_genes, [sc.name for sc in sites]


# --------------------------------------------------------------------------------------------------------------
# the reference, trained by its own loops


def as_loader(bags: list, order: list[int] | None = None) -> list[tuple]:
    """The reference loader's items: ((features (P, D), edge_index (2, E)), omics (1, G), label (1,), slide id)."""
    idx = range(len(bags)) if order is None else order
    return [((bags[i].features, bags[i].edge_index), bags[i].omics.unsqueeze(0), torch.tensor([bags[i].label]),
             bags[i].slide_id) for i in idx]


def train_reference(cfg: Config, split: dict, n_genes: int, seed: int) -> tuple[dict, torch.nn.Module]:
    _, tu = R.load_reference()
    seed_everything(seed)
    ref = R.reference_model(cfg.model, cfg.memory, cfg.data.feature_dim, n_genes)
    if cfg.model.dropout == cfg.model.attn_dropout == cfg.model.omics_dropout == 0.0:  # --no-dropout
        R.disable_dropout(ref)
    init_state = copy.deepcopy(ref.state_dict())
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    hp = R.hparams(cfg.loss, cfg.train.grad_clip)
    gen = torch.Generator().manual_seed(seed)  # the draws engine.fit makes for our model's slide order
    val_loader, history = as_loader(split["val"]), []
    best, best_epoch, best_state, since = -math.inf, 0, None, 0
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        order = sample_order(split["train"], cfg.train.balanced_sampling, gen)
        with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch "[Diag]" print
            train = tu.mkd_train_loop(epoch, ref, as_loader(split["train"], order), opt, hp, "cpu")
        val = tu.mkd_validate_loop(ref, val_loader, "cpu")
        history.append({"epoch": epoch, "val_auc": val["auc"], "train_loss_task": train["loss_task"],
                        "train_mem_loss": train["mem_loss"], "seconds": time.perf_counter() - t0})
        log.info("reference seed %d epoch %d: val AUC %.3f (%.0f s)", seed, epoch, val["auc"], history[-1]["seconds"])
        if val["auc"] > best:
            best, best_epoch, best_state, since = val["auc"], epoch, copy.deepcopy(ref.state_dict()), 0
        else:
            since += 1
        if cfg.train.patience > 0 and since >= cfg.train.patience:
            break
    ref.load_state_dict(best_state)
    test = tu.mkd_validate_loop(ref, as_loader(split["test"]), "cpu")
    ref.load_state_dict(init_state)  # hand back the initial weights (for ours_refinit)
    return {"test_auc": float(test["auc"]), "best_epoch": best_epoch, "epochs_run": len(history),
            "best_val_auc": float(best), "history": history}, ref


# --------------------------------------------------------------------------------------------------------------
# ours, trained by the engine


def train_ours(cfg: Config, split: dict, n_genes: int, seed: int, init_from: torch.nn.Module | None,
               ulp: bool = False) -> dict:
    cfg = with_overrides(cfg, {"train.seed": seed})
    seed_everything(seed)
    model = build_model(cfg, cfg.data.feature_dim, n_genes)
    if init_from is None:
        init_memory_from_bags(model, split["train"], cfg)
    else:
        R.copy_from_reference(model, init_from)
    if ulp:  # every initial weight one float32 step up: a change of the size of a rounding difference
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    result = fit(model, split["train"], split["val"], cfg, device=torch.device("cpu"),
                 log_fn=lambda row: log.info("ours seed %d epoch %d: val AUC %.3f (%.0f s)", seed, row["epoch"],
                                             row.get("val_auc", math.nan), row["seconds"]))
    pred = evaluate(model, split["test"], torch.device("cpu"), cfg.train.precision)
    m = pred.metrics()
    slots = model.memory.slots.detach()
    return {"test_auc": float(m["classifier"]["auc"]), "test_auc_memory_head": float(m["memory"]["auc"]),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "best_val_auc": result.best_score,
            "slot_norms": [float(slots.norm(dim=-1).min()), float(slots.norm(dim=-1).max())],
            "history": result.history}


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("momkd_fed").setLevel(logging.WARNING)
    reason = R.missing_reason()
    if reason:
        print(f"reference_parity: {reason}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ov = overrides(a)
    cfg = with_overrides(load_config(cohort(a)), ov)
    split, n_genes, sites = paired_splits(cfg)
    for bags in split.values():
        for b in bags:
            b.edge_index = R.edge_index(b.neighbors)  # (2, E) for the reference's GATv2Conv
    counts = {k: [len(v), sum(b.label for b in v)] for k, v in split.items()}
    log.info("paired sites %s: slides (positives) %s, %d genes", sites, counts, n_genes)

    results_path = out / "results.jsonl"
    ov_key = json.loads(json.dumps(ov))
    ref_ov_key = json.loads(json.dumps({k: v for k, v in ov.items() if k not in {i.partition("=")[0] for i in a.set}}))
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["seed"], r["model"], json.dumps(r["overrides"], sort_keys=True))] = r
    rows = []
    for seed in a.seeds:
        ref_init = None
        for model in a.models:
            key_ov = ref_ov_key if model == "reference" else ov_key  # --set changes ours only
            key = (a.task, seed, model, json.dumps(key_ov, sort_keys=True))
            if key in done:
                rows.append(done[key])
                continue
            t0 = time.perf_counter()
            if model == "reference":
                res, ref_init = train_reference(cfg, split, n_genes, seed)
            elif model == "ours":
                res = train_ours(cfg, split, n_genes, seed, None)
            else:
                if ref_init is None:
                    seed_everything(seed)
                    ref_init = R.reference_model(cfg.model, cfg.memory, cfg.data.feature_dim, n_genes)
                res = train_ours(cfg, split, n_genes, seed, ref_init, ulp=model == "ours_refinit_ulp")
            row = {"task": a.task, "seed": seed, "model": model, "overrides": key_ov, "sites": sites,
                   "slides": counts, "seconds": time.perf_counter() - t0, "result": res}
            if key not in done:
                with open(results_path, "a") as f:
                    f.write(json.dumps(row, default=float) + "\n")
            rows.append(json.loads(json.dumps(row, default=float)))
            log.info("seed %d %-12s test AUC %.3f (best epoch %s of %s, %.0f s)", seed, model, res["test_auc"],
                     res["best_epoch"], res["epochs_run"], row["seconds"])
    md = report(a, argv, rows, counts, sites)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def report(a, argv, rows, counts, sites) -> str:
    cmd = "python benchmarks/reference_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    by = {(r["seed"], r["model"]): r["result"] for r in rows}
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    lines = [f"Run {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {cpu}, torch {torch.__version__}; task "
             f"{a.task}, paired sites {', '.join(sites)}; slides (positives) {counts}.", "",
             f"Command: `{cmd}`", "", "Our overrides: `" + json.dumps(overrides(a)) + "`", "",
             "| seed | " + " | ".join(f"{m} test AUC (best epoch / run)" for m in models)
             + " | " + " | ".join(f"{m} - reference" for m in models if m != "reference") + " |",
             "|---|" + "---|" * (2 * len(models) - 1)]
    diffs: dict[str, list[float]] = {m: [] for m in models}
    for seed in a.seeds:
        cells, deltas = [], []
        for m in models:
            r = by.get((seed, m))
            cells.append("n/a" if r is None else f"{r['test_auc']:.3f} ({r['best_epoch']} / {r['epochs_run']})")
        ref = by.get((seed, "reference"))
        for m in models:
            if m == "reference":
                continue
            r = by.get((seed, m))
            if r is None or ref is None:
                deltas.append("n/a")
                continue
            d = r["test_auc"] - ref["test_auc"]
            diffs[m].append(d)
            deltas.append(f"{d:+.3f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + (" | " + " | ".join(deltas) if deltas else "") + " |")
    means = []
    for m in models:
        vals = [by[(s, m)]["test_auc"] for s in a.seeds if (s, m) in by]
        if vals:
            spread = f"±{np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
            means.append(f"{m} {np.mean(vals):.3f}{spread}")
    lines += ["", "Mean test AUC over seeds: " + ", ".join(means) + "."]
    for m, d in diffs.items():
        if d:
            lines.append(f"Mean difference {m} - reference: {np.mean(d):+.3f} over {len(d)} seeds.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
