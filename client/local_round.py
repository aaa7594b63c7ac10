"""What a site does in one message, on plain tensors (the ClientApp handlers only unpack and pack).

- :func:`train_round`: global shared weights + global memory + this site's private state -> local epochs ->
  trained shared weights, memory aggregates, metrics; the new private state is saved on the site.
- :func:`evaluate_round`: histology-only test metrics of the *global* model (shared weights + global memory,
  private parts at their seeded initial values; its classifier counts only where the head is shared) and of the
  *personalised* model (the same plus this site's private head and temperature); the global model's validation
  histograms for the federated calibration (``momkd_fed.calibration.site_histograms``, under the minimum
  count); the site's ``personal_model.pt`` (``federation.personal_round``: the last round, or the site's best on
  its own validation split).
- :func:`kmeans_points`: the patch projections the federated k-means initialisation clusters.
- :func:`audit_reply`: one line of the site's privacy audit log for a query reply (k-means, genomic moments).

Privacy (``momkd_fed.privacy``): what leaves a site in a train reply is decided here, once per round. The memory
record is ``privacy.memory_release`` (ema mode: per-slide clipped, noised slot sums when ``privacy.enabled``,
recorded per step by a ``SlotAccumulator`` *before* the ema memory moves; exact aggregates otherwise) or the
trained slots through ``withhold_small_usage`` (gradient mode); the minimum counts
(``federation.min_slot_count`` slides, ``privacy.min_slot_embeddings`` embeddings) apply always. The site's
accountant is saved in its state folder before the reply leaves; with ``privacy.update_clip_norm`` the shared
weights are sent with their update clipped; with ``privacy.audit`` every reply is described (shapes, norms,
withheld slots, epsilon -- never values) in the local audit log; so is every evaluate reply (its metrics and the
shapes and norms of the calibration histograms, which no epsilon covers).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momkd_fed.calibration import DEFAULT_THRESHOLD, calibrate_heads, site_histograms
from momkd_fed.checkpoint import save_checkpoint
from momkd_fed.config import Config
from momkd_fed.data.bag import Bag
from momkd_fed.engine import evaluate, make_optimizer, train_epoch
from momkd_fed.federation import contract
from momkd_fed.federation.memory_merge import SlotUsage
from momkd_fed.federation.proximal import ProximalTerm
from momkd_fed.federation.selection import BestRound
from momkd_fed.federation.sharing import histology_only_part, overlay_state, partition_state
from momkd_fed.heads import TRAINED, global_model_heads, model_heads, primary_head
from momkd_fed.metrics import roc_auc
from momkd_fed.privacy import (AuditLog, PrivacyAccountant, SlotAccumulator, assign_slots, audit_record,
                               check_privacy, clip_shared_weights, dp_covers, memory_dp, memory_release,
                               withhold_small_usage)

from .site_runtime import SiteRuntime, site_seed
from .site_state import (ACCOUNTANT_FILE, PERSONAL_MODEL_FILE, SiteState, load_personal_rounds, load_site_state,
                         save_personal_rounds, save_site_state)
from .timings import PhaseClock

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


def train_round(rt: SiteRuntime, g: GlobalModel, state_dir: Path, lr: float, local_epochs: int,
                clock: PhaseClock | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Train locally for ``local_epochs`` (exactly ``federation.local_steps`` slides when that is set), save the
    new private state, build the reply (privacy applied). ``clock``: notes ``model``, ``first_step``, ``trained``
    and ``validated`` (:mod:`client.timings`).

    The round's optimisation (``federation``): the site's AdamW state carries over from its last round unless
    ``reset_optimizer``; with ``prox_mu > 0`` every step adds FedProx's proximal gradient toward the received
    shared weights (``federation.proximal``). The reply's ``num-examples`` (the averaging weight) is the slides
    stepped on, or with a step budget the site's training slides.

    Returns
    -------
    shared : dict[str, Tensor]
        Trained shared weights (a histology-only site leaves out the paired-only keys); with
        ``privacy.update_clip_norm > 0`` the update ``shared - global`` is clipped to that L2 norm.
    memory : dict[str, Tensor]
        Memory record for the reply (:data:`contract.MEMORY_KEYS_BY_MODE`), slots below the minimum counts
        withheld; clipped and noised under memory DP; empty in frozen mode or without a memory.
    metrics : dict[str, float]
        Exactly :data:`contract.TRAIN_METRIC_KEYS` (``privacy_epsilon`` NaN without memory DP).
    """
    t0 = time.perf_counter()
    cfg = rt.cfg
    check_privacy(cfg)
    saved = load_site_state(state_dir, g.round)
    model = _assemble(rt, g, saved.private if saved else None)
    optimizer = make_optimizer(model, cfg.train)
    fed = cfg.federation
    if saved is not None and saved.optimizer and not fed.reset_optimizer:
        optimizer.load_state_dict(saved.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clock is not None:
        clock.mark("model")
    mean, std = _stats(rt, g)
    train_bags = rt.normalised("train", mean, std)
    if not train_bags:
        raise ValueError(f"site {rt.name}: no training slides")
    seed = site_seed(cfg.train.seed, g.round, rt.name)
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # slide order, patch subsampling
    has_memory = getattr(model, "has_memory", False)
    if has_memory:
        model.memory.reset_aggregates()
    acc = None
    if has_memory and memory_dp(cfg):
        acc = SlotAccumulator(model.memory.num_slots, int(model.memory.slots.shape[-1]), cfg.privacy.clip_norm)
    prox = ProximalTerm(model, g.shared, fed.prox_mu) if fed.prox_mu > 0.0 else None
    sums: dict[str, float] = {}
    slides = 0
    on_step = _slot_recorder(model, acc) if acc is not None else None
    if clock is not None:
        on_step = _with_clock(on_step, clock)
    budget = fed.local_steps if fed.local_steps > 0 else None  # steps left this round (None: whole epochs)
    # a step budget is met exactly: a site with fewer training slides draws epoch after epoch
    epochs = max(1, local_epochs) if budget is None else -(-budget // len(train_bags))
    for _ in range(epochs):
        out = train_epoch(model, train_bags, optimizer, cfg, generator=gen, device=rt.device, on_step=on_step,
                          after_backward=prox.add_grad if prox is not None else None, max_steps=budget)
        steps = int(out.pop("num_slides"))
        slides += steps
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + (v / epochs if budget is None else v * steps)
        if budget is not None:
            budget -= steps  # the epochs above end exactly when it is spent
    if fed.local_steps > 0:  # mean over the steps taken; the averaging weight is the site's training slides
        sums = {k: v / max(1, slides) for k, v in sums.items()}
        slides = len(train_bags)
    losses = {t: float(sums.get(t, 0.0)) for t in contract.LOSS_TERMS}  # absent terms (omics at a
    # histology-only site) are 0.0, so every site sends the same keys
    if clock is not None:
        clock.mark("trained")
    val = evaluate(model, rt.normalised("val", None, None), rt.device, cfg.train.precision)
    if clock is not None:
        clock.mark("validated")
    part = partition_state(model.state_dict(), cfg.federation)
    save_site_state(state_dir, SiteState(round=g.round, private=part.private, optimizer=optimizer.state_dict()))
    shared = dict(part.shared) if rt.paired else histology_only_part(part.shared, cfg.federation)
    audit: dict = {"covers": dp_covers(cfg)}
    if cfg.privacy.update_clip_norm > 0.0:
        shared, norm = clip_shared_weights(shared, g.shared, cfg.privacy.update_clip_norm)
        audit["extra"] = {"update_norm": norm, "update_clip_norm": cfg.privacy.update_clip_norm}
    memory = _memory_reply(model, cfg, acc, state_dir, audit) if has_memory else {}
    epsilon = float(audit["privacy"]["epsilon"]) if audit.get("privacy") else math.nan
    metrics = contract.train_metrics(
        num_examples=slides, paired=rt.paired, losses=losses, val_auc=_auc(val.labels, val.probs),
        val_auc_memory=_auc(val.labels, val.memory_scores), train_seconds=time.perf_counter() - t0,
        privacy_epsilon=epsilon)
    if cfg.privacy.audit:
        records = {contract.ARRAYS_RECORD: shared, **({contract.MEMORY_RECORD: memory} if memory else {})}
        extra = {**audit.get("extra", {}), "metrics": metrics}
        AuditLog.in_folder(state_dir).append(audit_record(
            g.round, rt.name, "train", records, withheld=audit.get("withheld"), clip=audit.get("clip"),
            privacy=audit.get("privacy"), covers=audit["covers"], extra=extra))
    log.info("site %s round %d: %d slides, loss %.4f, val AUC %.3f%s", rt.name, g.round, slides,
             losses["total"], metrics[contract.VAL_AUC], f", epsilon {epsilon:.3g}" if math.isfinite(epsilon) else "")
    return shared, memory, metrics


def _with_clock(on_step, clock: PhaseClock):
    """``train_epoch`` hook: ``on_step`` (if any), then ``clock.on_step()``."""

    def hook(bag: Bag, out) -> None:
        if on_step is not None:
            on_step(bag, out)
        clock.on_step()

    return hook


def _slot_recorder(model: torch.nn.Module, acc: SlotAccumulator):
    """``train_epoch`` hook: add the step's assigned embeddings to ``acc``, against the memory before it moves."""

    def on_step(bag: Bag, out) -> None:
        x = model.memory.assigned(out.patch_emb, out.omics_emb)  # (N, S) or None
        if x is None:
            return
        y = int(bag.label)
        acc.add_slide(assign_slots(x, model.memory.normalized()[y]), y, x, slide_id=bag.slide_id)

    return on_step


def _memory_reply(model: torch.nn.Module, cfg: Config, acc: SlotAccumulator | None, state_dir: Path,
                  audit: dict) -> dict[str, torch.Tensor]:
    """The reply's memory record; fills ``audit`` with what was withheld, clipped and spent."""
    mode = cfg.memory.update
    if mode == "frozen":
        return {}
    p = cfg.privacy
    if mode == "ema":
        accountant = None
        if acc is not None:
            accountant = PrivacyAccountant.load_or_new(state_dir / ACCOUNTANT_FILE, p.noise_multiplier, p.delta)
        rel = memory_release(cfg, aggregates=model.memory.aggregates(), accumulator=acc, accountant=accountant)
        if accountant is not None:
            accountant.save(state_dir / ACCOUNTANT_FILE)  # before the reply leaves the site
        audit.update(withheld=rel.withheld.as_dict(), clip=rel.clip.as_dict() if rel.clip else None,
                     privacy=rel.privacy)
        return rel.as_tensors()
    agg = model.memory.aggregates()  # usage = patch projections assigned per slot this round
    usage, withheld = withhold_small_usage(
        SlotUsage(slots=model.memory.slots.detach().float().cpu(), usage=agg[contract.COUNTS].float().cpu(),
                  slides=agg[contract.SLIDES].float().cpu()), cfg.federation.min_slot_count, p.min_slot_embeddings)
    audit["withheld"] = withheld.as_dict()
    return {contract.SLOTS: usage.slots, contract.USAGE: usage.usage, contract.SLIDES: usage.slides}


def audit_reply(rt: SiteRuntime, state_dir: Path, round_: int, kind: str, records: dict[str, dict]) -> None:
    """Append what a query reply sends (``kind``: ``"kmeans_seed"``, ``"kmeans_step"``, ``"omics_moments"``)
    to the site's audit log when ``privacy.audit`` is on; these releases are not covered by any epsilon.

    Parameters
    ----------
    records : dict
        Record name -> {key: array} exactly as sent.
    """
    if rt.cfg.privacy.audit:
        AuditLog.in_folder(state_dir).append(audit_record(round_, rt.name, kind, records, covers=[]))


def evaluate_round(rt: SiteRuntime, g: GlobalModel, state_dir: Path
                   ) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Histology-only test and validation metrics of the global and of the personalised model, the global model's
    validation histograms for the federated calibration, and this site's personal model.

    The site keeps the personalised model of the round ``federation.personal_round`` names (the last one
    evaluated, or its best on its own validation split by classifier AUC, ``federation.selection.BestRound``) as
    ``personal_model.pt`` in its state folder, calibrated on its validation split; only its round and AUCs are
    reported. With ``privacy.audit`` the reply is described in the audit log.

    Returns
    -------
    global_metrics : dict
        Exactly :data:`contract.EVALUATE_METRIC_KEYS`. The global model's classifier AUCs and loss are NaN unless
        ``classifier.`` is shared (its head would be the untrained initial one). The server picks the
        federation's best round from the global validation AUCs.
    personal_metrics : dict
        Exactly :data:`contract.PERSONAL_METRIC_KEYS`.
    calibration : dict[str, ndarray]
        Head -> (2, B) class-conditional validation counts of each head the global model trained
        (:data:`contract.CALIBRATION_RECORD`; runs merged under ``federation.min_slot_count``).
    """
    cfg = rt.cfg
    splits = {"test": rt.normalised("test", None, None), "val": rt.normalised("val", None, None)}
    global_heads = [h for h, s in global_model_heads(cfg).items() if s == TRAINED]
    saved = load_site_state(state_dir, g.round, inclusive=True)
    models = {"global": _assemble(rt, g, None), "personal": _assemble(rt, g, saved.private if saved else None)}
    preds, metrics = {}, {}
    for which, model in models.items():
        head = which == "personal" or "classifier" in global_heads
        test, val = (evaluate(model, splits[s], rt.device, cfg.train.precision) for s in ("test", "val"))
        preds[which] = (test, val)
        metrics[which] = contract.evaluate_metrics(
            num_examples=len(splits["test"]), test_auc=_auc(test.labels, test.probs) if head else math.nan,
            test_auc_memory=_auc(test.labels, test.memory_scores), test_loss=test.loss if head else math.nan,
            val_slides=len(splits["val"]), val_auc=_auc(val.labels, val.probs) if head else math.nan,
            val_auc_memory=_auc(val.labels, val.memory_scores))
    val = preds["global"][1]
    releases = site_histograms(cfg, val.labels, {h: val.scores(h) for h in global_heads})
    counts = {h: r.counts for h, r in releases.items()}
    file_round, file_val, file_test = _personal_model(rt, g, state_dir, models["personal"], preds["personal"][1],
                                                      metrics["personal"])
    personal = contract.personal_metrics(metrics["personal"], file_round, file_val, file_test)
    if cfg.privacy.audit:
        AuditLog.in_folder(state_dir).append(audit_record(
            g.round, rt.name, "evaluate", {contract.CALIBRATION_RECORD: counts}, covers=[],
            extra={"metrics": metrics["global"], "metrics_personal": personal,
                   "calibration": {h: r.as_dict() for h, r in releases.items()}}))
    return metrics["global"], personal, counts


def _personal_model(rt: SiteRuntime, g: GlobalModel, state_dir: Path, model: torch.nn.Module, val,
                    metrics: dict[str, float]) -> tuple[int, float, float]:
    """Record this round's personal validation / test AUC; write ``personal_model.pt`` (calibrated on the site's
    validation split) if this round is the one ``federation.personal_round`` keeps: every round ("last"), or the
    site's best so far on its own validation split ("best_validation"). Returns the file's round, validation AUC
    and test AUC (round 0 and NaN before any file exists)."""
    cfg = rt.cfg
    rounds = {r: v for r, v in load_personal_rounds(state_dir).items() if r < g.round}  # a re-run forgets later ones
    rounds[g.round] = {"val_auc": metrics[contract.VAL_AUC], "test_auc": metrics[contract.TEST_AUC]}
    keep = g.round
    if cfg.federation.personal_round == "best_validation":
        best = BestRound()
        for r in sorted(rounds):
            best.offer(r, rounds[r]["val_auc"], contract.VAL_AUC)
        keep = best.round
    path = state_dir / PERSONAL_MODEL_FILE
    if keep == g.round:
        heads = model_heads(cfg)
        cal = calibrate_heads(cfg, val.labels, {h: val.scores(h) for h in heads},
                              f"validation split of site {rt.name} ({len(val.labels)} slides)")
        save_checkpoint(path, model, cfg, feature_dim=cfg.data.feature_dim, n_genes=g.n_genes, extra={
            "round": g.round, "kind": "personal", "site": rt.name, "heads": heads,
            "primary_head": primary_head(heads), "calibration": {h: c.to_dict() for h, c in cal.items()},
            "threshold": {h: (cal[h].threshold if h in cal else DEFAULT_THRESHOLD[h]) for h in heads},
            "metrics": {"val_auc": metrics[contract.VAL_AUC], "test_auc": metrics[contract.TEST_AUC],
                        "val_auc_memory": metrics[contract.VAL_AUC_MEMORY],
                        "test_auc_memory": metrics[contract.TEST_AUC_MEMORY]}})
        log.info("site %s: personal model of round %d (personal model, classifier: validation AUC %.3f) -> %s",
                 rt.name, g.round, metrics[contract.VAL_AUC], path)
    save_personal_rounds(state_dir, rounds)
    if not path.is_file():
        return 0, math.nan, math.nan
    return keep, rounds[keep]["val_auc"], rounds[keep]["test_auc"]


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
