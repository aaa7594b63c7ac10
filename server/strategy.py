"""The momkd-fed strategy: Flower's FedAvgM, extended with the memory, paired-only averaging and site names.

It keeps FedAvgM's role and hooks (``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate``, weighting by ``num-examples``, error replies logged and the rest aggregated) and changes
what Flower's built-in cannot do:

- messages also carry the global memory (``"memory"``), the genomic statistics (``"omics"``) and the run's
  settings (``n-genes``, ``run-key``) in the ConfigRecord; a histology-only site is sent neither the paired-only
  weights (the genomic encoder) nor the genomic statistics: it never uses them (a site whose kind is not known yet
  is sent everything); a train message carries no weights or memory for a site that acknowledged the previous
  round's evaluate message, which carried the same tensors and which the site cached (``split_cache_misses``
  resends in full to a site that lost its cache): one copy of the model per site per round instead of two;
- replies carry a second ArrayRecord (memory aggregates), which Flower's built-in aggregation rejects
  (``InconsistentMessageReplies``): it is taken out and merged with ``momkd_fed.federation.memory_merge``;
- shared weights are averaged by ``momkd_fed.federation.aggregate`` (the genomic encoder over paired sites only;
  a histology-only site does not send it) and stepped with the same FedAvgM momentum rule as Flower's
  (``FedAvgMState``) or with Flower's FedAdam / FedYogi (``server_opt``, ``federation.server_optimizer``),
  checkpointed with the model;
- the local learning rate of each round follows ``federation.lr_schedule`` (``federation.schedule.round_lr``);
- sites are sampled deterministically per round (seeded by ``train.seed`` and the round, over site names), so a
  resumed run samples exactly what the uninterrupted one would have;
- replies are sorted by site name before averaging, so float sums do not depend on arrival order;
- privacy (``momkd_fed.privacy``): every train reply is validated (``validate_replies``: the contract, update
  norms, memory plausibility -- a rejected reply is logged with its site and reason, recorded in
  ``RoundInfo.rejected`` and left out while the round goes on); the shared weights are combined by
  ``make_aggregator(cfg)`` (mean, median, trimmed mean, or the clipped DP mean) before the FedAvgM step; with
  update DP a server ``PrivacyAccountant`` (``ServerState.accountant``, checkpointed) is stepped once per round.

Privacy report of a round (``RoundInfo.privacy``, written to ``rounds.jsonl``): ``epsilon_by_site`` (each site's
cumulated memory-DP epsilon as it last reported it in ``privacy_epsilon``), ``epsilon`` (their maximum; with update
DP alone, the update epsilon), ``epsilon_update`` (the server's shared-weight epsilon, update DP only), ``delta``
and ``covers`` (``dp_covers``). The memory epsilon is per slide of a site, the update epsilon per whole site: two
separate guarantees, not composed into one number here.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM

from momkd_fed.config import Config
from momkd_fed.federation import contract
from momkd_fed.federation.aggregate import SharedUpdate
from momkd_fed.federation.memory_merge import (MemoryAggregate, SlotUsage, merge_memory, merge_memory_slots,
                                               server_memory_momentum)
from momkd_fed.federation.replies import SiteReply
from momkd_fed.federation.schedule import round_lr
from momkd_fed.federation.sharing import histology_only_part, paired_only_keys
from momkd_fed.heads import TRAINED, global_model_heads
from momkd_fed.privacy import dp_covers, make_aggregator, memory_dp, update_dp, validate_replies

from client import records as R
from .run_outputs import ServerState

log = logging.getLogger(__name__)


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower metric-aggregation hook: per key, the ``weight_key``-weighted mean over replies where it is finite.

    (Flower's default propagates a NaN from one site, e.g. a one-class validation split, to the whole round.)
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rd in records:
        rec = next(iter(rd.metric_records.values()))
        w = float(rec[weight_key])
        for k, v in rec.items():
            if k == weight_key or isinstance(v, list) or not math.isfinite(float(v)) or w <= 0:
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    keys = {k for rd in records for k in next(iter(rd.metric_records.values())) if k != weight_key}
    return MetricRecord({k: (sums[k] / weights[k] if weights.get(k, 0.0) > 0 else math.nan) for k in sorted(keys)})


def _np(tensors: dict) -> dict:
    """Tensors -> numpy arrays (the memory dataclasses' ``from_arrays`` take record contents)."""
    return {k: v.numpy() for k, v in tensors.items()}


@dataclass
class RoundInfo:
    """What one round did, for ``rounds.jsonl``."""

    sampled: list[str] = field(default_factory=list)
    train: dict[str, dict] = field(default_factory=dict)  # site -> train metrics
    evaluate: dict[str, dict] = field(default_factory=dict)  # site -> {"global": ..., "personal": ...}
    bytes_sent: dict[str, int] = field(default_factory=dict)  # site -> bytes of arrays sent to it
    bytes_received: dict[str, int] = field(default_factory=dict)  # site -> bytes of arrays it sent back
    dropouts: list[dict] = field(default_factory=list)  # {"site", "phase", "reason"}
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its (non-error) train reply was rejected
    privacy: dict = field(default_factory=dict)  # epsilon, epsilon_by_site, delta, covers (module docstring)
    train_aggregate: dict = field(default_factory=dict)
    evaluate_aggregate: dict = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)  # site -> head -> (2, B) validation counts
    memory: dict = field(default_factory=dict)
    frozen_keys: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class MomkdFedAvgM(FedAvgM):
    """FedAvgM over the shared weights plus the federated memory (see the module docstring).

    Parameters
    ----------
    cfg : Config
        The run's config (sampling, momentum, memory mode, sharing policy).
    state : ServerState
        The server's state; updated in place by :meth:`aggregate_train`.
    node_sites : dict[int, str]
        Node id -> site name, learnt at setup (refreshed from every reply).
    """

    def __init__(self, cfg: Config, state: ServerState, node_sites: dict[int, str]) -> None:
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_sites,
                         min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites,
                         train_metrics_aggr_fn=nan_weighted_mean, evaluate_metrics_aggr_fn=nan_weighted_mean,
                         server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)
        self.cfg = cfg
        self.state = state
        self.node_sites = node_sites
        self.info = RoundInfo()
        self.has_memory = state.slots is not None
        self.memory_mode = cfg.memory.update if self.has_memory else "frozen"
        self.memory_noised = self.memory_mode == "ema" and memory_dp(cfg)
        self.aggregator = make_aggregator(cfg)
        self.calibrated_heads = [h for h, st in global_model_heads(cfg).items() if st == TRAINED]  # histograms sent
        self.cached: dict[str, int] = {}  # site -> round of the global model it cached (acknowledged evaluate)

    # ---------------------------------------------------------------------------------------------------------
    # messages

    def _sample(self, server_round: int, grid: Grid, fraction: float, salt: int) -> list[int]:
        """Deterministic sample of connected nodes: ``max(int(n * fraction), min_sites)`` of them."""
        deadline = time.monotonic() + self.cfg.federation.round_timeout
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} sites connected, federation.min_sites="
                                   f"{self.min_available_nodes}")
            time.sleep(1.0)
        nodes = sorted(nodes, key=lambda n: (self.node_sites.get(n, "~"), n))
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_train_nodes))
        rng = random.Random(self.cfg.train.seed * 100_003 + server_round * 31 + salt)
        return sorted(rng.sample(nodes, size), key=lambda n: (self.node_sites.get(n, "~"), n))

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({contract.CFG_ROUND: server_round, contract.CFG_LR: round_lr(self.cfg, server_round),
                             contract.CFG_LOCAL_EPOCHS: int(self.cfg.federation.local_epochs),
                             contract.CFG_MEMORY_UPDATE: self.memory_mode, R.CFG_N_GENES: int(self.state.n_genes),
                             R.CFG_RUN_KEY: self.state.run_key})

    def _content(self, server_round: int, with_omics: bool, paired: bool, cached: bool = False) -> RecordDict:
        """What a site is sent; ``paired=False``: without the paired-only weights and the genomic statistics;
        ``cached``: without weights and memory, which the site holds from round ``server_round - 1``'s evaluate
        message (``contract.CFG_CACHED_ROUND``)."""
        config = self._config(server_round)
        content = RecordDict({contract.CONFIG_RECORD: config})
        if cached:
            config[contract.CFG_CACHED_ROUND] = server_round - 1
        else:
            shared = self.state.shared if paired else histology_only_part(self.state.shared, self.cfg.federation)
            content[contract.ARRAYS_RECORD] = R.to_record(shared)
            if self.state.slots is not None:
                content[contract.MEMORY_RECORD] = R.to_record({contract.SLOTS: self.state.slots})
        if paired and with_omics and self.state.omics_mean is not None and self.state.omics_std is not None:
            content[contract.OMICS_RECORD] = R.to_record({R.NORM_KEYS[0]: self.state.omics_mean,
                                                          R.NORM_KEYS[1]: self.state.omics_std})
        return content

    def _paired(self, node: int) -> bool:
        """Whether the node's site holds genomics (True while unknown: it is then sent everything)."""
        return bool(self.state.sites.get(self.node_sites.get(node, ""), {}).get("paired", True))

    def _holds_cache(self, node: int, server_round: int, message_type: str) -> bool:
        """Whether a train message to ``node`` may refer to the site's cached global model of the last round."""
        site = self.node_sites.get(node)
        return message_type == MessageType.TRAIN and site is not None and self.cached.get(site) == server_round - 1

    def _messages(self, server_round: int, with_omics: bool, nodes: list[int], message_type: str,
                  full: bool = False, append: bool = False) -> list[Message]:
        """Messages to ``nodes``, one content per (paired, holds the cache) group; ``full``: never refer to a
        cache; ``append``: keep the messages already sent this phase (error replies are matched against them)."""
        if not append:
            self._sent = []
        out: list[Message] = []
        for paired in (True, False):
            for cached in (False, True):
                group = [n for n in nodes if self._paired(n) == paired
                         and (not full and self._holds_cache(n, server_round, message_type)) == cached]
                if not group:
                    continue
                content = self._content(server_round, with_omics, paired, cached)
                size = R.record_bytes(content)
                for n in group:
                    site = self.node_sites.get(n, f"node-{n}")
                    self.info.bytes_sent[site] = self.info.bytes_sent.get(site, 0) + size
                out += list(self._construct_messages(content, group, message_type))  # the grid sets their ids
        self._sent += out
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Messages for this round's sampled sites: shared weights, memory, genomic statistics, settings.

        ``arrays`` and ``config`` (Flower's arguments) are ignored: the state is in ``self.state``.
        """
        self.info = RoundInfo()
        nodes = self._sample(server_round, grid, self.cfg.federation.fraction_train, salt=0)
        self.info.sampled = [self.node_sites.get(n, f"node-{n}") for n in nodes]
        log.info("round %d: training at %s", server_round, self.info.sampled)
        return self._messages(server_round, True, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Evaluation messages to every connected site (shared weights, memory, settings)."""
        nodes = self._sample(server_round, grid, 1.0, salt=1)
        return self._messages(server_round, False, nodes, MessageType.EVALUATE)

    def split_cache_misses(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Message],
                                                                                        list[Message]]:
        """Train replies -> (the answers, full train messages for the sites that lacked the cached model).

        A site replies ``contract.CACHE_MISS_RECORD`` (having trained nothing) when a train message refers to a
        cached global model it does not hold (lost state folder, another machine); it is sent the weights now.
        """
        kept, missed = [], []
        for msg in replies:
            if msg.has_content() and contract.CACHE_MISS_RECORD in msg.content.config_records:
                site = self._site(msg)
                self._received(msg, site)
                self.cached.pop(site, None)
                missed.append(msg.metadata.src_node_id)
            else:
                kept.append(msg)
        if not missed:
            return kept, []
        log.warning("round %d: %s lacked the cached global model; sending it in full", server_round,
                    [self.node_sites.get(n, f"node-{n}") for n in missed])
        return kept, self._messages(server_round, True, missed, MessageType.TRAIN, full=True, append=True)

    # ---------------------------------------------------------------------------------------------------------
    # replies

    def _received(self, msg: Message, site: str) -> None:
        if msg.has_content():
            self.info.bytes_received[site] = self.info.bytes_received.get(site, 0) + R.record_bytes(msg.content)

    def _site(self, msg: Message) -> str:
        """Site of a reply: its "site" record, else what setup learnt about its node."""
        if msg.has_content():
            site = R.reply_site(msg)
            self.node_sites[msg.metadata.src_node_id] = site
            return site
        for sent in getattr(self, "_sent", []):  # an error made by the SuperLink (e.g. Node Unavailable)
            if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                return self.node_sites.get(sent.metadata.dst_node_id, f"node-{sent.metadata.dst_node_id}")
        return self.node_sites.get(msg.metadata.src_node_id, R.reply_site(msg))

    def _unpack_train(self, msg: Message) -> SiteReply:
        site = self._site(msg)
        self._received(msg, site)
        if msg.has_error():
            return SiteReply(site=site, error=f"{msg.error.code}: {msg.error.reason}")
        c = msg.content
        memory = R.from_record(c.array_records[contract.MEMORY_RECORD]) if contract.MEMORY_RECORD in c.array_records \
            else {}
        metrics = dict(c.metric_records[contract.METRICS_RECORD]) if contract.METRICS_RECORD in c.metric_records \
            else {}
        shared = R.from_record(c.array_records[contract.ARRAYS_RECORD], base=self.state.shared) \
            if contract.ARRAYS_RECORD in c.array_records \
            else {}
        return SiteReply(site=site, shared=shared, memory=memory, metrics=metrics)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the shared weights (paired-only keys over paired sites), FedAvgM step, merge the memory.

        Updates ``self.state`` (shared, slots, momentum, round) and ``self.info``; returns the new shared
        weights and the aggregated train metrics, or (None, None) when no reply was usable.
        """
        replies = sorted((self._unpack_train(m) for m in replies), key=lambda r: r.site)
        st = self.state
        po = paired_only_keys(st.shared, self.cfg.federation)
        shape = tuple(st.slots.shape) if st.slots is not None else None
        kept, dropped = validate_replies(replies, st.shared, self.memory_mode, po, shape, self.cfg.privacy,
                                         self.memory_noised)
        errors = {r.site for r in replies if r.error is not None}
        for site, why in dropped:
            log.warning("round %d: dropping the train reply of %s: %s", server_round, site, why)
            self.info.dropouts.append({"site": site, "phase": "train", "reason": why})
            if site not in errors:
                self.info.rejected[site] = why
        self.info.train = {r.site: contract.check_metrics(r.metrics, "train") for r in kept}
        self._record_epsilon(replies)
        self.info.privacy = privacy_report(self.cfg, st)
        if not kept:
            return None, None
        avg = self.aggregator.aggregate(st.shared, [SharedUpdate(r.site, r.shared, r.num_examples, r.paired)
                                                    for r in kept], po)
        if st.accountant is not None:
            st.accountant.step(1, self.cfg.privacy.update_noise_multiplier)
            self.info.privacy = privacy_report(self.cfg, st)
        st.shared = st.momentum.step(st.shared, avg.weights, avg.frozen, server_round=server_round)
        self.info.frozen_keys = len(avg.frozen)
        if st.slots is not None and self.memory_mode != "frozen":
            mu = server_memory_momentum(self.cfg.federation, self.memory_mode)
            floor = self.cfg.federation.min_slot_count
            if self.memory_mode == "ema":
                st.slots, merge = merge_memory(st.slots, [MemoryAggregate.from_arrays(_np(r.memory)) for r in kept], mu,
                                               floor)
            else:
                st.slots, merge = merge_memory_slots(st.slots, [SlotUsage.from_arrays(_np(r.memory)) for r in kept], mu,
                                                     floor)
            self.info.memory = merge.as_metrics()
        metrics = self.train_metrics_aggr_fn(
            [RecordDict({contract.METRICS_RECORD: MetricRecord(r.metrics)}) for r in kept], self.weighted_by_key)
        self.info.train_aggregate = dict(metrics)
        return R.to_record(st.shared), metrics

    def _record_epsilon(self, replies: list[SiteReply]) -> None:
        """Keep each replying site's reported memory epsilon (rejected replies too: their release happened)."""
        for r in replies:
            v = r.metrics.get(contract.PRIVACY_EPSILON) if r.error is None else None
            try:
                eps = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if math.isfinite(eps) and eps >= 0.0:
                self.state.site_epsilon[r.site] = eps

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-site global and personalised test metrics and validation histograms (``info.calibration``, checked
        by ``contract.check_calibration``; a reply failing a check is refused and logged); returns the metrics'
        slide-weighted means."""
        good: dict[str, dict] = {}
        for msg in sorted(replies, key=self._site):
            site = self._site(msg)
            self._received(msg, site)
            if msg.has_error():
                self.info.dropouts.append({"site": site, "phase": "evaluate",
                                           "reason": f"{msg.error.code}: {msg.error.reason}"})
                log.warning("round %d: evaluate error from %s: %s", server_round, site, msg.error.reason)
                continue
            try:
                glob = contract.check_metrics(dict(msg.content.metric_records[contract.METRICS_RECORD]), "evaluate")
                pers = contract.check_metrics(dict(msg.content.metric_records[R.PERSONAL_METRICS_RECORD]),
                                              "personal")
                cal = contract.check_calibration(
                    R.from_record(msg.content.array_records[contract.CALIBRATION_RECORD]), self.calibrated_heads,
                    self.cfg.calibration.bins, glob[contract.VAL_SLIDES])
            except (KeyError, TypeError, ValueError) as exc:
                self.info.dropouts.append({"site": site, "phase": "evaluate", "reason": str(exc)})
                log.warning("round %d: evaluate reply of %s refused: %s", server_round, site, exc)
                continue
            good[site] = {"global": glob, "personal": pers}
            self.info.calibration[site] = cal
            self.cached[site] = server_round  # it holds this round's global model: next train message refers to it
        self.info.evaluate = good
        if not good:
            return None
        out = {}
        for which in ("global", "personal"):
            agg = self.evaluate_metrics_aggr_fn(
                [RecordDict({contract.METRICS_RECORD: MetricRecord(v[which])}) for v in good.values()],
                self.weighted_by_key)
            out.update({f"{which}_{k}": float(v) for k, v in agg.items() if k != contract.PERSONAL_FILE_ROUND})
        self.info.evaluate_aggregate = out
        return MetricRecord(out)


def privacy_report(cfg: Config, state: ServerState) -> dict:
    """The privacy budget so far (module docstring): for ``rounds.jsonl`` and ``summary.json``."""
    by_site = dict(sorted(state.site_epsilon.items()))
    out = {"enabled": bool(cfg.privacy.enabled), "epsilon": max(by_site.values()) if by_site else math.nan,
           "epsilon_by_site": by_site, "delta": cfg.privacy.delta, "covers": dp_covers(cfg)}
    if update_dp(cfg) and state.accountant is not None:
        out["epsilon_update"] = state.accountant.epsilon()
        out["update_steps"] = state.accountant.steps
        if not by_site:
            out["epsilon"] = out["epsilon_update"]
    return out
