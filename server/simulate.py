"""``momkd-fed simulate``: every site on this machine through Flower's simulation engine (Ray), end to end.

Steps: (synthesise the tiny federation when no config is given) -> write the Flower app folder with the run's
config -> start a private simulation SuperLink -> ``flwr run`` -> print one table row per round as
``rounds.jsonl`` grows -> read the final status -> stop every Flower/Ray process (also on failure or Ctrl-C) ->
pooled test AUC over all sites' test slides (possible here only because a simulation holds every site's data)
-> optional baselines (each site alone, all sites pooled; MoMKD and ABMIL) -> ``summary.json``.

Run folder (``out_dir``): see :mod:`momkd_fed.run_log`; in addition ``data/`` (synthetic cohort),
``site_state/`` (the virtual sites' private state), ``flower/`` (app folder, SuperLink log, the run's log),
``baselines/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from momkd_fed.config import Config, load_config
from momkd_fed.errors import ConfigError, MomkdError
from momkd_fed.report import build_report
from momkd_fed.processes import LaunchError
from momkd_fed.run_log import (BEST_MODEL_FILE, GLOBAL_MODEL_FILE, PREDICTIONS_DIR, ROUNDS_FILE, SUMMARY_FILE,
                               iter_rounds, json_safe, read_summary, write_json_atomic, write_predictions_csv)

from client.run_config import RunOptions, make_run_config
from .app_dir import write_app_dir
from .local_superlink import COMPLETED, FINISHED, LocalSuperLink

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs/simulate")
STATUS_EVERY = 30.0  # seconds between `flwr ls` status checks (each one costs a CLI start-up: ~1-2 s of CPU), and
# at once when summary.json appears
BASELINES = ("local", "centralized")


class _Interrupted(Exception):
    """SIGTERM received: unwind so every process is stopped."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by hand
    raise _Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------------------------------------------
# the table printed while the run goes


def fmt_auc(x: float | None, missing: str = "n/a") -> str:
    """An AUC for the console: three decimals, ``missing`` for None or NaN (a one-class split)."""
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


class RoundTable:
    """Prints one aligned row per round: seconds, mean train loss, per-site test AUC (global memory score /
    personalised classifier) and the pooled value."""

    def __init__(self, sites: list[str]) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.sites = sites
        self.width = max(14, *(len(s) for s in sites)) if sites else 14

    def header(self) -> None:
        cols = "".join(f"{s:>{self.width + 2}}" for s in self.sites)
        self.console.print(f"[bold]{'round':>5} {'sec':>6} {'loss':>7}{cols}{'pooled':>9}[/bold]")
        self.console.print(f"{'':>20}" + "".join(f"{'global/personal':>{self.width + 2}}" for _ in self.sites)
                           + f"{'global':>9}")

    def row(self, r: dict) -> None:
        def fmt(v) -> str:
            return fmt_auc(v, missing="  -  ")

        cells = "".join(f"{fmt(r['test_auc'].get(s)) + '/' + fmt(r['test_auc_personal'].get(s)):>{self.width + 2}}"
                        for s in self.sites)
        loss = r.get("train_aggregate", {}).get("loss_total")
        self.console.print(f"{r['round']:>5} {r['seconds'].get('total', 0.0):>6.1f} {fmt(loss):>7}{cells}"
                           f"{fmt(r['test_auc'].get('pooled')):>9}")


# --------------------------------------------------------------------------------------------------------------


def run_simulation(cfg: Config, out_dir: Path, *, resume: bool = False, timeout: float | None = None,
                   table: RoundTable | None = None) -> tuple[str, dict | None]:
    """Run the federation in Flower's simulation engine; return (final status, summary or None).

    Every process started for it is stopped before this returns or raises.
    """
    if not cfg.sites:
        raise ConfigError("sites: a simulation needs at least one site in the config")
    out_dir = out_dir.resolve()
    flower = out_dir / "flower"
    if not resume:
        shutil.rmtree(out_dir / "site_state", ignore_errors=True)
    shutil.rmtree(flower / "app", ignore_errors=True)
    opts = RunOptions(out_dir=str(out_dir), resume=resume, state_dir=str(out_dir / "site_state"))
    app_dir = write_app_dir(flower / "app", make_run_config(cfg, opts))
    rounds_path = out_dir / ROUNDS_FILE
    offset = rounds_path.stat().st_size if (resume and rounds_path.exists()) else 0
    if not resume:
        rounds_path.unlink(missing_ok=True)
    limit = timeout or cfg.federation.round_timeout * (cfg.federation.rounds + 2)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    link = LocalSuperLink(flower)
    status = "not started"
    run_id = None
    interrupted = False
    try:
        link.start()
        run_id = link.submit(app_dir, len(cfg.sites), cfg.federation.client_cpus)
        log.info("simulation run %d submitted (%d virtual sites)", run_id, len(cfg.sites))
        t0, last = time.monotonic(), 0.0
        while True:
            for row in iter_rounds(rounds_path, offset):
                if table is not None:
                    table.row(row)
            if rounds_path.exists():
                offset = _complete_size(rounds_path)
            now = time.monotonic()
            if now - last >= STATUS_EVERY or (out_dir / SUMMARY_FILE).exists():
                last = now
                status = link.status(run_id)
                if status.startswith(FINISHED):
                    for row in iter_rounds(rounds_path, offset):
                        if table is not None:
                            table.row(row)
                    break
            if not link.alive():
                status = "superlink exited"
                break
            if now - t0 > limit:
                status = f"timed out after {limit:.0f} s"
                break
            time.sleep(0.5)
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
        raise
    finally:
        if run_id is not None and not interrupted:
            try:
                (flower / "run.log").write_text(link.logs(run_id))
            except Exception as exc:  # the run's log is a convenience: never let it mask the real outcome
                log.warning("could not fetch the run's log: %s", exc)
        link.stop()
        signal.signal(signal.SIGTERM, old)
    summary = read_summary(out_dir) if status == COMPLETED else None
    return status, summary


def _complete_size(path: Path) -> int:
    """Bytes of ``path`` up to and including its last newline (rows after it are still being written)."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


# --------------------------------------------------------------------------------------------------------------
# evaluation that needs every site's data (simulation only)


def pooled_test_auc(cfg: Config, out_dir: Path, model_file: str = GLOBAL_MODEL_FILE) -> dict:
    """Pooled histology-only test AUC of ``model_file`` over the union of all sites' test slides; for
    ``global_model.pt`` also writes each site's per-slide test scores to ``predictions/test_<site>.csv``.

    Per-slide outputs never leave a site in a real federation, so the ServerApp reports a slide-weighted mean
    of site AUCs; a simulation holds every site's data on this machine and can compute the real pooled value.
    """
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate
    from momkd_fed.metrics import roc_auc

    model, _, _ = load_model(out_dir / model_file)
    labels, memory, probs = [], [], []
    for site in cfg.sites:
        pred = evaluate(model, load_site(site, cfg).split("test"), model_device(model), cfg.train.precision)
        if model_file == GLOBAL_MODEL_FILE:  # ROC curves in the report (simulation only)
            write_predictions_csv(out_dir / PREDICTIONS_DIR / f"test_{site.name}.csv", pred.slide_ids, pred.labels,
                                  pred.probs, pred.memory_scores)
        labels.append(pred.labels)
        probs.append(pred.probs)
        if pred.memory_scores is not None:
            memory.append(pred.memory_scores)
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    out = {"memory": roc_auc(y, np.concatenate(memory)) if memory and len(y) else math.nan,
           "classifier": roc_auc(y, np.concatenate(probs)) if len(y) else math.nan, "slides": int(len(y))}
    return out


def model_device(model):
    return next(model.parameters()).device


def run_baselines(cfg: Config, out_dir: Path, which: list[str]) -> dict:
    """Train each site alone (``local``) and/or all sites pooled (``centralized``), MoMKD and ABMIL, on the
    same splits as the federation; test AUCs of the classifier head and (MoMKD) the memory score."""
    from momkd_fed.training import run_training

    def aucs(m: dict) -> dict:
        mem = m.get("memory")
        return {"classifier": m["classifier"]["auc"], "memory": None if mem is None else mem["auc"]}

    out: dict = {}
    for model_name in ("momkd", "abmil"):
        mcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model_name))
        if "local" in which:
            for site in cfg.sites:
                try:
                    m = run_training(mcfg, out_dir / "baselines" / "local" / model_name / site.name, site=site.name)
                    out.setdefault("local", {}).setdefault(model_name, {})[site.name] = aucs(m["test"])
                except MomkdError as exc:
                    log.warning("baseline local %s at %s failed: %s", model_name, site.name, exc)
                    out.setdefault("local", {}).setdefault(model_name, {})[site.name] = {"error": str(exc)}
        if "centralized" in which:
            m = run_training(mcfg, out_dir / "baselines" / "centralized" / model_name, pooled=True)
            res = {"pooled": aucs(m["test"])}
            res.update({s: aucs(v) for s, v in m.get("test_per_site", {}).items()})
            out.setdefault("centralized", {})[model_name] = res
    return out


# --------------------------------------------------------------------------------------------------------------


def simulate(config_path: Path | None, out_dir: Path | None, baselines: list[str]) -> int:
    """The ``momkd-fed simulate`` command; returns the exit code (0 = the run completed).

    Parameters
    ----------
    config_path : Path or None
        Federation YAML; None synthesises the tiny federation into ``out_dir/data`` and runs it.
    out_dir : Path or None
        Run folder (default ``runs/simulate``).
    baselines : list of str
        Any of "local", "centralized".
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir or DEFAULT_OUT).resolve()
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"--baselines: unknown {bad}; allowed: {', '.join(BASELINES)}")
    if config_path is None:
        from momkd_fed.synth import synthesize

        config_path = synthesize("tiny", out_dir / "data", seed=0)
        log.info("synthesised the tiny federation: %s", config_path)
    cfg = load_config(config_path)
    table = RoundTable([s.name for s in cfg.sites])
    table.console.print(f"simulating {len(cfg.sites)} sites x {cfg.federation.rounds} rounds "
                        f"(Flower simulation engine) -> {out_dir}")
    table.header()
    try:
        status, summary = run_simulation(cfg, out_dir, table=table)
    except LaunchError as exc:
        status, summary = f"Flower could not run: {exc}", None
    except (KeyboardInterrupt, _Interrupted) as exc:
        table.console.print(f"[red]interrupted ({exc or 'Ctrl-C'}); every Flower and Ray process was stopped[/red]")
        return 130
    if summary is None:
        log.error("the simulation did not complete (status %s); see %s and %s", status,
                  out_dir / "flower" / "run.log", out_dir / "server.log")
        table.console.print(f"[red]simulation failed: {status}[/red] (logs: {out_dir / 'flower' / 'run.log'})")
        return 1
    pooled = pooled_test_auc(cfg, out_dir)
    summary["test_auc_site_weighted_mean"] = summary["test_auc"]["pooled"]
    summary["test_auc"]["pooled"] = pooled["memory"]
    summary["test_auc_pooled_method"] = (
        f"AUC over the union of all sites' test slides ({pooled['slides']}), computed by the simulation runner "
        "from global_model.pt (a real federation reports the slide-weighted mean of site AUCs instead, "
        "test_auc_site_weighted_mean)")
    summary["test_auc_pooled_classifier"] = pooled["classifier"]
    if summary.get("best", {}).get("round"):
        best = pooled_test_auc(cfg, out_dir, BEST_MODEL_FILE)
        summary["best"]["test_auc_pooled"] = {"memory": best["memory"], "classifier": best["classifier"]}
    if baselines:
        summary["baselines"] = run_baselines(cfg, out_dir, baselines)
    summary["seconds_simulate"] = time.perf_counter() - t_start
    write_json_atomic(out_dir / SUMMARY_FILE, json_safe(summary))
    try:
        page = build_report(out_dir)
        table.console.print(f"report: {page}")
    except MomkdError as exc:  # the run itself succeeded; say why there is no report
        log.error("report not written: %s", exc)
    auc = summary["test_auc"]["pooled"]
    best = summary.get("best", {})
    best_auc = best.get("test_auc_pooled", {}).get("memory")
    table.console.print(f"done: {summary['rounds_completed']} rounds, pooled test AUC {fmt_auc(auc)} (last round), "
                        f"{fmt_auc(best_auc)} (round {best.get('round')}, best by validation: {BEST_MODEL_FILE}) in "
                        f"{summary['seconds_simulate']:.0f} s -> {out_dir / SUMMARY_FILE}")
    return 0
