"""The one typed configuration of momkd-fed.

Every default is stated once, here, next to a comment saying what it means; `configs/*.yaml` only override.
Unknown keys and wrong types are rejected with the dotted key path and the allowed values. The config
round-trips losslessly to Flower's flat run-config (``{"loss.w_ce": 0.5, ...}``): scalars stay scalars, lists,
dicts and the site list travel as JSON strings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    """What a slide and a case look like, federation-wide."""

    label_column: str = "label"  # manifest column holding the clinical label
    # explicit label mapping: manifest value -> class (0/1); values not listed are excluded and counted
    label_map: dict[str, int] = field(default_factory=lambda: {"0": 0, "1": 1, "negative": 0, "positive": 1})
    feature_dim: int = 1536  # patch feature dimension D_in (UNI2-h 1536, UNI 1024, CONCH 512, ...)
    knn_k: int = 8  # spatial kNN graph degree (k_eff = min(k, P-1); self loops added)
    gene_panel: list[str] = field(default_factory=list)  # gene names (columns); empty = all columns of the matrix
    omics_log1p: bool = False  # apply log2(x+1) before z-scoring (raw TPM); False for data already on a log/z scale
    omics_clip: float = 10.0  # clip z-scored genomics to [-clip, clip] (TCGA z-scores have outliers up to ~4e4)
    omics_stats: Literal["federated", "site"] = "federated"  # z-score statistics: pooled over paired sites, or per site
    cache_dir: str = ""  # site-local cache folder; empty = <features_dir>/.momkd_cache
    max_patches: int = 0  # train-time random patch subsample per slide (0 = use every patch)


@dataclass
class SplitConfig:
    """Patient-level, stratified splits used when a manifest has no split column."""

    val_fraction: float = 0.15  # fraction of patients for validation
    test_fraction: float = 0.2  # fraction of patients for test
    seed: int = 0  # split seed (independent of the training seed)


@dataclass
class ModelConfig:
    """Architecture (defaults = the reference run dims; configs/paper.yaml has the paper's 256/128)."""

    name: Literal["momkd", "abmil"] = "momkd"  # momkd, or the gated-attention ABMIL baseline
    hidden_dim: int = 512  # histology encoder width D (GATv2 heads concatenated)
    heads: int = 2  # GATv2 attention heads per layer
    gat_layers: int = 2  # GATv2 layers (JK-max over their outputs)
    attn_dropout: float = 0.5  # GATv2 attention-coefficient dropout
    dropout: float = 0.5  # dropout after each encoder layer and in the classifier
    shared_dim: int = 64  # S: dimension of the unit sphere shared by patches, slides, genomics and memory
    omics_hidden: int = 512  # genomic encoder hidden width
    omics_embed_dim: int = 512  # E: genomic embedding z
    omics_dropout: float = 0.25  # genomic encoder dropout
    cls_hidden: int = 128  # classifier hidden width
    tau_init: float = 0.2  # initial attention temperature tau_0 (tau = exp(theta))
    tau_min: float = 0.01  # tau clamp, lower
    tau_max: float = 2.0  # tau clamp, upper
    abmil_hidden: int = 256  # ABMIL gated-attention hidden width


@dataclass
class MemoryConfig:
    """The class-conditional prototype memory."""

    slots: int = 16  # K slots per class
    update: Literal["gradient", "ema", "frozen"] = "gradient"  # how slots move (method.md, two modes + ablation)
    momentum: float = 0.99  # ema: c <- mu*c + (1-mu)*mean(assigned), renormalised (1: only the server's merge moves c)
    ema_source: Literal["omics", "patches", "both"] = "both"  # which embeddings are assigned to slots in ema mode
    kmeans_iters: int = 20  # Lloyd iterations of the initial k-means (a site's own clusters, the server's pooling)
    kmeans_rounds: int = 1  # federated set-up: exchanges that refine the pooled centroids at every site (0 = none)
    kmeans_refine_iters: int = 5  # Lloyd iterations each site runs from the shared centroids per refine exchange
    kmeans_max_points: int = 10000  # patch projections per class used by k-means initialisation


@dataclass
class LossConfig:
    """Loss weights and constants, as run by the reference code."""

    w_ce: float = 0.5  # cross-entropy weight
    w_mem: float = 0.1  # memory loss (commitment + orthogonality) weight
    w_align_omics: float = 0.05  # genomics-to-memory alignment weight
    w_align_wsi: float = 0.2  # slide-to-memory alignment weight
    w_recon: float = 0.05  # genomic reconstruction weight (the paper text says 0.01)
    align_t: float = 5.0  # t in phi(F, C) = (1/t) logsumexp(t <F, c>)
    align_beta: float = 20.0  # beta in softplus(beta * (m -/+ delta))
    align_margin: float = 0.3  # m
    ortho_weight: float = 10.0  # weight of the orthogonality penalty inside the memory loss
    # the slot the commitment MSE pulls each patch toward (method.md, losses.commitment_loss): reference = the
    # authors' code (nearest slot of C_y by Euclidean distance to the raw slot vector, MSE against it, slot
    # detached); cosine = nearest by cosine, MSE against the unit slot, detached (before issue 13); moving /
    # moving_cosine = as reference / cosine but the slot is not detached (it also moves toward its patches). ema
    # and frozen slots are unit-norm buffers: all four coincide there (the patches move, the slots do not)
    commit_slot: Literal["reference", "cosine", "moving", "moving_cosine"] = "reference"


@dataclass
class TrainConfig:
    """Local optimisation."""

    epochs: int = 20  # epochs for centralised/single-site training
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 16.0  # gradient-norm clipping (the reference's "gc")
    balanced_sampling: bool = True  # class-balanced slide sampling
    patience: int = 5  # early stopping on validation AUC (epochs without improvement)
    seed: int = 0  # training seed
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast with fp32 master weights, or plain fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present
    threads: int = 0  # torch CPU threads (0 = torch default)
    progress: bool = True  # progress bars (shown only on a TTY)


@dataclass
class FederationConfig:
    """Rounds, sampling and server-side merging."""

    rounds: int = 10  # federated rounds
    local_epochs: int = 1  # local epochs per round
    local_steps: int = 0  # a site's optimiser steps per round, epoch after epoch (slides; 0 = local_epochs epochs)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # local lr across rounds: train.lr, or cosine decay
    lr_final_factor: float = 0.1  # cosine: the last round's lr is train.lr times this
    prox_mu: float = 0.0  # FedProx: (mu/2)*||w - w_global||^2 on the shared weights in every local step (0 = off)
    reset_optimizer: bool = False  # a site starts every round with a fresh AdamW (False: its state persists)
    fraction_train: float = 1.0  # fraction of sites sampled per round
    min_sites: int = 2  # minimum sites per round
    server_optimizer: Literal["fedavgm", "fedadam", "fedyogi"] = "fedavgm"  # server step on the averaged weights
    server_lr: float = 1.0  # server learning rate (FedAvgM: 1 = the average itself; FedAdam/FedYogi: eta)
    server_momentum: float = 0.0  # FedAvgM server momentum (0 = FedAvg; 0.9 at server_lr 1 overshoots, see benchmarks)
    server_beta1: float = 0.9  # FedAdam/FedYogi first-moment decay (Flower's default)
    server_beta2: float = 0.99  # FedAdam/FedYogi second-moment decay (Flower's default)
    server_tau: float = 1e-3  # FedAdam/FedYogi adaptivity (Flower's default)
    memory_momentum: float = 0.5  # ema mode: mu_s in C <- normalise(mu_s*C + (1-mu_s)*merged assigned means)
    slot_momentum: float = 0.0  # gradient mode: mu_s in C <- normalise(mu_s*C + (1-mu_s)*merged trained slots)
    shared: list[str] = field(  # state-dict key prefixes that leave a site (averaged)
        default_factory=lambda: ["histology_encoder.", "patch_proj.", "slide_proj.", "omics_encoder.", "omics_proj."]
    )
    paired_only: list[str] = field(  # shared prefixes averaged over paired (genomics-holding) sites only
        default_factory=lambda: ["omics_encoder.", "omics_proj."]
    )
    min_slot_count: int = 1  # a memory slot aggregate leaves a site only if it summarises >= this many slides
    # a site's personal_model.pt: the last round it evaluated, or its best round on its own validation split (noisy
    # where that split is small: benchmarks/README.md Run 6)
    personal_round: Literal["last", "best_validation"] = "last"
    client_cpus: float = 1.0  # simulation: CPUs per virtual client
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # train-reply weights dtype (16-bit: as updates)
    round_timeout: float = 3600.0  # seconds the server waits for replies in one round


@dataclass
class PrivacyConfig:
    """What leaves a site: minimum counts, differential privacy, reply validation, robust averaging, audit log."""

    enabled: bool = False  # differential privacy: per-slide clipped, noised memory sums/counts (ema mode), update noise
    min_slot_embeddings: int = 1  # a memory slot aggregate leaves a site only if it summarises >= this many embeddings
    clip_norm: float = 1.0  # C: L2 bound on one slide's whole memory contribution (all slot sums and counts together)
    noise_multiplier: float = 1.0  # sigma: Gaussian noise of std sigma*C on every released memory sum and count
    delta: float = 1e-5  # delta of the reported (epsilon, delta) guarantee
    update_clip_norm: float = 0.0  # C_w: the server clips each site's shared-weight update to this L2 norm (0 = off)
    update_noise_multiplier: float = 0.0  # z_w: with enabled, noise z_w*C_w/n on the mean of n clipped updates
    max_update_norm_factor: float = 20.0  # reject an update norm above this times the other sites' median (0 = off)
    update_norm_floor: float = 1e-3  # never reject an update whose L2 norm is at most this
    aggregator: Literal["mean", "median", "trimmed_mean"] = "mean"  # shared weights: slide-weighted mean, or robust
    trim_fraction: float = 0.2  # trimmed_mean: drop ceil(fraction*n) lowest and highest per coordinate (<= (n-1)//2)
    audit: bool = True  # each site appends what it sent per round to privacy_audit.jsonl in its state folder


@dataclass
class CalibrationConfig:
    """Calibrated probabilities and decision thresholds of the trained heads, fitted on validation (calibration.py)."""

    bins: int = 50  # equal-width bins over a head's score range for the validation histograms sites send (federated)
    # decision threshold on validation: Youden's J, or the most specific one meeting target_sensitivity
    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = 0.9  # with threshold: sensitivity, the lowest validation sensitivity accepted


@dataclass
class SiteConfig:
    """One hospital's local data (never sent)."""

    name: str = ""  # site name (unique)
    manifest: str = ""  # manifest CSV: case_id, slide_id, <label_column>, optional split
    features_dir: str = ""  # folder of TRIDENT or CLAM .h5 files (searched recursively for <slide_id>.h5)
    omics: str = ""  # genomics matrix (CSV/TSV/Parquet) or folder of <case_id>.npy; empty = histology-only site
    split_column: str = "split"  # manifest column with train/val/test (absent = patient-level split here)


@dataclass
class Config:
    """Everything a run needs. Load with :func:`load_config`."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sites: list[SiteConfig] = field(default_factory=list)

    def site(self, name: str) -> SiteConfig:
        """Return the site called ``name`` or raise ConfigError listing the known ones."""
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"sites: no site named {name!r}; known sites: {[s.name for s in self.sites]}")


# --------------------------------------------------------------------------------------------------------------
# Building from plain data, with checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints accepted for floats). Raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(str(k) if args[0] is str else k, args[0], f"{path}.{k}"): _coerce(v, args[1], f"{path}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build a checked :class:`Config` from nested plain data (e.g. parsed YAML); missing keys take defaults."""
    cfg = _build(Config, data or {})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.data.feature_dim <= 0:
        raise ConfigError(f"data.feature_dim: must be positive, got {cfg.data.feature_dim}")
    if cfg.data.knn_k < 0:
        raise ConfigError(f"data.knn_k: must be >= 0, got {cfg.data.knn_k}")
    bad = {k: v for k, v in cfg.data.label_map.items() if v not in (0, 1)}
    if bad:
        raise ConfigError(f"data.label_map: classes must be 0 or 1, got {bad}")
    if cfg.model.hidden_dim % cfg.model.heads:
        raise ConfigError(f"model.hidden_dim: {cfg.model.hidden_dim} is not divisible by model.heads={cfg.model.heads}")
    for key in ("kmeans_iters", "kmeans_refine_iters"):
        if getattr(cfg.memory, key) < 1:
            raise ConfigError(f"memory.{key}: must be >= 1, got {getattr(cfg.memory, key)}")
    if cfg.memory.kmeans_rounds < 0:
        raise ConfigError(f"memory.kmeans_rounds: must be >= 0, got {cfg.memory.kmeans_rounds}")
    if not 0.0 <= cfg.memory.momentum <= 1.0:
        raise ConfigError(f"memory.momentum: must be in [0, 1], got {cfg.memory.momentum}")
    for key in ("memory_momentum", "slot_momentum"):
        if not 0.0 <= getattr(cfg.federation, key) < 1.0:
            raise ConfigError(f"federation.{key}: must be in [0, 1), got {getattr(cfg.federation, key)}")
    fed = cfg.federation
    if fed.local_steps < 0:
        raise ConfigError(f"federation.local_steps: must be >= 0 (0 = whole local epochs), got {fed.local_steps}")
    if not 0.0 < fed.lr_final_factor <= 1.0:
        raise ConfigError(f"federation.lr_final_factor: must be in (0, 1], got {fed.lr_final_factor}")
    if fed.prox_mu < 0.0:
        raise ConfigError(f"federation.prox_mu: must be >= 0 (0 = no proximal term), got {fed.prox_mu}")
    if not (0.0 <= fed.server_beta1 < 1.0 and 0.0 <= fed.server_beta2 < 1.0 and fed.server_tau > 0.0):
        raise ConfigError("federation.server_beta1, server_beta2: must be in [0, 1) and federation.server_tau > 0, "
                          f"got {fed.server_beta1}, {fed.server_beta2}, {fed.server_tau}")
    if not 0.0 < cfg.split.val_fraction + cfg.split.test_fraction < 1.0:
        raise ConfigError("split.val_fraction + split.test_fraction: must be in (0, 1)")
    if cfg.calibration.bins < 2:
        raise ConfigError(f"calibration.bins: must be >= 2, got {cfg.calibration.bins}")
    if not 0.0 < cfg.calibration.target_sensitivity < 1.0:
        raise ConfigError(f"calibration.target_sensitivity: must be in (0, 1), got "
                          f"{cfg.calibration.target_sensitivity}")
    names = [s.name for s in cfg.sites]
    for i, s in enumerate(cfg.sites):
        if not s.name:
            raise ConfigError(f"sites[{i}].name: every site needs a name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sites: duplicate site names {dupes}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (defaults where absent), apply dotted ``overrides``, resolve site paths.

    Relative site paths in the YAML are resolved against the YAML file's folder.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        for s in data.get("sites") or []:
            if isinstance(s, dict):
                for k in ("manifest", "features_dir", "omics"):
                    v = s.get(k)
                    if isinstance(v, str) and v and not Path(v).is_absolute():
                        s[k] = str((p.parent / v).resolve())
    cfg = config_from_dict(data)
    if overrides:
        flat = to_flat(cfg)
        for k, v in overrides.items():
            if k not in flat:
                raise ConfigError(f"{k}: unknown key; allowed keys: {', '.join(sorted(flat))}")
            flat[k] = v
        cfg = from_flat(flat)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain data (YAML/JSON ready)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomic)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


# --------------------------------------------------------------------------------------------------------------
# Flower run-config (flat, dotted keys, scalar values)

_SCALARS = (bool, int, float, str)


def to_flat(cfg: Config) -> dict[str, bool | int | float | str]:
    """Flatten to ``{"section.key": scalar}``; lists/dicts and ``sites`` become JSON strings."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name == "sites":
            flat["sites"] = json.dumps([dataclasses.asdict(s) for s in section])
            continue
        for g in dataclasses.fields(section):
            v = getattr(section, g.name)
            flat[f"{f.name}.{g.name}"] = v if isinstance(v, _SCALARS) else json.dumps(v)
    return flat


def from_flat(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`to_flat`; unknown keys are rejected. Missing keys take defaults."""
    hints = typing.get_type_hints(Config)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key == "sites":
            nested["sites"] = json.loads(value) if isinstance(value, str) else value
            continue
        section, _, name = key.partition(".")
        if section not in hints or section == "sites" or not name:
            raise ConfigError(f"{key}: unknown run-config key; expected <section>.<key> with section in "
                              f"{', '.join(h for h in hints if h != 'sites')}")
        sec_hints = typing.get_type_hints(hints[section])
        if name not in sec_hints:
            raise ConfigError(f"{key}: unknown key; allowed keys in {section}: {', '.join(sec_hints)}")
        tp = sec_hints[name]
        if typing.get_origin(tp) in (list, dict) and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: expected JSON for a {typing.get_origin(tp).__name__}: {exc}") from exc
        nested.setdefault(section, {})[name] = value
    return config_from_dict(nested)
