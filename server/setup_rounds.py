"""Before round 1: who the sites are, the genomic z-score statistics, and one initial memory for everyone.

1. ``query.omics_moments`` to every site: each replies its name, whether it holds genomics, and per-gene sums,
   sums of squares and the case count over its *training* cases. The server pools them
   (``momkd_fed.data.omics.merge_moments``) into one mean/std per gene.
2. ``query.kmeans_seed`` then ``memory.kmeans_rounds`` x ``query.kmeans_step`` (``momkd_fed.federation.kmeans``):
   a federated spherical k-means of the patch projections under the initial encoder, each step running
   ``memory.kmeans_refine_iters`` Lloyd iterations at every site; its centroids are the initial memory, so slot j
   of class y is the same vector at every site. Set-up is 2 + ``kmeans_rounds`` message exchanges in all.

All replies are handled in site-name order (float sums independent of arrival order). A site whose setup reply
is an error is left out of the statistics and logged; setup fails only if nobody replied usefully.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from momkd_fed.config import Config
from momkd_fed.data.omics import OmicsMoments, merge_moments, moments_to_mean_std
from momkd_fed.errors import ConfigError
from momkd_fed.federation import contract, kmeans

from client import records as R

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The federation cannot start: no usable setup replies."""


@dataclass
class SiteRoster:
    """What setup learnt about the sites."""

    node_sites: dict[int, str]  # node id -> site name
    sites: dict[str, dict]  # site -> {"paired", "n_genes", "train_slides", "test_slides"}
    n_genes: int
    omics_mean: np.ndarray | None  # (G,)
    omics_std: np.ndarray | None  # (G,)


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    """Node ids once at least ``n`` are connected (sorted); TimeoutError after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {n} sites connected after {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def _query(grid: Grid, nodes: list[int], action: str, content: RecordDict, timeout: float) -> list[Message]:
    msgs = [Message(content=content, dst_node_id=n, message_type=f"{MessageType.QUERY}.{action}") for n in nodes]
    return sorted(grid.send_and_receive(msgs, timeout=timeout), key=R.reply_site)


def _good(replies: Iterable[Message], what: str) -> list[Message]:
    good = []
    for m in replies:
        if m.has_error():
            log.warning("setup %s: error reply from %s: %s", what, R.reply_site(m), m.error.reason)
        else:
            good.append(m)
    if not good:
        raise SetupError(f"setup {what}: no site replied without error (see the site logs)")
    return good


def roster(grid: Grid, nodes: list[int], cfg: Config, timeout: float, run_key: str) -> SiteRoster:
    """Step 1: site identities and pooled genomic statistics.

    Raises
    ------
    ConfigError
        Paired sites disagree on the number of genes.
    SetupError
        No usable reply.
    """
    content = RecordDict({contract.CONFIG_RECORD: ConfigRecord({R.CFG_RUN_KEY: run_key})})
    replies = _good(_query(grid, nodes, contract.QUERY_OMICS_MOMENTS, content, timeout), "omics_moments")
    node_sites, sites, moments = {}, {}, {}
    for m in replies:
        info = m.content.config_records[R.SITE_RECORD]
        name = str(info[R.SITE_NAME])
        node_sites[m.metadata.src_node_id] = name
        sites[name] = {"paired": bool(info[R.SITE_PAIRED]), "n_genes": int(info[R.SITE_GENES]),
                       "train_slides": int(info[R.SITE_TRAIN_SLIDES]), "test_slides": int(info[R.SITE_TEST_SLIDES])}
        rec = m.content.array_records[contract.OMICS_RECORD]
        count = int(rec["count"].numpy()[0])
        if count > 0:
            moments[name] = OmicsMoments(sum=rec["sum"].numpy(), sumsq=rec["sumsq"].numpy(), count=count)
    genes = {name: int(mo.sum.shape[0]) for name, mo in moments.items()}
    if len(set(genes.values())) > 1:
        raise ConfigError(f"data.gene_panel: paired sites hold different numbers of genes {genes} (fix: set the "
                          f"same data.gene_panel for the federation)")
    n_genes = next(iter(genes.values()), 0)
    mean = std = None
    if moments:
        mean, std = moments_to_mean_std(merge_moments([moments[s] for s in sorted(moments)]))
    log.info("setup: sites %s; %d paired, %d genes", sorted(sites), len(moments), n_genes)
    return SiteRoster(node_sites=node_sites, sites=sites, n_genes=n_genes, omics_mean=mean, omics_std=std)


def _stats(replies: list[Message]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for m in replies:
        t = R.from_record(m.content.array_records[contract.KMEANS_RECORD])
        out.append((t[contract.SUMS], t[contract.COUNTS]))
    return out


def initial_memory(grid: Grid, nodes: list[int], cfg: Config, shared: dict[str, torch.Tensor], n_genes: int,
                   run_key: str, timeout: float) -> torch.Tensor:
    """Step 2: federated spherical k-means; returns the (2, K, S) initial global memory."""
    config = ConfigRecord({contract.CFG_ROUND: 0, R.CFG_N_GENES: int(n_genes), R.CFG_RUN_KEY: run_key})
    seed_msg = RecordDict({contract.ARRAYS_RECORD: R.to_record(shared), contract.CONFIG_RECORD: config})
    seeds = _stats(_good(_query(grid, nodes, contract.QUERY_KMEANS_SEED, seed_msg, timeout), "kmeans_seed"))
    mem = cfg.memory
    centroids = kmeans.kmeans_seed(seeds, mem.slots, mem.kmeans_iters, seed=cfg.train.seed)  # (2, K, S)
    refine = ConfigRecord({**config, contract.CFG_KMEANS_ITERS: int(mem.kmeans_refine_iters)})
    for it in range(mem.kmeans_rounds):
        step_msg = RecordDict({contract.MEMORY_RECORD: R.to_record({contract.SLOTS: centroids}),
                               contract.CONFIG_RECORD: refine})
        stats = _stats(_good(_query(grid, nodes, contract.QUERY_KMEANS_STEP, step_msg, timeout), "kmeans_step"))
        new, counts = kmeans.kmeans_update(centroids, stats)
        moved = float((new - centroids).norm(dim=-1).max())
        centroids = new
        log.info("setup: k-means refine %d/%d (%d local iterations per site), largest centroid move %.2e, empty "
                 "slots %d", it + 1, mem.kmeans_rounds, mem.kmeans_refine_iters, moved, int((counts == 0).sum()))
        if moved < 1e-6:
            break
    return centroids
