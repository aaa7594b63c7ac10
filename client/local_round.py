"""What a site does in one message, on plain tensors (the ClientApp handlers only unpack and pack).

- :func:`train_round`: global shared weights + global memory + this site's private state -> local epochs ->
  trained shared weights, memory aggregates, metrics; the new private state is saved on the site.
- :func:`evaluate_round`: histology-only test metrics of the *global* model (shared weights + global memory,
  private parts at their seeded initial values; its classifier counts only where the head is shared) and of the
  *personalised* model (the same plus this site's private head and temperature).
- :func:`kmeans_points`: the patch projections the federated k-means initialisation clusters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momkd_fed.engine import evaluate, make_optimizer, train_epoch
from momkd_fed.federation import contract, memory_merge
from momkd_fed.federation.sharing import overlay_state, paired_only_keys, partition_state
from momkd_fed.metrics import roc_auc

from .site_runtime import SiteRuntime, site_seed
from .site_state import SiteState, load_site_state, save_site_state

log = logging.getLogger(__name__)

KMEANS_POINTS_FILE = "kmeans_points.pt"  # cached in the state folder between k-means messages


@dataclass
class GlobalModel:
    """What the server sends: shared weights, global memory (or None), genomic statistics, round settings."""

    shared: dict[str, torch.Tensor]
    slots: torch.Tensor | None  # (2, K, S)
    omics_mean: np.ndarray | None  # (G,)
    omics_std: np.ndarray | None  # (G,)
    n_genes: int
    round: int


def _auc(labels: np.ndarray, scores: np.ndarray | None) -> float:
    return math.nan if scores is None or len(labels) == 0 else roc_auc(labels, scores)


def _assemble(rt: SiteRuntime, g: GlobalModel, private: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """Seeded initial model <- private state (if any) <- global shared weights <- global memory."""
    model = rt.build_model(g.n_genes)
    state = model.state_dict()
    if private:
        state = overlay_state(state, private, what="site-private state")
    state = overlay_state(state, g.shared)
    model.load_state_dict(state)
    if g.slots is not None and getattr(model, "has_memory", False):
        model.memory.set_slots(g.slots.to(rt.device))
    return model


def _stats(rt: SiteRuntime, g: GlobalModel) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Z-score statistics this site uses: the federation's, or its own in ``data.omics_stats: site`` mode."""
    if rt.cfg.data.omics_stats == "site" and rt.paired:
        from momkd_fed.data.omics import moments_to_mean_std

        return moments_to_mean_std(rt.moments())
    return g.omics_mean, g.omics_std


def train_round(rt: SiteRuntime, g: GlobalModel, state_dir: Path, lr: float, local_epochs: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Train locally for ``local_epochs`` and save the new private state.

    Returns
    -------
    shared : dict[str, Tensor]
        Trained shared weights (a histology-only site leaves out the paired-only keys).
    memory : dict[str, Tensor]
        Memory aggregates for the reply (:data:`contract.MEMORY_KEYS_BY_MODE`), under-populated slots withheld.
    metrics : dict[str, float]
        Exactly :data:`contract.TRAIN_METRIC_KEYS`.
    """
    t0 = time.perf_counter()
    cfg = rt.cfg
    saved = load_site_state(state_dir, g.round)
    model = _assemble(rt, g, saved.private if saved else None)
    optimizer = make_optimizer(model, cfg.train)
    if saved is not None and saved.optimizer:
        optimizer.load_state_dict(saved.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = lr
    mean, std = _stats(rt, g)
    train_bags = rt.normalised("train", mean, std)
    if not train_bags:
        raise ValueError(f"site {rt.name}: no training slides")
    seed = site_seed(cfg.train.seed, g.round, rt.name)
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # slide order, patch subsampling
    if getattr(model, "has_memory", False):
        model.memory.reset_aggregates()
    sums: dict[str, float] = {}
    slides = 0
    for _ in range(max(1, local_epochs)):
        out = train_epoch(model, train_bags, optimizer, cfg, generator=gen, device=rt.device)
        slides += int(out.pop("num_slides"))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v / max(1, local_epochs)
    losses = {t: float(sums.get(t, 0.0)) for t in contract.LOSS_TERMS}  # absent terms (omics at a
    # histology-only site) are 0.0, so every site sends the same keys
    val = evaluate(model, rt.normalised("val", None, None), rt.device, cfg.train.precision)
    part = partition_state(model.state_dict(), cfg.federation)
    save_site_state(state_dir, SiteState(round=g.round, private=part.private, optimizer=optimizer.state_dict()))
    shared = dict(part.shared)
    if not rt.paired:
        for k in paired_only_keys(shared, cfg.federation):
            del shared[k]
    memory = _memory_reply(model, cfg.memory.update, cfg.federation.min_slot_count)
    metrics = contract.train_metrics(
        num_examples=slides, paired=rt.paired, losses=losses, val_auc=_auc(val.labels, val.probs),
        val_auc_memory=_auc(val.labels, val.memory_scores), train_seconds=time.perf_counter() - t0)
    log.info("site %s round %d: %d slides, loss %.4f, val AUC %.3f", rt.name, g.round, slides,
             losses["total"], metrics[contract.VAL_AUC])
    return shared, memory, metrics


def _memory_reply(model: torch.nn.Module, mode: str, min_slot_count: int) -> dict[str, torch.Tensor]:
    if not getattr(model, "has_memory", False) or mode == "frozen":
        return {}
    agg = model.memory.aggregates()  # sums (2,K,S), counts (2,K), slides (2,K)
    if mode == "ema":
        a = memory_merge.memory_aggregate_for_reply(agg, min_slot_count)
        return {contract.SUMS: a.sums, contract.COUNTS: a.counts, contract.SLIDES: a.slides}
    usage = memory_merge.slot_usage_for_reply(model.memory.slots, agg, min_slot_count)
    return {contract.SLOTS: usage.slots, contract.USAGE: usage.usage, contract.SLIDES: usage.slides}


def evaluate_round(rt: SiteRuntime, g: GlobalModel, state_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Histology-only test metrics of the global and of the personalised model.

    Returns
    -------
    global_metrics, personal_metrics : dict
        Each exactly :data:`contract.EVALUATE_METRIC_KEYS`. The global model's classifier AUC and loss are NaN
        unless ``classifier.`` is shared (its head would be the untrained initial one).
    """
    cfg = rt.cfg
    test = rt.normalised("test", None, None)
    head_shared = any(p.startswith("classifier") for p in cfg.federation.shared)
    glob = evaluate(_assemble(rt, g, None), test, rt.device, cfg.train.precision)
    saved = load_site_state(state_dir, g.round, inclusive=True)
    pers = evaluate(_assemble(rt, g, saved.private if saved else None), test, rt.device, cfg.train.precision)
    global_metrics = contract.evaluate_metrics(
        num_examples=len(test), test_auc=_auc(glob.labels, glob.probs) if head_shared else math.nan,
        test_auc_memory=_auc(glob.labels, glob.memory_scores), test_loss=glob.loss if head_shared else math.nan)
    personal_metrics = contract.evaluate_metrics(
        num_examples=len(test), test_auc=_auc(pers.labels, pers.probs),
        test_auc_memory=_auc(pers.labels, pers.memory_scores), test_loss=pers.loss)
    return global_metrics, personal_metrics


def kmeans_points(rt: SiteRuntime, g: GlobalModel, state_dir: Path) -> dict[int, torch.Tensor]:
    """Up to ``memory.kmeans_max_points`` unit patch projections per class of the training slides, under the
    initial global encoder; computed once (k-means seed) and cached in the state folder for the refine steps."""
    model = _assemble(rt, g, None)
    cap = rt.cfg.memory.kmeans_max_points
    gen = torch.Generator().manual_seed(site_seed(rt.cfg.train.seed, 0, rt.name))
    keys: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    for bag in rt.data.split("train"):
        proj = model.patch_projections(bag.features.to(rt.device), bag.neighbors.to(rt.device)).float().cpu()
        r = torch.rand(proj.shape[0], generator=gen)  # (P,) random keys: the `cap` smallest = uniform sample
        y = int(bag.label)
        if y in kept:
            r, proj = torch.cat([keys[y], r]), torch.cat([kept[y], proj])  # (N, ), (N, S)
        if proj.shape[0] > cap:
            idx = torch.topk(r, cap, largest=False).indices  # (cap,)
            r, proj = r[idx], proj[idx]
        keys[y], kept[y] = r, proj
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save(kept, state_dir / KMEANS_POINTS_FILE)
    return kept


def cached_kmeans_points(rt: SiteRuntime, state_dir: Path) -> dict[int, torch.Tensor]:
    """The projections :func:`kmeans_points` cached; raises if the k-means seed query never reached this site."""
    path = state_dir / KMEANS_POINTS_FILE
    if not path.is_file():
        raise RuntimeError(f"site {rt.name}: k-means refine step before the seed step ({path} missing)")
    return torch.load(path, map_location="cpu", weights_only=True)
