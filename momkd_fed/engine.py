"""Training and evaluation loops on in-memory bags: no file IO, no Flower.

One slide per optimiser step, as the reference runs. The model owns its losses (``model.loss`` returns a named
breakdown) and its memory update (``model.after_step``); this module only samples slides, steps, clips and
averages. Evaluation is always histology-only: genomics are never passed at inference.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import Config, TrainConfig
from .data.bag import Bag
from .device import autocast_context
from .metrics import binary_metrics
from .optim import FusedAdamW, fused_adamw_supported

if TYPE_CHECKING:
    from .model.outputs import ModelOutput

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Optimiser and sampling


def make_optimizer(model: nn.Module, train_cfg: TrainConfig) -> FusedAdamW | torch.optim.Optimizer:
    """AdamW (``train.lr``, ``train.weight_decay``) over the parameters that require gradients.

    A frozen memory (``memory.update: frozen``) or an ``ema`` memory (buffers) is thereby excluded. Where torch
    has a fused AdamW kernel (CUDA; CPU since torch 2.4) it is :class:`momkd_fed.optim.FusedAdamW`: torch's fused
    update, bitwise, without ``torch.optim.Optimizer`` and so without importing ``torch._dynamo`` (3 s per fresh
    process idle, ~20 s under load: every Flower message starts one). On CPU the fused kernel steps the reference
    model's 4.4M parameters in ~6 ms against ~22 ms for the default multi-tensor (foreach) AdamW, 1 thread
    (benchmarks/README.md, step_speed.py). Elsewhere: ``torch.optim.AdamW`` with torch's default implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if fused_adamw_supported(params):
        return FusedAdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def sample_order(bags: Sequence[Bag], balanced: bool, generator: torch.Generator) -> list[int]:
    """Indices of the slides to visit in one epoch.

    ``balanced``: ``len(bags)`` draws with replacement, each slide weighted 1 / (slides of its class), so both
    classes are seen equally often. Otherwise a random permutation.
    """
    n = len(bags)
    if n == 0:
        return []
    if not balanced:
        return torch.randperm(n, generator=generator).tolist()
    labels = torch.tensor([b.label for b in bags])  # (N,)
    counts = torch.bincount(labels, minlength=2).to(torch.float64)  # (2,)
    weights = 1.0 / counts[labels]  # (N,)
    return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()


def subsample_patches(bag: Bag, max_patches: int, knn_k: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and kNN neighbours of a random subset of at most ``max_patches`` patches.

    The kNN graph is rebuilt on the kept patches' coordinates (exact: every kept patch gets its k nearest kept
    patches, as if the slide had only those), rather than pruning the full graph.

    Returns
    -------
    features : (P', D) float32
    neighbors : (P', k_eff' + 1) int64, column 0 = self
    """
    if max_patches <= 0 or bag.num_patches <= max_patches:
        return bag.features, bag.neighbors
    from .data.graph import knn_neighbors

    keep = torch.randperm(bag.num_patches, generator=generator)[:max_patches].sort().values  # (P',)
    coords = bag.coords[keep]  # (P', 2)
    neighbors = torch.as_tensor(knn_neighbors(coords.numpy(), knn_k), dtype=torch.long)  # (P', k_eff'+1)
    return bag.features[keep], neighbors


# --------------------------------------------------------------------------------------------------------------
# One epoch


def train_epoch(
    model: nn.Module,
    bags: Sequence[Bag],
    optimizer: FusedAdamW | torch.optim.Optimizer,
    cfg: Config,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    on_step: Callable[[Bag, ModelOutput], None] | None = None,
    after_backward: Callable[[], None] | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Train one epoch, one slide per optimiser step.

    Paired bags get the full MoMKD loss (``omics`` passed); histology-only bags (``bag.omics is None``) get the
    histology terms only. After each ``optimizer.step()`` the model's ``after_step`` moves an ``ema`` memory.

    Parameters
    ----------
    generator : torch.Generator
        CPU generator for slide sampling and patch subsampling (seeded by the caller).
    progress : callable, optional
        Called with 1 after every slide.
    on_step : callable, optional
        Called as ``on_step(bag, out)`` after each ``optimizer.step()`` and *before* ``model.after_step`` (so an
        ``ema`` memory has not yet moved: ``out`` is the step's ``ModelOutput`` and the memory is the one the
        step's embeddings were scored against). Absent: behaviour unchanged.
    after_backward : callable, optional
        Called with no argument after each backward pass, before gradient clipping (e.g. FedProx's
        ``ProximalTerm.add_grad`` adds its gradient there). Absent: behaviour unchanged.
    max_steps : int, optional
        Stop after this many slides (the first ones of the epoch's sampled order; a federated round's step
        budget). None: the whole epoch.

    Returns
    -------
    dict
        Mean of each loss term over the steps that produced it (``total``, ``ce``, ...), and ``num_slides``
        (slides stepped on, the federated ``num-examples``).
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    order = sample_order(bags, cfg.train.balanced_sampling, generator)
    if max_steps is not None:
        order = order[:max(0, max_steps)]
    for idx in order:
        bag = bags[idx]
        feats, nbrs = subsample_patches(bag, cfg.data.max_patches, cfg.data.knn_k, generator)
        feats = feats.to(device, non_blocking=True)  # (P, D)
        nbrs = nbrs.to(device, non_blocking=True)  # (P, k+1)
        omics = bag.omics.to(device) if bag.omics is not None else None  # (G,) or None
        with autocast_context(device, cfg.train.precision):
            out = model(feats, nbrs, omics)
            losses = model.loss(out, bag.label, omics)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if after_backward is not None:
            after_backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(bag, out)
        model.after_step(out, bag.label)
        for k, v in losses.as_floats().items():
            if v is None or not math.isfinite(v):
                continue
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
        if progress is not None:
            progress(1)
    result = {k: sums[k] / counts[k] for k in sums}
    result["num_slides"] = float(len(order))
    return result


# --------------------------------------------------------------------------------------------------------------
# Histology-only evaluation


@dataclass
class Predictions:
    """Histology-only outputs for a list of slides, in the order given.

    Attributes
    ----------
    slide_ids : list of str
    labels : (N,) int64
    probs : (N,) float64, softmax(logits)[1] of the classifier head
    memory_scores : (N,) float64 memory score delta(F_wsi), or None for a model without memory (ABMIL)
    attention : list of (P_i,) float32 arrays, or None unless requested
    loss : float, mean histology-only loss (``model.loss`` without genomics); NaN for an empty set
    """

    slide_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    memory_scores: np.ndarray | None
    attention: list[np.ndarray] | None = None
    loss: float = math.nan

    def scores(self, head: str) -> np.ndarray | None:
        """(N,) raw scores of ``head``: ``probs`` for "classifier", ``memory_scores`` for "memory"."""
        if head not in ("classifier", "memory"):
            raise ValueError(f"head must be 'classifier' or 'memory', got {head!r}")
        return self.probs if head == "classifier" else self.memory_scores

    def metrics(self, prob_threshold: float = 0.5, memory_threshold: float = 0.0) -> dict:
        """``{"classifier": binary_metrics, "memory": binary_metrics or None}``."""
        out = {"classifier": binary_metrics(self.labels, self.probs, prob_threshold), "memory": None}
        if self.memory_scores is not None:
            out["memory"] = binary_metrics(self.labels, self.memory_scores, memory_threshold)
        return out


@torch.no_grad()
def evaluate(model: nn.Module, bags: Sequence[Bag], device: torch.device, precision: str = "fp32", *,
             keep_attention: bool = False) -> Predictions:
    """Score every bag histology-only (genomics are never passed), in eval mode."""
    model.eval()
    probs, mem, att, losses = [], [], [], []
    has_memory = True
    for bag in bags:
        feats = bag.features.to(device)  # (P, D)
        nbrs = bag.neighbors.to(device)  # (P, k+1)
        with autocast_context(device, precision):
            out = model(feats, nbrs, None)
            loss = model.loss(out, bag.label, None)
        probs.append(float(torch.softmax(out.logits.float(), dim=-1)[1]))
        if out.memory_score is None:
            has_memory = False
        else:
            mem.append(float(out.memory_score))
        if keep_attention:
            att.append(out.attention.float().cpu().numpy())  # (P,)
        losses.append(float(loss.total))
    return Predictions(
        slide_ids=[b.slide_id for b in bags],
        labels=np.asarray([b.label for b in bags], dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float64),
        memory_scores=np.asarray(mem, dtype=np.float64) if has_memory else None,
        attention=att if keep_attention else None,
        loss=float(np.mean(losses)) if losses else math.nan,
    )


# --------------------------------------------------------------------------------------------------------------
# Memory initialisation


@torch.no_grad()
def init_memory_from_bags(model: nn.Module, bags: Sequence[Bag], cfg: Config, *,
                          device: torch.device | None = None) -> dict[int, int]:
    """Initialise the memory by spherical k-means on patch projections of the current network, per class.

    Up to ``memory.kmeans_max_points`` projections per class are kept as a uniform random sample over all
    patches of that class's slides (seeded by ``train.seed``; memory stays bounded by the sample size).

    Returns
    -------
    dict
        Number of projections used per class.
    """
    if not getattr(model, "has_memory", False):
        return {}
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.train.seed)
    cap = cfg.memory.kmeans_max_points
    keys: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    model.eval()
    for bag in bags:
        proj = model.patch_projections(bag.features.to(device), bag.neighbors.to(device)).float().cpu()  # (P, S)
        r = torch.rand(proj.shape[0], generator=gen)  # (P,) random keys: keep the `cap` smallest = uniform sample
        y = int(bag.label)
        if y in kept:
            r = torch.cat([keys[y], r])
            proj = torch.cat([kept[y], proj])
        if proj.shape[0] > cap:
            idx = torch.topk(r, cap, largest=False).indices  # (cap,)
            r, proj = r[idx], proj[idx]
        keys[y], kept[y] = r, proj
    model.init_memory(kept, seed=cfg.train.seed)
    return {y: int(p.shape[0]) for y, p in sorted(kept.items())}


# --------------------------------------------------------------------------------------------------------------
# Fit with early stopping


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes
    ----------
    history : list of dict, one row per epoch (``train_<term>`` losses, ``val_*`` metrics, monitor, seconds)
    best_epoch : int, 1-based epoch whose state was restored (the last epoch when nothing was monitored)
    best_score : float, the monitored value at ``best_epoch`` (NaN when nothing was monitored)
    monitor : str, "val_auc", "val_loss" (validation holds one class) or "none" (no validation slides)
    note : str, why the monitor is not "val_auc", if it is not
    stopped_early : bool
    """

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = math.nan
    monitor: str = "val_auc"
    note: str = ""
    stopped_early: bool = False


def _choose_monitor(val_bags: Sequence[Bag]) -> tuple[str, str]:
    labels = {b.label for b in val_bags}
    if len(labels) == 2:
        return "val_auc", ""
    if val_bags:
        return "val_loss", (f"validation holds one class only ({len(val_bags)} slides of class "
                            f"{labels.pop()}): AUC is undefined, early stopping on validation loss")
    return "none", "no validation slides: no early stopping, the last epoch is kept"


def fit(model: nn.Module, train_bags: Sequence[Bag], val_bags: Sequence[Bag], cfg: Config, *,
        device: torch.device, log_fn: Callable[[dict], None] | None = None,
        optimizer: FusedAdamW | torch.optim.Optimizer | None = None) -> FitResult:
    """Train for ``train.epochs`` with early stopping on validation AUC; restore the best state.

    The monitor is validation AUC of the classifier head; where validation holds one class it is the
    validation loss (lower is better), and this is said in every history row. ``train.patience`` epochs without
    improvement stop training (``patience <= 0`` disables early stopping). Slide sampling uses a generator
    seeded with ``train.seed``: with the same seed and initial weights on CPU two fits are identical.

    Parameters
    ----------
    log_fn : callable, optional
        Called with each epoch's history row as soon as it exists.
    """
    from .progress import progress_bar

    optimizer = optimizer or make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    monitor, note = _choose_monitor(val_bags)
    result = FitResult(monitor=monitor, note=note)
    if note:
        log.warning("fit: %s", note)
    best_state = None
    since_best = 0
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        with progress_bar(len(train_bags), f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress) as advance:
            train = train_epoch(model, train_bags, optimizer, cfg, generator=gen, device=device, progress=advance)
        row: dict = {"epoch": epoch}
        row.update({f"train_{k}": v for k, v in train.items()})
        if val_bags:
            pred = evaluate(model, val_bags, device, cfg.train.precision)
            m = pred.metrics()
            row.update({f"val_{k}": m["classifier"][k] for k in ("auc", "auprc", "balanced_accuracy")})
            row["val_loss"] = pred.loss
            if m["memory"] is not None:
                row["val_memory_auc"] = m["memory"]["auc"]
        row["monitor"] = monitor
        if note:
            row["monitor_note"] = note
        # higher is better: AUC, or the negated loss; "none" keeps the latest epoch
        score = {"val_auc": row.get("val_auc", math.nan), "val_loss": -row.get("val_loss", math.nan)}.get(monitor)
        if monitor == "none":
            improved = True
        else:
            improved = math.isfinite(score) and (best_state is None or score > result.best_score)
        if improved:
            result.best_epoch = epoch
            result.best_score = math.nan if monitor == "none" else score
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
        row["best_epoch"] = result.best_epoch
        row["seconds"] = time.perf_counter() - t0
        result.history.append(row)
        if log_fn is not None:
            log_fn(row)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                                         if k != "monitor_note"})
        if monitor != "none" and cfg.train.patience > 0 and since_best >= cfg.train.patience:
            result.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if monitor == "val_loss" and math.isfinite(result.best_score):
        result.best_score = -result.best_score  # report the loss itself, not its negation
    return result
