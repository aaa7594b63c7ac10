"""The momkd-fed ClientApp: unpack the server's message, run the site's step, pack the reply.

Handlers (message types):

- ``train``: local training (:func:`client.local_round.train_round`); reply ``"arrays"`` (shared weights),
  ``"memory"`` (memory aggregates), ``"metrics"`` (contract train metrics), ``"site"``.
- ``evaluate``: histology-only test metrics of the global model (``"metrics"``) and of the personalised model
  (``"metrics-personal"``), and the global model's validation histograms (``"calibration"``, under the minimum
  count). Only aggregate metrics and those histograms leave the site, never per-slide outputs; the site's
  ``personal_model.pt`` stays in its state folder. The message's global
  weights and memory are cached: the next train message refers to them instead of carrying them again (a site
  without the cache replies ``"cache-miss"``, and the server resends in full).
- ``query.omics_moments``: genomic sums / sums of squares / count over the training cases.
- ``query.kmeans_seed`` / ``query.kmeans_step``: federated k-means statistics for the initial memory.

An exception in a handler becomes an error reply; the server logs it and aggregates the other sites. Each
handler notes its phases since the process started (:mod:`client.timings`) in the site's ``timings.jsonl``.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from momkd_fed.device import set_threads
from momkd_fed.federation import contract, kmeans

from . import records as R
from .local_round import GlobalModel, audit_reply, cached_kmeans_points, evaluate_round, kmeans_points, train_round
from .run_config import split_run_config
from .site_runtime import SiteRuntime, state_dir
from .site_state import load_global_cache, save_global_cache
from .timings import PhaseClock, mark_imported

log = logging.getLogger(__name__)

app = ClientApp()


def _site_logging() -> None:
    """Show this package's INFO lines (the round summary, where the personal model was written) in the ClientApp's
    output, which otherwise shows warnings only; once per process."""
    lg = logging.getLogger("client")
    if not any(getattr(h, "_momkd_site", False) for h in lg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._momkd_site = True  # type: ignore[attr-defined]
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)


def _runtime(context: Context) -> SiteRuntime:
    _site_logging()
    cfg, opts = split_run_config(context.run_config)
    if cfg.train.threads:
        set_threads(cfg.train.threads)
    elif "partition-id" in context.node_config:  # simulation: as many threads as CPUs given to a virtual client
        set_threads(max(1, int(cfg.federation.client_cpus)))
    return SiteRuntime.load(cfg, opts, context.node_config)


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(contract.CONFIG_RECORD, ConfigRecord())


def _global(msg: Message, cached: tuple[dict, object] | None = None) -> GlobalModel:
    """Unpack shared weights, memory, genomic statistics and round settings from a server message
    (``cached``: the shared weights and slots of a train message that refers to the site's cache)."""
    c = msg.content
    cfg = _config(msg)
    if cached is not None:
        shared, slots = cached
    else:
        shared = R.from_record(c.array_records[contract.ARRAYS_RECORD]) \
            if contract.ARRAYS_RECORD in c.array_records else {}
        slots = None
        if contract.MEMORY_RECORD in c.array_records:
            slots = R.from_record(c.array_records[contract.MEMORY_RECORD])[contract.SLOTS]
    mean = std = None
    if contract.OMICS_RECORD in c.array_records:
        stats = c.array_records[contract.OMICS_RECORD]
        mean, std = stats[R.NORM_KEYS[0]].numpy(), stats[R.NORM_KEYS[1]].numpy()
    return GlobalModel(shared=shared, slots=slots, omics_mean=mean, omics_std=std,
                       n_genes=int(cfg.get(R.CFG_N_GENES, 0)), round=int(cfg.get(contract.CFG_ROUND, 0)))


def _site(rt: SiteRuntime) -> ConfigRecord:
    n_genes = len(rt.data.genes) if rt.paired else 0
    return R.site_record(rt.name, rt.paired, n_genes, len(rt.data.split("train")), len(rt.data.split("test")))


def _state_dir(rt: SiteRuntime, context: Context, msg: Message):
    return state_dir(context.node_config, rt.opts, rt.site, rt.cfg, str(_config(msg).get(R.CFG_RUN_KEY, "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training."""
    clock = PhaseClock("train")
    rt = _runtime(context)
    clock.mark("loaded")
    cfg = _config(msg)
    sdir = _state_dir(rt, context, msg)
    cached = None
    if contract.CFG_CACHED_ROUND in cfg:  # the weights are those of the last evaluate message, cached here
        cached = load_global_cache(sdir, int(cfg[contract.CFG_CACHED_ROUND]))
        if cached is None:
            log.warning("site %s: no cached global model of round %s; asking for it in full", rt.name,
                        cfg[contract.CFG_CACHED_ROUND])
            miss = ConfigRecord({contract.CFG_CACHED_ROUND: int(cfg[contract.CFG_CACHED_ROUND])})
            return Message(RecordDict({contract.CACHE_MISS_RECORD: miss, R.SITE_RECORD: _site(rt)}), reply_to=msg)
    g = _global(msg, cached)
    lr = float(cfg.get(contract.CFG_LR, rt.cfg.train.lr))
    epochs = int(cfg.get(contract.CFG_LOCAL_EPOCHS, rt.cfg.federation.local_epochs))
    shared, memory, metrics = train_round(rt, g, sdir, lr, epochs, clock=clock)
    content = RecordDict({contract.ARRAYS_RECORD: R.to_record(shared, rt.cfg.federation.wire_dtype, g.shared),
                          contract.METRICS_RECORD: R.metrics_record(metrics), R.SITE_RECORD: _site(rt)})
    if memory:
        content[contract.MEMORY_RECORD] = R.to_record(memory)
    clock.write(sdir, g.round)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Histology-only test metrics of the global and the personalised model."""
    clock = PhaseClock("evaluate")
    rt = _runtime(context)
    clock.mark("loaded")
    g = _global(msg)
    sdir = _state_dir(rt, context, msg)
    save_global_cache(sdir, g.round, g.shared, g.slots)  # the next train message refers to it
    glob, pers, calibration = evaluate_round(rt, g, sdir)
    clock.mark("evaluated")
    content = RecordDict({contract.METRICS_RECORD: R.metrics_record(glob),
                          R.PERSONAL_METRICS_RECORD: R.metrics_record(pers),
                          contract.CALIBRATION_RECORD: R.to_record(calibration), R.SITE_RECORD: _site(rt)})
    clock.write(sdir, g.round)
    return Message(content, reply_to=msg)


@app.query(contract.QUERY_OMICS_MOMENTS)
def omics_moments(msg: Message, context: Context) -> Message:
    """Genomic moments of the training cases (count 0 at a histology-only site) and who this site is."""
    clock = PhaseClock(f"query.{contract.QUERY_OMICS_MOMENTS}")
    rt = _runtime(context)
    clock.mark("loaded")
    m = rt.moments()
    arrays = {"sum": m.sum.astype(np.float64), "sumsq": m.sumsq.astype(np.float64),
              "count": np.asarray([m.count], dtype=np.float64)}
    sdir = _state_dir(rt, context, msg)
    audit_reply(rt, sdir, 0, contract.QUERY_OMICS_MOMENTS, {contract.OMICS_RECORD: arrays})
    rec = R.to_record(arrays)
    clock.write(sdir, 0)
    return Message(RecordDict({contract.OMICS_RECORD: rec, R.SITE_RECORD: _site(rt)}), reply_to=msg)


@app.query(contract.QUERY_KMEANS_SEED)
def kmeans_seed(msg: Message, context: Context) -> Message:
    """Local spherical k-means of the initial patch projections, sent as cluster sums and counts."""
    clock = PhaseClock(f"query.{contract.QUERY_KMEANS_SEED}")
    rt = _runtime(context)
    clock.mark("loaded")
    sdir = _state_dir(rt, context, msg)
    points = kmeans_points(rt, _global(msg), sdir)
    sums, counts = kmeans.local_kmeans_seed(points, rt.cfg.memory.slots, rt.cfg.memory.kmeans_iters,
                                            seed=rt.cfg.train.seed, min_count=rt.cfg.federation.min_slot_count)
    audit_reply(rt, sdir, 0, contract.QUERY_KMEANS_SEED, {contract.KMEANS_RECORD: {contract.SUMS: sums,
                                                                                     contract.COUNTS: counts}})
    rec = R.to_record({contract.SUMS: sums, contract.COUNTS: counts})
    clock.write(sdir, 0)
    return Message(RecordDict({contract.KMEANS_RECORD: rec, R.SITE_RECORD: _site(rt)}), reply_to=msg)


@app.query(contract.QUERY_KMEANS_STEP)
def kmeans_step(msg: Message, context: Context) -> Message:
    """From the server's centroids, the message's number of local Lloyd iterations on the cached projections;
    reply per-centroid sums and counts."""
    clock = PhaseClock(f"query.{contract.QUERY_KMEANS_STEP}")
    rt = _runtime(context)
    clock.mark("loaded")
    sdir = _state_dir(rt, context, msg)
    points = cached_kmeans_points(rt, sdir)
    centroids = R.from_record(msg.content.array_records[contract.MEMORY_RECORD])[contract.SLOTS]
    iters = int(_config(msg).get(contract.CFG_KMEANS_ITERS, 1))
    sums, counts = kmeans.local_kmeans_stats(points, centroids, min_count=rt.cfg.federation.min_slot_count,
                                             iters=iters)
    audit_reply(rt, sdir, 0, contract.QUERY_KMEANS_STEP, {contract.KMEANS_RECORD: {contract.SUMS: sums,
                                                                                     contract.COUNTS: counts}})
    rec = R.to_record({contract.SUMS: sums, contract.COUNTS: counts})
    clock.write(sdir, 0)
    return Message(RecordDict({contract.KMEANS_RECORD: rec, R.SITE_RECORD: _site(rt)}), reply_to=msg)


mark_imported()  # last line: the imports of a fresh flwr-clientapp process end here
