"""Benchmark: how good can a site's own classifier head be, on the best encoders there are? (issue 14)

A federation's personal model is the global encoders and memory plus a classifier head that the site trains on
its own slides only. Part of its distance to the centralised model's classifier (trained on every site's slides)
may be the federation's encoders, part may be the head's data: one site's 20-200 training slides. This separates
the two: the CENTRALISED model's encoders, memory and temperature, frozen, with a fresh classifier head (same
architecture) trained at each site on that site's training slides alone, then scored on that site's test slides,
against the centralised model's own classifier on the same slides.

Head training, per site: the slide vectors v (the attention-pooled histology features the frozen model's
classifier receives; eval mode, histology only) are computed once; a fresh head (LayerNorm, Linear, ReLU, Dropout,
Linear; train.* lr, weight decay, class-balanced order, one slide per step) is trained for ``train.epochs``
epochs with early stopping on the site's validation AUC (``train.patience``; the last epoch where validation
holds one class), seeded by the training seed. Cohort and model settings: accuracy.py's ``--medium`` (the same cohort folder under ``--out``).

Usage::

    python benchmarks/personal_head_bound.py --tasks odx --seeds 0,1,2 --out runs/fedgap

Results: ``<out>/personal_head_bound.jsonl`` (one row per task and seed; a rerun skips what it holds) and a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import accuracy as A  # noqa: E402  (benchmarks/accuracy.py: cohort, --medium settings, quiet_process)
from momkd_fed.config import Config  # noqa: E402
from momkd_fed.metrics import roc_auc  # noqa: E402

log = logging.getLogger("personal_head_bound")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="odx", help="comma list of her2, pr, odx")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (comma list)")
    p.add_argument("--out", default="runs/fedgap", help="accuracy.py's --out (its cohort folder is reused)")
    a = p.parse_args(argv)
    return A.parse_args(["--medium", "--tasks", a.tasks, "--seeds", a.seeds, "--out", a.out])


@torch.no_grad()
def slide_vectors(model: nn.Module, bags: list) -> torch.Tensor:
    """(N, D) what the frozen model's classifier receives for each slide (eval mode, histology only)."""
    model.eval()
    seen: list[torch.Tensor] = []
    hook = model.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0].squeeze(0)))
    try:
        for b in bags:
            model(b.features, b.neighbors)
    finally:
        hook.remove()
    return torch.stack(seen) if seen else torch.zeros(0)


def train_head(template: nn.Sequential, v: dict[str, torch.Tensor], y: dict[str, torch.Tensor], cfg: Config,
               seed: int) -> tuple[nn.Sequential, int]:
    """A fresh head of ``template``'s architecture on (v, y)["train"], early stopping on validation AUC."""
    from momkd_fed.engine import sample_order

    torch.manual_seed(seed)
    head = copy.deepcopy(template)
    for m in head.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    labels = [SimpleNamespace(label=int(t)) for t in y["train"]]  # what sample_order reads of a bag
    best, best_state, best_epoch, since = -math.inf, copy.deepcopy(head.state_dict()), 0, 0
    for epoch in range(1, cfg.train.epochs + 1):
        head.train()
        for i in sample_order(labels, cfg.train.balanced_sampling, gen):
            loss = F.cross_entropy(head(v["train"][i:i + 1]), y["train"][i:i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            auc = roc_auc(y["val"].numpy(), torch.softmax(head(v["val"]), -1)[:, 1].numpy())
        if not math.isfinite(auc):  # one-class validation: keep the latest epoch
            best_state, best_epoch = copy.deepcopy(head.state_dict()), epoch
            continue
        if auc > best:
            best, best_state, best_epoch, since = auc, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            since += 1
            if cfg.train.patience > 0 and since >= cfg.train.patience:
                break
    head.load_state_dict(best_state)
    return head.eval(), best_epoch


def run(a: argparse.Namespace, task: str, seed: int) -> dict:
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.training import run_training

    base = A.with_overrides(A.load_config(A.cohort(a, task)), {**A.model_overrides(a), "train.seed": seed,
                                                             "model.name": "momkd"})
    out = Path(a.out).resolve() / "personal_head_bound" / task / f"seed{seed}"
    if not (out / "metrics.json").is_file():
        run_training(base, out, pooled=True)
    model, _, _ = load_model(out / "model.pt")
    res: dict = {"task": task, "seed": seed, "sites": {}}
    for sc in base.sites:
        data = load_site(sc, base)
        split = {s: data.split(s) for s in ("train", "val", "test")}
        v = {s: slide_vectors(model, bags) for s, bags in split.items()}
        y = {s: torch.tensor([b.label for b in bags]) for s, bags in split.items()}
        with torch.no_grad():
            central = torch.softmax(model.classifier(v["test"]), -1)[:, 1].numpy()
        head, epoch = train_head(model.classifier, v, y, base, seed)
        with torch.no_grad():
            own = torch.softmax(head(v["test"]), -1)[:, 1].numpy()
        yt = y["test"].numpy()
        res["sites"][sc.name] = {"paired": bool(sc.omics), "n_train": len(split["train"]), "n_test": len(yt),
                                 "centralised_classifier": roc_auc(yt, central), "site_head": roc_auc(yt, own),
                                 "best_epoch": epoch}
        log.info("%s seed %d %-10s centralised classifier %.3f, own head on the centralised encoders %.3f (%d train)",
                 task, seed, sc.name, res["sites"][sc.name]["centralised_classifier"],
                 res["sites"][sc.name]["site_head"], len(split["train"]))
    return res


def report(rows: list[dict]) -> str:
    lines = ["| task | seed | centralised classifier, site mean | own head on centralised encoders, site mean | "
             "difference | per site (centralised / own head) |", "|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        diffs = []
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: r["seed"]):
            c = np.nanmean([s["centralised_classifier"] for s in r["sites"].values()])
            o = np.nanmean([s["site_head"] for s in r["sites"].values()])
            diffs.append(o - c)
            per = ", ".join(f"{n} {s['centralised_classifier']:.2f}/{s['site_head']:.2f}"
                            for n, s in r["sites"].items())
            lines.append(f"| {task} | {r['seed']} | {c:.3f} | {o:.3f} | {o - c:+.3f} | {per} |")
        if len(diffs) > 1:
            lines.append(f"| {task} | mean | | | {np.mean(diffs):+.3f}±{np.std(diffs, ddof=1):.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    A.quiet_process(a.threads)
    path = Path(a.out).resolve() / "personal_head_bound.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for task in a.tasks:
        for seed in a.seeds:
            if any(r["task"] == task and r["seed"] == seed for r in rows):
                continue
            r = run(a, task, seed)
            rows.append(r)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(report([r for r in rows if r["task"] in a.tasks and r["seed"] in a.seeds]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
