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

from momkd_fed.calibration import calibrate_pooled
from momkd_fed.config import Config, dump_yaml
from momkd_fed.federation import contract
from momkd_fed.federation.selection import monitor_key, pooled_validation
from momkd_fed.federation.sharing import partition_state, validate_sharing
from momkd_fed.heads import TRAINED, global_model_heads, model_label, primary_head
from momkd_fed.privacy import check_privacy
from momkd_fed.run_log import (BEST_MODEL_FILE, CONFIG_FILE, GLOBAL_MODEL_FILE, PERSONAL_MODEL_FILE, SUMMARY_FILE,
                               append_round, read_rounds, slide_weighted_mean, truncate_rounds, write_json_atomic)

from client import records as R
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


def _arrivals(grid: Grid) -> dict[str, float]:
    """Site -> seconds after the push at which its reply came, where the Grid records it (``QuickReplies``)."""
    return {R.reply_site(m): round(s, 3) for m, s in getattr(grid, "arrivals", [])}


def _test_key(monitor: str) -> str:
    """The test AUC of the head the best round is picked by (the global model's primary head)."""
    return contract.TEST_AUC if monitor == contract.VAL_AUC else contract.TEST_AUC_MEMORY


def _head(monitor: str) -> str:
    return "classifier" if monitor == contract.VAL_AUC else "memory"


def round_row(rnd: int, info: RoundInfo, seconds: dict[str, float], sites: dict[str, dict], monitor: str,
              calibration: dict | None = None) -> dict:
    """One line of rounds.jsonl (``monitor``: the validation metric that selects the best round; ``test_auc`` is
    the global model's AUC with that head, ``test_auc_personal`` the personalised model's classifier this round;
    ``calibration``: the round's pooled calibration of each trained head)."""
    test_auc = {s: v["global"][_test_key(monitor)] for s, v in info.evaluate.items()}
    personal = {s: v["personal"][contract.TEST_AUC] for s, v in info.evaluate.items()}
    weights = {s: v["global"][contract.NUM_EXAMPLES] for s, v in info.evaluate.items()}
    glob = {s: v["global"] for s, v in info.evaluate.items()}
    return {
        "round": rnd,
        "seconds": seconds,
        "sampled": info.sampled,
        "test_auc": {"pooled": slide_weighted_mean(test_auc, weights), **test_auc},
        "test_auc_model": model_label("global model", _head(monitor)),
        "test_auc_personal": {"pooled": slide_weighted_mean(personal, weights), **personal},
        "test_auc_personal_model": model_label("personalised model", "classifier"),
        "calibration": calibration or {},
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


def _personal_files(rows: list[dict]) -> dict[str, dict]:
    """Site -> round, validation AUC, test AUC and test slides of its ``personal_model.pt``, from the latest
    evaluate reply of each site (:data:`contract.PERSONAL_METRIC_KEYS`); sites that have written none are left out."""
    out: dict[str, dict] = {}
    for row in rows:
        for site, ev in (row.get("evaluate") or {}).items():
            p = ev.get("personal") or {}
            if int(p.get(contract.PERSONAL_FILE_ROUND) or 0) > 0:
                out[site] = {"round": int(p[contract.PERSONAL_FILE_ROUND]),
                             "val_auc": p.get(contract.PERSONAL_FILE_VAL_AUC),
                             "test_auc": p.get(contract.PERSONAL_FILE_TEST_AUC),
                             "test_slides": p.get(contract.NUM_EXAMPLES)}
    return dict(sorted(out.items()))


def _auc_map(values: dict[str, float], weights: dict[str, float]) -> dict:
    return {"pooled": slide_weighted_mean(values, weights), **values}


def summary(cfg: Config, run_dir: Path, state: run_outputs.ServerState, seconds: float) -> dict:
    """summary.json: every AUC named by the model file and head it belongs to.

    ``test_auc``: ``global_model.pt`` (the last round's global model) with its primary head; ``best``: the round
    with the best pooled validation AUC, whose model is ``best_model.pt`` (the one to use); ``test_auc_personal``:
    each site's ``personal_model.pt``, classifier; ``models``: the same per file, with its head, round(s) and
    calibration. ``test_auc_by_head`` keeps every model and head of the last round (the global classifier is NaN
    unless shared: untrained)."""
    rows = read_rounds(run_dir)
    per_head = _test_auc_by_head(rows[-1] if rows else {})
    best_row = next((r for r in rows if r["round"] == state.best.round), {})
    heads = global_model_heads(cfg)
    head = primary_head(heads) or ("memory" if "memory" in heads else "classifier")
    untrained = "" if heads.get(head) == TRAINED else " (untrained: no global head to report)"
    key = contract.TEST_AUC if head == "classifier" else contract.TEST_AUC_MEMORY
    files = _personal_files(rows)
    personal = _auc_map({s: f["test_auc"] for s, f in files.items()}, {s: f["test_slides"] for s, f in files.items()})
    last_label = model_label(f"global model ({GLOBAL_MODEL_FILE}, round {state.round})", head) + untrained
    best_label = model_label(f"global model ({BEST_MODEL_FILE}, round {state.best.round})", head) + untrained
    kept = "its last round" if cfg.federation.personal_round == "last" else "its own best validation round"
    personal_label = model_label(f"personal models ({PERSONAL_MODEL_FILE} at each site, {kept})", "classifier")
    best_auc = _test_auc_by_head(best_row).get(f"global_{key}", {})
    return {
        "kind": "federated",
        "model": cfg.model.name,
        "memory_update": cfg.memory.update,
        "rounds_completed": state.round,
        "rounds_planned": cfg.federation.rounds,
        "sites": state.sites,
        "heads": heads,
        "primary_head": primary_head(heads),
        "test_auc": per_head[f"global_{key}"],
        "test_auc_model": f"{last_label}: histology-only, on each site's test split",
        "test_auc_head": head,
        "test_auc_pooled_method": POOLED_METHOD,
        "test_auc_personal": personal,
        "test_auc_personal_model": (f"{personal_label}: histology-only, each on its site's test split; pooled = "
                                    "slide-weighted mean over sites"),
        "test_auc_by_head": per_head,
        "best": {"round": state.best.round, "monitor": state.best.monitor, "val_auc": state.best.score,
                 "model_file": BEST_MODEL_FILE, "head": head, "label": best_label,
                 "test_auc_by_head": _test_auc_by_head(best_row)},
        "models": {
            BEST_MODEL_FILE: {"label": best_label, "head": head, "round": state.best.round, "test_auc": best_auc,
                              "calibration": best_row.get("calibration", {})},
            GLOBAL_MODEL_FILE: {"label": last_label, "head": head, "round": state.round,
                                "test_auc": per_head[f"global_{key}"], "calibration": state.calibration},
            PERSONAL_MODEL_FILE: {"label": personal_label, "head": "classifier",
                                  "rounds": {s: f["round"] for s, f in files.items()},
                                  "val_auc": {s: f["val_auc"] for s, f in files.items()}, "test_auc": personal,
                                  "where": "each site's state folder (it never leaves the site)"},
        },
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
    t_setup = time.perf_counter()
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
    setup_seconds = time.perf_counter() - t_setup
    log.info("setup done in %.1f s (%d sites)", setup_seconds, len(nodes))
    for rnd in range(state.round + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(rnd, None, None, grid), timeout=fed.round_timeout)
        arrived = {"train": _arrivals(grid)}
        replies, resend = strategy.split_cache_misses(rnd, replies)
        if resend:
            replies += list(grid.send_and_receive(resend, timeout=fed.round_timeout))
        ta = time.perf_counter()
        arrays, _ = strategy.aggregate_train(rnd, replies)
        if arrays is None:
            raise RuntimeError(f"round {rnd}: no usable training reply: {strategy.info.dropouts}")
        t1 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, None, None, grid),
                                        timeout=fed.round_timeout)
        arrived["evaluate"] = _arrivals(grid)
        tb = time.perf_counter()
        strategy.aggregate_evaluate(rnd, replies)
        state.round = rnd
        state.calibration = {h: c.to_dict() for h, c in calibrate_pooled(cfg, strategy.info.calibration).items()}
        t2 = time.perf_counter()
        seconds = {"train": t1 - t0, "evaluate": t2 - t1, "aggregate": (t1 - ta) + (t2 - tb)}
        if any(arrived.values()):
            seconds["replies"] = arrived  # per site, when its reply came (seconds after the messages went out)
        row = round_row(rnd, strategy.info, seconds, state.sites, monitor, state.calibration)
        took = state.best.offer(rnd, row["val_auc"]["pooled"], monitor)
        t3 = time.perf_counter()
        run_outputs.save_round(run_dir, cfg, state, metrics={"test_auc": row["test_auc"]})
        if took:  # after the round checkpoint, which records the choice: resume rewrites a missed best_model.pt
            run_outputs.save_best_model(run_dir, cfg, state, metrics={"test_auc": row["test_auc"],
                                                                      "val_auc": row["val_auc"]})
        row["seconds"]["checkpoint"] = time.perf_counter() - t3
        row["seconds"]["total"] = time.perf_counter() - t0
        append_round(run_dir, row)
        log.info("round %d/%d done in %.1f s: test AUC (%s) %s; pooled %s %.4f (best: round %d)", rnd, fed.rounds,
                 row["seconds"]["total"], row["test_auc_model"], row["test_auc"], monitor, row["val_auc"]["pooled"],
                 state.best.round)
    result = summary(cfg, run_dir, state, time.perf_counter() - t_start)
    result["setup_seconds"] = setup_seconds  # once the sites were there: roster, genomic statistics, initial memory
    run_outputs.save_global_model(run_dir, cfg, state, metrics={"test_auc": result["test_auc"]})
    write_json_atomic(run_dir / SUMMARY_FILE, result)
    return result
