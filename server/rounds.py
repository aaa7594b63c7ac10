"""The coordinator's run: setup, the rounds, a checkpoint and a log line per round, the summary at the end.

``run_federation(grid, cfg, opts)`` is what the ServerApp's ``main`` calls. With ``opts.resume`` it continues
from the run folder's newest round checkpoint (same run key, so sites find their private state; rounds are
re-numbered from there, sampling is seeded per round): a run stopped after round N and resumed ends with the
same global weights as one that never stopped.

Privacy: ``check_privacy(cfg)`` runs before anything is sent; each row of ``rounds.jsonl`` carries ``"rejected"``
(site -> why its train reply was refused by validation) and ``"privacy"`` (``strategy.privacy_report``:
``epsilon`` = max over sites, ``epsilon_by_site``, ``delta``, ``covers``); ``summary.json`` carries the final
``"privacy"`` report. The server's update-DP accountant travels in the round checkpoints, so a resumed run
continues the budget instead of restarting it.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from flwr.serverapp import Grid

from momkd_fed.config import Config, dump_yaml
from momkd_fed.federation import contract
from momkd_fed.federation.selection import monitor_key, pooled_validation
from momkd_fed.federation.sharing import partition_state, validate_sharing
from momkd_fed.privacy import check_privacy
from momkd_fed.run_log import (BEST_MODEL_FILE, CONFIG_FILE, append_round, read_rounds, slide_weighted_mean,
                               truncate_rounds, write_json_atomic, SUMMARY_FILE)

from client.run_config import RunOptions
from client.site_runtime import build_initial_model
from . import run_outputs, setup_rounds
from .server_opt import server_optimizer
from .strategy import MomkdFedAvgM, RoundInfo, privacy_report

log = logging.getLogger(__name__)

POOLED_METHOD = ("slide-weighted mean of the sites' test AUCs (per-slide outputs never leave a site)")


def _fresh_state(grid: Grid, nodes: list[int], cfg: Config, roster: setup_rounds.SiteRoster,
                 run_key: str) -> run_outputs.ServerState:
    """Initial model (seeded), its shared part, and the federated k-means memory."""
    model = build_initial_model(cfg, roster.n_genes)
    validate_sharing(model.state_dict().keys(), cfg.federation)
    part = partition_state(model.state_dict(), cfg.federation)
    slots = None
    if getattr(model, "has_memory", False):
        slots = setup_rounds.initial_memory(grid, nodes, cfg, dict(part.shared), roster.n_genes, run_key,
                                            cfg.federation.round_timeout)
    return run_outputs.ServerState(
        round=0, shared={k: v.clone() for k, v in part.shared.items()}, slots=slots,
        momentum=server_optimizer(cfg), n_genes=roster.n_genes,
        omics_mean=roster.omics_mean, omics_std=roster.omics_std, run_key=run_key, sites=roster.sites,
        accountant=run_outputs.new_accountant(cfg))


def round_row(rnd: int, info: RoundInfo, seconds: dict[str, float], sites: dict[str, dict], monitor: str) -> dict:
    """One line of rounds.jsonl (``monitor``: the validation metric that selects the best round)."""
    test_auc = {s: v["global"][contract.TEST_AUC_MEMORY] for s, v in info.evaluate.items()}
    personal = {s: v["personal"][contract.TEST_AUC] for s, v in info.evaluate.items()}
    weights = {s: v["global"][contract.NUM_EXAMPLES] for s, v in info.evaluate.items()}
    glob = {s: v["global"] for s, v in info.evaluate.items()}
    return {
        "round": rnd,
        "seconds": seconds,
        "sampled": info.sampled,
        "test_auc": {"pooled": slide_weighted_mean(test_auc, weights), **test_auc},
        "test_auc_personal": {"pooled": slide_weighted_mean(personal, weights), **personal},
        "val_auc": {"monitor": monitor, "pooled": pooled_validation(glob, monitor),
                    **{s: m[monitor] for s, m in glob.items()}},
        "train": info.train,
        "train_aggregate": info.train_aggregate,
        "evaluate": info.evaluate,
        "evaluate_aggregate": info.evaluate_aggregate,
        "memory": info.memory,
        "frozen_keys": info.frozen_keys,
        "bytes_sent": info.bytes_sent,
        "bytes_received": info.bytes_received,
        "dropouts": info.dropouts,
        "rejected": info.rejected,
        "privacy": info.privacy,
        "paired_sites": sorted(s for s, v in sites.items() if v.get("paired")),
    }


def _test_auc_by_head(row: dict) -> dict:
    """``{"<global|personal>_<test_auc|test_auc_memory>": {"pooled", <site>...}}`` of one rounds.jsonl row."""
    ev = row.get("evaluate", {})
    per_head = {}
    for which, key in (("global", contract.TEST_AUC_MEMORY), ("global", contract.TEST_AUC),
                       ("personal", contract.TEST_AUC), ("personal", contract.TEST_AUC_MEMORY)):
        vals = {s: v[which][key] for s, v in ev.items()}
        w = {s: v[which][contract.NUM_EXAMPLES] for s, v in ev.items()}
        per_head[f"{which}_{key}"] = {"pooled": slide_weighted_mean(vals, w), **vals}
    return per_head


def summary(cfg: Config, run_dir: Path, state: run_outputs.ServerState, seconds: float) -> dict:
    """summary.json: the last round's evaluation (the final global model, ``test_auc*``) and the best round's
    (``best``: the round with the best pooled validation AUC, whose model is ``best_model.pt``)."""
    rows = read_rounds(run_dir)
    per_head = _test_auc_by_head(rows[-1] if rows else {})
    best_row = next((r for r in rows if r["round"] == state.best.round), {})
    return {
        "kind": "federated",
        "model": cfg.model.name,
        "memory_update": cfg.memory.update,
        "rounds_completed": state.round,
        "rounds_planned": cfg.federation.rounds,
        "sites": state.sites,
        "test_auc": per_head[f"global_{contract.TEST_AUC_MEMORY}"],
        "test_auc_model": "global model (shared encoders + global memory), memory score delta(F_wsi), "
                          "histology-only, on each site's test split",
        "test_auc_pooled_method": POOLED_METHOD,
        "test_auc_personal": per_head[f"personal_{contract.TEST_AUC}"],
        "test_auc_by_head": per_head,
        "best": {"round": state.best.round, "monitor": state.best.monitor, "val_auc": state.best.score,
                 "model_file": BEST_MODEL_FILE, "test_auc_by_head": _test_auc_by_head(best_row)},
        "bytes_sent": sum(sum(r.get("bytes_sent", {}).values()) for r in rows),
        "bytes_received": sum(sum(r.get("bytes_received", {}).values()) for r in rows),
        "dropouts": sum(len(r.get("dropouts", [])) for r in rows),
        "rejected": sum(len(r.get("rejected", {})) for r in rows),
        "privacy": privacy_report(cfg, state),
        "seconds": seconds,
        "run_key": state.run_key,
        "baselines": {},
    }


def run_federation(grid: Grid, cfg: Config, opts: RunOptions) -> dict:
    """Setup (or resume), all rounds, checkpoints, rounds.jsonl, global_model.pt and summary.json.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    RuntimeError
        A round in which no site sent a usable training reply.
    """
    t_start = time.perf_counter()
    check_privacy(cfg)
    if not opts.out_dir:
        raise ValueError("run.out-dir: the run-config names no run folder")
    run_dir = Path(opts.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation
    nodes = setup_rounds.wait_for_nodes(grid, max(fed.min_sites, len(cfg.sites)), fed.round_timeout)
    state = run_outputs.load_latest(run_dir, cfg) if opts.resume else None
    # the run key names each site's private state folder; the setup queries carry it too (site audit logs)
    run_key = state.run_key if state is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    roster = setup_rounds.roster(grid, nodes, cfg, fed.round_timeout, run_key)
    if state is None:
        if opts.resume:
            log.warning("resume: no checkpoint in %s; starting a fresh run", run_dir)
        run_outputs.clear_run_outputs(run_dir)
        dump_yaml(cfg, run_dir / CONFIG_FILE)
        state = _fresh_state(grid, nodes, cfg, roster, run_key)
    else:
        log.info("resume: continuing after round %d (run %s)", state.round, state.run_key)
        if state.n_genes != roster.n_genes:
            raise ValueError(f"resume: the checkpoint has {state.n_genes} genes, the sites now hold {roster.n_genes}")
        truncate_rounds(run_dir, state.round)
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        run_outputs.restore_best_model(run_dir, cfg, state)
    strategy = MomkdFedAvgM(cfg, state, dict(roster.node_sites))
    monitor = monitor_key(fed.shared)
    for rnd in range(state.round + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(rnd, None, None, grid), timeout=fed.round_timeout)
        replies, resend = strategy.split_cache_misses(rnd, replies)
        if resend:
            replies += list(grid.send_and_receive(resend, timeout=fed.round_timeout))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        if arrays is None:
            raise RuntimeError(f"round {rnd}: no usable training reply: {strategy.info.dropouts}")
        t1 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, None, None, grid),
                                        timeout=fed.round_timeout)
        strategy.aggregate_evaluate(rnd, replies)
        state.round = rnd
        t2 = time.perf_counter()
        row = round_row(rnd, strategy.info, {"train": t1 - t0, "evaluate": t2 - t1}, state.sites, monitor)
        took = state.best.offer(rnd, row["val_auc"]["pooled"], monitor)
        run_outputs.save_round(run_dir, cfg, state, metrics={"test_auc": row["test_auc"]})
        if took:  # after the round checkpoint, which records the choice: resume rewrites a missed best_model.pt
            run_outputs.save_best_model(run_dir, cfg, state, metrics={"test_auc": row["test_auc"],
                                                                      "val_auc": row["val_auc"]})
        row["seconds"]["total"] = time.perf_counter() - t0
        append_round(run_dir, row)
        log.info("round %d/%d done in %.1f s: test AUC %s; pooled %s %.4f (best: round %d)", rnd, fed.rounds,
                 row["seconds"]["total"], row["test_auc"], monitor, row["val_auc"]["pooled"], state.best.round)
    result = summary(cfg, run_dir, state, time.perf_counter() - t_start)
    run_outputs.save_global_model(run_dir, cfg, state, metrics={"test_auc": result["test_auc"]})
    write_json_atomic(run_dir / SUMMARY_FILE, result)
    return result
