"""``momkd-fed simulate``: every site on this machine through Flower's simulation engine (Ray), end to end.

Steps: (synthesise the tiny federation when no config is given) -> write the Flower app folder with the run's
config -> start a private simulation SuperLink -> ``flwr run`` -> print one table row per round as
``rounds.jsonl`` grows -> read the final status -> stop every Flower/Ray process (also on failure or Ctrl-C) ->
pooled test AUC and calibration error of every model file over all sites' test slides (possible here only because
a simulation holds every site's data) -> optional baselines (each site alone, all sites pooled; MoMKD and ABMIL) -> ``summary.json``.

Run folder (``out_dir``): see :mod:`momkd_fed.run_log`; in addition ``data/`` (synthetic cohort),
``site_state/`` (the virtual sites' private state; ``site_state/<site>/<run key>/personal_model.pt`` is each
site's personal model), ``flower/`` (app folder, SuperLink log, the run's log), ``baselines/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from momkd_fed.config import Config, load_config
from momkd_fed.errors import ConfigError, MomkdError
from momkd_fed.report import build_report
from momkd_fed.heads import model_label
from momkd_fed.processes import LaunchError
from momkd_fed.run_log import (BEST_MODEL_FILE, GLOBAL_MODEL_FILE, PERSONAL_MODEL_FILE, PREDICTIONS_DIR, ROUNDS_FILE,
                               SUMMARY_FILE, RoundsFollower, json_safe, read_summary, write_json_atomic,
                               write_predictions_csv)

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


def final_lines(summary: dict, pooled: str) -> list[str]:
    """The closing lines of ``simulate`` and ``server``: the test AUC of every model file a user may take, each
    named by its file, round and head (``summary.json`` ``models``); ``pooled`` says what "pooled" means."""
    models = summary.get("models") or {}
    lines = []
    for file, note in ((BEST_MODEL_FILE, "the model for a hospital that did not train"),
                       (GLOBAL_MODEL_FILE, "the last round's")):
        m = models.get(file) or {}
        if m:
            auc = (m.get("test_auc") or {}).get("pooled")
            lines.append(f"  {m.get('label', file)}: test AUC {fmt_auc(auc)} ({pooled}; {note})")
    m = models.get(PERSONAL_MODEL_FILE) or {}
    if m.get("rounds"):
        per = ", ".join(f"{s} {fmt_auc(v)}" for s, v in (m.get("test_auc") or {}).items() if s != "pooled")
        lines.append(f"  {m.get('label', PERSONAL_MODEL_FILE)}: test AUC {per} (each in its site's state folder)")
    return lines


class RoundTable:
    """Prints one aligned row per round: seconds, mean train loss, per-site test AUC (global model with its primary
    head / personalised model, classifier) and the pooled value of the global model."""

    def __init__(self, sites: list[str], head: str = "memory") -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.sites = sites
        self.head = head
        self.width = max(14, *(len(s) for s in sites)) if sites else 14

    def header(self) -> None:
        cols = "".join(f"{s:>{self.width + 2}}" for s in self.sites)
        self.console.print(f"test AUC: {model_label('global model', self.head)} / "
                           f"{model_label('personalised model', 'classifier')}")
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


def show_new_rounds(rows: RoundsFollower, table: RoundTable | None) -> None:
    """One table row per round ``rows`` has gained since the last call (read even without a table: it moves on)."""
    for row in rows.new_rows():
        if table is not None:
            table.row(row)


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
    if not resume:
        rounds_path.unlink(missing_ok=True)
    rows = RoundsFollower(rounds_path, skip_existing=resume)
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
            show_new_rounds(rows, table)
            now = time.monotonic()
            if now - last >= STATUS_EVERY or (out_dir / SUMMARY_FILE).exists():
                last = now
                try:
                    status = link.status(run_id)
                except subprocess.TimeoutExpired as exc:  # `flwr ls` starved of CPU on a loaded machine: ask again
                    log.warning("run status not known yet (%s); asking again in %.0f s", exc, STATUS_EVERY)
                    continue
                if status.startswith(FINISHED):
                    show_new_rounds(rows, table)
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
        show_new_rounds(rows, table)  # every round the run folder holds is on screen before we stop
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


# --------------------------------------------------------------------------------------------------------------
# evaluation that needs every site's data (simulation only)


def pooled_test_scores(cfg: Config, model_path: Path, sites: list | None = None,
                       predictions_dir: Path | None = None) -> dict:
    """AUC and expected calibration error of one model file over the union of the test slides of ``sites``
    (default: every site), for each head the file trained; optionally each site's per-slide test scores to
    ``predictions_dir/test_<site>.csv`` (trained heads only).

    Per-slide outputs never leave a site in a real federation, so the ServerApp reports a slide-weighted mean
    of site AUCs; a simulation holds every site's data on this machine and can compute the real pooled value.

    Returns
    -------
    dict
        ``head`` (the file's primary head), ``slides``, ``auc`` {head: AUC}, ``ece`` {head: {"raw", "calibrated",
        "bins"}} (raw: the head's output read as a probability, softmax P or sigmoid(delta); calibrated: the
        file's stored calibration; 10 equal-width bins).
    """
    from momkd_fed.calibration import Calibration, expected_calibration_error, raw_probability
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate
    from momkd_fed.heads import TRAINED, checkpoint_heads
    from momkd_fed.metrics import roc_auc

    model, mcfg, meta = load_model(model_path)
    heads = [h for h, st in checkpoint_heads(meta, mcfg).items() if st == TRAINED]
    labels, scores = [], {h: [] for h in heads}
    for site in sites if sites is not None else cfg.sites:
        pred = evaluate(model, load_site(site, cfg).split("test"), model_device(model), cfg.train.precision)
        if predictions_dir is not None:  # ROC curves in the report (simulation only)
            write_predictions_csv(predictions_dir / f"test_{site.name}.csv", pred.slide_ids, pred.labels,
                                  pred.probs if "classifier" in heads else None,
                                  pred.memory_scores if "memory" in heads else None)
        labels.append(pred.labels)
        for h in heads:
            scores[h].append(pred.scores(h))
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    out = {"head": meta.get("primary_head"), "slides": int(len(y)), "auc": {}, "ece": {}}
    for h in heads:
        raw = np.concatenate(scores[h]) if len(y) else np.zeros(0)
        out["auc"][h] = roc_auc(y, raw) if len(y) else math.nan
        cal = (meta.get("calibration") or {}).get(h)
        out["ece"][h] = {"raw": expected_calibration_error(y, raw_probability(h, raw)),
                         "calibrated": (expected_calibration_error(y, Calibration.from_dict(cal).probability(raw))
                                        if cal else math.nan),
                         "bins": "10 equal-width probability bins"}
    return out


def personal_model_paths(cfg: Config, out_dir: Path, run_key: str) -> dict[str, Path]:
    """Site -> its ``personal_model.pt`` in the simulation's site state folders (sites without one left out)."""
    paths = {s.name: out_dir / "site_state" / s.name / run_key / PERSONAL_MODEL_FILE for s in cfg.sites}
    return {s: p for s, p in paths.items() if p.is_file()}


def personal_test_scores(cfg: Config, out_dir: Path, run_key: str) -> dict:
    """Each site's ``personal_model.pt`` on its own test slides, pooled: the AUC over the union of those scores
    and the ECE of their raw and calibrated classifier probabilities (simulation only)."""
    from momkd_fed.calibration import Calibration, expected_calibration_error
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate
    from momkd_fed.metrics import roc_auc

    y, raw, cal = [], [], []
    for site, path in personal_model_paths(cfg, out_dir, run_key).items():
        model, _, meta = load_model(path)
        pred = evaluate(model, load_site(cfg.site(site), cfg).split("test"), model_device(model), cfg.train.precision)
        y.append(pred.labels)
        raw.append(pred.probs)
        c = (meta.get("calibration") or {}).get("classifier")
        cal.append(Calibration.from_dict(c).probability(pred.probs) if c else np.full(len(pred.probs), math.nan))
    if not y:
        return {}
    y, raw, cal = np.concatenate(y), np.concatenate(raw), np.concatenate(cal)
    return {"auc": roc_auc(y, raw), "slides": int(len(y)),
            "ece": {"raw": expected_calibration_error(y, raw),
                    "calibrated": expected_calibration_error(y, cal) if np.isfinite(cal).all() else math.nan,
                    "bins": "10 equal-width probability bins"}}


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
    from momkd_fed.heads import global_model_heads, primary_head

    table = RoundTable([s.name for s in cfg.sites], primary_head(global_model_heads(cfg)) or "memory")
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
    add_pooled_figures(cfg, out_dir, summary)
    if baselines:
        summary["baselines"] = run_baselines(cfg, out_dir, baselines)
    summary["seconds_simulate"] = time.perf_counter() - t_start
    write_json_atomic(out_dir / SUMMARY_FILE, json_safe(summary))
    try:
        page = build_report(out_dir)
        table.console.print(f"report: {page}")
    except MomkdError as exc:  # the run itself succeeded; say why there is no report
        log.error("report not written: %s", exc)
    table.console.print(f"done: {summary['rounds_completed']} rounds in {summary['seconds_simulate']:.0f} s -> "
                        f"{out_dir / SUMMARY_FILE}")
    for line in final_lines(summary, "all sites' test slides pooled"):
        table.console.print(line)
    table.console.print(f"  personal models: {out_dir / 'site_state'}/<site>/{summary.get('run_key')}/"
                        f"{PERSONAL_MODEL_FILE}")
    return 0


def add_pooled_figures(cfg: Config, out_dir: Path, summary: dict) -> None:
    """Replace the slide-weighted means of ``summary`` by AUCs over the union of all sites' test slides (possible
    here only: a simulation holds every site's data), add the expected calibration error of every model file,
    and write ``predictions/test_<site>.csv`` of ``best_model.pt`` for the report's ROC curves."""
    head = summary.get("test_auc_head") or "memory"
    models = summary.setdefault("models", {})
    last = pooled_test_scores(cfg, out_dir / GLOBAL_MODEL_FILE)
    summary["test_auc_site_weighted_mean"] = summary["test_auc"]["pooled"]
    summary["test_auc"]["pooled"] = last["auc"].get(head, math.nan)
    summary["test_auc_pooled_method"] = (
        f"AUC over the union of all sites' test slides ({last['slides']}), computed by the simulation runner "
        f"from each model file (a real federation reports the slide-weighted mean of site AUCs instead, "
        f"test_auc_site_weighted_mean)")
    summary["test_auc_pooled_by_head"] = last["auc"]  # every head global_model.pt trained
    files = {GLOBAL_MODEL_FILE: last}
    if summary.get("best", {}).get("round"):
        best = pooled_test_scores(cfg, out_dir / BEST_MODEL_FILE, predictions_dir=out_dir / PREDICTIONS_DIR)
        summary["best"]["test_auc_pooled"] = best["auc"]
        files[BEST_MODEL_FILE] = best
    for file, res in files.items():
        if file in models:
            models[file].setdefault("test_auc", {})["pooled"] = res["auc"].get(head, math.nan)
            models[file]["test_ece_pooled"] = res["ece"]
    personal = personal_test_scores(cfg, out_dir, str(summary.get("run_key", "")))
    if personal and PERSONAL_MODEL_FILE in models:
        models[PERSONAL_MODEL_FILE]["test_auc_pooled_union"] = personal["auc"]
        models[PERSONAL_MODEL_FILE]["test_ece_pooled"] = personal["ece"]
