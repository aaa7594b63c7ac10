"""The reply contract between the server and the sites, defined once (plain Python and numpy; no flwr).

Messages (Flower ``RecordDict``), by record name:

Server -> site (train, evaluate):
    ``"arrays"`` (ArrayRecord)   shared weights, state-dict keys of the shared group (``sharing.partition_state``);
                                 without the paired-only keys for a histology-only site.
    ``"memory"`` (ArrayRecord)   ``{"slots": (2, K, S)}`` the global memory.
    ``"config"`` (ConfigRecord)  keys in :data:`CONFIG_KEYS`.
    A train message to a site that acknowledged the previous round's evaluate message carries neither
    ``"arrays"`` nor ``"memory"`` but :data:`CFG_CACHED_ROUND` (the same tensors, cached by the site); a site
    without that cache replies :data:`CACHE_MISS_RECORD` and is sent the message in full.

Site -> server, train reply:
    ``"arrays"`` (ArrayRecord)   the site's trained shared weights (same keys; a histology-only site may omit the
                                 paired-only keys).
    ``"memory"`` (ArrayRecord)   ``ema`` mode: :data:`EMA_MEMORY_KEYS` = sums (2,K,S), counts (2,K), slides (2,K);
                                 ``gradient`` mode: :data:`GRADIENT_MEMORY_KEYS` = slots (2,K,S), usage (2,K),
                                 slides (2,K); absent in ``frozen`` mode.
    ``"metrics"`` (MetricRecord) exactly :data:`TRAIN_METRIC_KEYS`.

Site -> server, evaluate reply:
    ``"metrics"`` (MetricRecord)            exactly :data:`EVALUATE_METRIC_KEYS`: the *global* model's test
                                            metrics, and its validation metrics, from which the server picks the
                                            best round.
    ``"metrics-personal"`` (MetricRecord)   :data:`PERSONAL_METRICS_RECORD`, exactly :data:`PERSONAL_METRIC_KEYS`:
                                            the same for the personalised model (global shared weights + the
                                            site's private head and temperature) of this round, plus the round,
                                            validation and test AUC of the site's ``personal_model.pt`` (the round
                                            ``federation.personal_round`` keeps; the file stays there).
    ``"calibration"`` (ArrayRecord)         :data:`CALIBRATION_RECORD`: for each head the global model trained
                                            (``heads.global_model_heads``), the (2, B) class-conditional counts of
                                            the global model's raw validation scores on the fixed bin edges of
                                            ``calibration.edges_for`` (B = ``calibration.bins``), runs of bins
                                            merged under ``federation.min_slot_count`` (:func:`check_calibration`).
                                            The only per-round statistic beyond aggregate metrics; the server pools
                                            it into the global model's calibration. Recorded in the site's audit
                                            log.

Every site reply (train, evaluate, queries) also carries the ``"site"`` ConfigRecord (:data:`SITE_RECORD`, keys
:data:`SITE_KEYS`): who replied (node ids are not stable across restarts).

Queries (before round 1, see ``kmeans``): :data:`QUERY_KMEANS_SEED` (server sends ``"arrays"``; reply
``"kmeans"`` with :data:`KMEANS_KEYS` = the sums (2,K,S) and counts (2,K) of the site's own K local clusters per
class), :data:`QUERY_KMEANS_STEP` (server sends ``"memory"`` slots and :data:`CFG_KMEANS_ITERS`; reply
``"kmeans"`` with the sums and counts of the points assigned to each slot after that many local Lloyd
iterations), :data:`QUERY_OMICS_MOMENTS` (reply ``"omics"`` with the genomic moments of ``momkd_fed.data.omics``: :data:`MOMENT_KEYS`). Server -> site train messages carry the
federation's z-score statistics in ``"omics"`` under :data:`NORM_KEYS`.

Flower's built-in strategies need exactly one ArrayRecord and one MetricRecord per reply, the same metric keys
from every site and a scalar ``num-examples``: every site therefore sends every metric key, NaN where a value is
undefined (e.g. a one-class validation split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

# ---- record names ------------------------------------------------------------------------------------------------
ARRAYS_RECORD = "arrays"  # shared weights (Flower's default arrayrecord_key)
MEMORY_RECORD = "memory"  # global memory (server -> site) or memory aggregates (site -> server)
METRICS_RECORD = "metrics"  # MetricRecord of a reply
CONFIG_RECORD = "config"  # ConfigRecord of a server message (Flower's default configrecord_key)
KMEANS_RECORD = "kmeans"  # k-means statistics of a query reply
OMICS_RECORD = "omics"  # genomic moments (query reply, MOMENT_KEYS) or z-score statistics (server, NORM_KEYS)
SITE_RECORD = "site"  # ConfigRecord of every site reply: SITE_KEYS
PERSONAL_METRICS_RECORD = "metrics-personal"  # evaluate reply: the personalised model's test metrics
CALIBRATION_RECORD = "calibration"  # evaluate reply: validation histograms of the global model's trained heads

# ---- "site" record keys (site -> server) -------------------------------------------------------------------------
SITE_NAME = "name"  # str
SITE_PAIRED = "paired"  # bool: the site holds genomics
SITE_GENES = "n-genes"  # int: genes of the site's genomic matrix (0 = histology-only)
SITE_TRAIN_SLIDES = "train-slides"  # int
SITE_TEST_SLIDES = "test-slides"  # int
SITE_KEYS = (SITE_NAME, SITE_PAIRED, SITE_GENES, SITE_TRAIN_SLIDES, SITE_TEST_SLIDES)

# ---- "omics" record keys -----------------------------------------------------------------------------------------
MOMENT_KEYS = ("sum", "sumsq", "count")  # site -> server: (G,), (G,), (1,) float64 over the training cases
NORM_KEYS = ("mean", "std")  # server -> site: (G,), (G,) float32 pooled z-score statistics

# ---- memory record keys ------------------------------------------------------------------------------------------
SLOTS = "slots"  # (2, K, S) slot vectors (global memory, or a site's trained slots in gradient mode)
SUMS = "sums"  # (2, K, S) sums of the embeddings assigned to each slot (ema mode, k-means step)
COUNTS = "counts"  # (2, K) number of embeddings summed per slot
SLIDES = "slides"  # (2, K) number of distinct slides behind each slot aggregate (checked against min_slot_count)
USAGE = "usage"  # (2, K) per-slot usage count weighting a site's trained slots (gradient mode)
EMA_MEMORY_KEYS = (SUMS, COUNTS, SLIDES)
GRADIENT_MEMORY_KEYS = (SLOTS, USAGE, SLIDES)
MEMORY_KEYS_BY_MODE = {"ema": EMA_MEMORY_KEYS, "gradient": GRADIENT_MEMORY_KEYS, "frozen": ()}
KMEANS_KEYS = (SUMS, COUNTS)  # k-means query replies (seed and step)

# ---- config record keys (server -> site) -------------------------------------------------------------------------
CFG_ROUND = "server-round"  # int, 1-based round (0 = before round 1)
CFG_LR = "lr"  # float, local learning rate for this round
CFG_LOCAL_EPOCHS = "local-epochs"  # int, local epochs this round
CFG_MEMORY_UPDATE = "memory-update"  # str, "gradient" | "ema" | "frozen"
CFG_N_GENES = "n-genes"  # int, genes of the federation's genomic branch (0 = none)
CFG_RUN_KEY = "run-key"  # str, identifies the run across a resume (a site keys its private state by it)
CONFIG_KEYS = (CFG_ROUND, CFG_LR, CFG_LOCAL_EPOCHS, CFG_MEMORY_UPDATE, CFG_N_GENES, CFG_RUN_KEY)
CFG_CACHED_ROUND = "cached-round"  # int, train messages only, optional: the message carries no "arrays" / "memory";
# they are those of this round's evaluate message, which the site cached (client/site_state.py)
CACHE_MISS_RECORD = "cache-miss"  # ConfigRecord of a train reply {CFG_CACHED_ROUND: r}: the site lacks round r's
# cached weights (nothing trained); the server resends the message in full
CFG_KMEANS_ITERS = "kmeans-iters"  # int, kmeans_step queries only: Lloyd iterations the site runs from the sent
# slots on its own points before it replies (1, or absent: the sums/counts of one exact federated Lloyd step)

# ---- query names (Python identifiers: Flower custom actions) -----------------------------------------------------
QUERY_KMEANS_SEED = "kmeans_seed"
QUERY_KMEANS_STEP = "kmeans_step"
QUERY_OMICS_MOMENTS = "omics_moments"

# ---- metrics -----------------------------------------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # number of training slides (not batches); Flower's weighting key
PAIRED = "paired"  # 1 if the site holds genomics (its genomic encoder was trained), else 0
LOSS_TERMS = ("total", "ce", "mem", "commit", "ortho", "align_omics", "align_wsi", "recon")  # the engine's named
# loss breakdown (``LossBreakdown.as_floats()``; mem = commit + ortho_weight * ortho)
LOSS_KEYS = tuple(f"loss_{t}" for t in LOSS_TERMS)  # mean per training slide over the round
VAL_AUC = "val_auc"  # histology-only validation AUC (classifier head); NaN for a one-class split
VAL_AUC_MEMORY = "val_auc_memory"  # validation AUC of the head-free memory score delta(F_wsi)
TRAIN_SECONDS = "train_seconds"  # wall seconds of local training
PRIVACY_EPSILON = "privacy_epsilon"  # the site's cumulated memory-DP epsilon (privacy.delta); NaN without memory DP
TRAIN_METRIC_KEYS = (NUM_EXAMPLES, PAIRED, *LOSS_KEYS, VAL_AUC, VAL_AUC_MEMORY, TRAIN_SECONDS,
                     PRIVACY_EPSILON)

TEST_AUC = "test_auc"  # histology-only test AUC (classifier head); NaN for a one-class split
TEST_AUC_MEMORY = "test_auc_memory"  # test AUC of the memory score
TEST_LOSS = "test_loss"  # mean test cross-entropy
VAL_SLIDES = "val_slides"  # validation slides scored (the weight of VAL_AUC / VAL_AUC_MEMORY in the pooled mean)
EVALUATE_METRIC_KEYS = (NUM_EXAMPLES, TEST_AUC, TEST_AUC_MEMORY, TEST_LOSS, VAL_SLIDES, VAL_AUC, VAL_AUC_MEMORY)
PERSONAL_FILE_ROUND = "personal_file_round"  # round of the site's personal_model.pt (0 = not written yet)
PERSONAL_FILE_VAL_AUC = "personal_file_val_auc"  # its validation AUC (classifier): what the site chose it by
PERSONAL_FILE_TEST_AUC = "personal_file_test_auc"  # its test AUC (classifier, the file's primary head)
PERSONAL_METRIC_KEYS = (*EVALUATE_METRIC_KEYS, PERSONAL_FILE_ROUND, PERSONAL_FILE_VAL_AUC, PERSONAL_FILE_TEST_AUC)
METRIC_KEYS = {"train": TRAIN_METRIC_KEYS, "evaluate": EVALUATE_METRIC_KEYS, "personal": PERSONAL_METRIC_KEYS}
_INT_KEYS = (NUM_EXAMPLES, PAIRED, VAL_SLIDES, PERSONAL_FILE_ROUND)


def _check_metrics(values: Mapping[str, float], keys: tuple[str, ...], what: str) -> dict[str, float]:
    missing = [k for k in keys if k not in values]
    extra = [k for k in values if k not in keys]
    if missing or extra:
        raise KeyError(f"{what} metrics: missing {missing}, unknown {extra}; the contract is {list(keys)}")
    out: dict[str, float] = {}
    for k in keys:
        v = values[k]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{what} metrics: {k!r} must be a number, got {type(v).__name__}")
        out[k] = int(v) if k in _INT_KEYS else float(v)
    for k in (NUM_EXAMPLES, VAL_SLIDES, PERSONAL_FILE_ROUND):
        if k in out and out[k] < 0:
            raise ValueError(f"{what} metrics: {k} must be >= 0, got {out[k]}")
    return out


def train_metrics(
    num_examples: int,
    paired: bool,
    losses: Mapping[str, float],
    val_auc: float = math.nan,
    val_auc_memory: float = math.nan,
    train_seconds: float = math.nan,
    privacy_epsilon: float = math.nan,
) -> dict[str, float]:
    """Build a train-reply metric dict with exactly :data:`TRAIN_METRIC_KEYS`.

    Parameters
    ----------
    num_examples : int
        Training slides seen this round (Flower's weighting key; not batches).
    paired : bool
        Whether the site holds genomics.
    losses : mapping
        The loss breakdown keyed by :data:`LOSS_TERMS` (a term absent from the breakdown, e.g. ``align_omics`` at
        a histology-only site, must be given as 0.0 or NaN explicitly).
    privacy_epsilon : float
        The site's cumulated memory-DP epsilon after this round's release; NaN when memory DP is off (every site
        sends the key either way).

    Raises
    ------
    KeyError
        If a loss term is missing or unknown.
    """
    unknown = [t for t in losses if t not in LOSS_TERMS]
    missing = [t for t in LOSS_TERMS if t not in losses]
    if unknown or missing:
        raise KeyError(f"loss breakdown: missing {missing}, unknown {unknown}; the contract is {list(LOSS_TERMS)}")
    values = {NUM_EXAMPLES: num_examples, PAIRED: int(bool(paired)), VAL_AUC: val_auc,
              VAL_AUC_MEMORY: val_auc_memory, TRAIN_SECONDS: train_seconds, PRIVACY_EPSILON: privacy_epsilon}
    values.update({f"loss_{t}": float(v) for t, v in losses.items()})
    return _check_metrics(values, TRAIN_METRIC_KEYS, "train")


def evaluate_metrics(
    num_examples: int, test_auc: float, test_auc_memory: float, test_loss: float,
    val_slides: int, val_auc: float, val_auc_memory: float,
) -> dict[str, float]:
    """Build an evaluate-reply metric dict with exactly :data:`EVALUATE_METRIC_KEYS`.

    ``num_examples`` counts the test slides (Flower's weighting key), ``val_slides`` the validation slides."""
    values = {NUM_EXAMPLES: num_examples, TEST_AUC: test_auc, TEST_AUC_MEMORY: test_auc_memory, TEST_LOSS: test_loss,
              VAL_SLIDES: val_slides, VAL_AUC: val_auc, VAL_AUC_MEMORY: val_auc_memory}
    return _check_metrics(values, EVALUATE_METRIC_KEYS, "evaluate")


def personal_metrics(model: Mapping[str, float], file_round: int, file_val_auc: float,
                     file_test_auc: float) -> dict[str, float]:
    """Build the ``"metrics-personal"`` dict: the personalised model's :func:`evaluate_metrics` (``model``) and the
    round, validation AUC and test AUC of the site's ``personal_model.pt``; exactly :data:`PERSONAL_METRIC_KEYS`."""
    values = {**model, PERSONAL_FILE_ROUND: file_round, PERSONAL_FILE_VAL_AUC: file_val_auc,
              PERSONAL_FILE_TEST_AUC: file_test_auc}
    return _check_metrics(values, PERSONAL_METRIC_KEYS, "personal")


def check_metrics(values: Mapping[str, float], kind: str) -> dict[str, float]:
    """Check a received metric dict against the contract for ``kind`` ("train", "evaluate" or "personal")."""
    return _check_metrics(values, METRIC_KEYS[kind], kind)


def check_calibration(arrays: Mapping[str, np.ndarray], heads: tuple[str, ...] | list[str], n_bins: int,
                      val_slides: int) -> dict[str, np.ndarray]:
    """Check a received :data:`CALIBRATION_RECORD`: exactly ``heads``, each (2, ``n_bins``), finite, >= 0, summing
    to at most the site's ``val_slides``. Returns float64 copies.

    Raises
    ------
    KeyError, ValueError
        Naming the head and what is wrong.
    """
    missing = [h for h in heads if h not in arrays]
    extra = [h for h in arrays if h not in heads]
    if missing or extra:
        raise KeyError(f"calibration record: missing heads {missing}, unknown {extra}; expected {list(heads)}")
    out = {}
    for h in heads:
        a = np.asarray(arrays[h], dtype=np.float64)
        if a.shape != (2, int(n_bins)):
            raise ValueError(f"calibration record: {h!r} has shape {a.shape}, expected (2, {n_bins})")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"calibration record: {h!r} holds negative or non-finite counts")
        if a.sum() > val_slides + 1e-6:
            raise ValueError(f"calibration record: {h!r} counts {a.sum():.6g} slides, the site has {val_slides} "
                             f"validation slides")
        out[h] = a
    return out


# ---- numpy <-> torch ---------------------------------------------------------------------------------------------
def to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Flatten a tensor dict into contiguous CPU numpy arrays (for ``ArrayRecord``), keys and order kept.

    bfloat16 tensors (numpy has no bf16) are sent as float32.
    """
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[k] = np.asarray(t.numpy(), order="C")  # keeps 0-d tensors 0-d
    return out


def from_numpy(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_numpy`: numpy arrays -> CPU tensors (copies, writable)."""
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in arrays.items()}
