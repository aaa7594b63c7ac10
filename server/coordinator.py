"""``momkd-fed server``: the coordinator of a real federation, from SuperLink start to the HTML report.

Steps: register every ``<certs>/sites/*.pub`` in the SuperLink's state database in one pass
(:func:`server.control.register_keys_before_start`, in this process, before the SuperLink exists: no site can
find it up but its key unknown) -> start a TLS SuperLink with SuperNode authentication on that database
(loopback; sites come through the reverse proxy; a site started earlier has been retrying and connects now) ->
wait (bounded) until enough sites are online -> write the Flower app folder with the run's flat config ->
``flwr run`` -> one table row per round as the run folder's ``rounds.jsonl`` grows -> completion or failure from
the run's status (Control API ``ListRuns``, as ``flwr ls``; ``flwr run`` exits 0 even for a failed run) -> the
HTML report. Every process started here (SuperLink, its ``flower-superexec`` and the ServerApp below it) is
stopped by PID when the run ends, fails, or on Ctrl-C / SIGTERM.

``--resume`` restarts the SuperLink on the same database (registered nodes and their ids survive, so SuperNodes
reconnect with back-off) and submits a new run with ``run.resume=true``: the ServerApp continues from the run
folder's newest checkpoint.

Files (``out`` is the run folder the ServerApp writes, see :mod:`momkd_fed.run_log`)::

    out/flower/superlink.db     SuperLink state (runs, registered nodes); kept for --resume
    out/flower/superlink.log    the SuperLink's output
    out/flower/flwr_home/       private FLWR_HOME (the `flwr` CLI connection)
    out/flower/app/             the Flower app folder that is submitted (pyproject.toml only)
    out/flower/run.log          the run's log (ServerApp), fetched at the end
    out/flower/runs.jsonl       one line per submitted run: run id, resume flag, time, final status
    out/flower/site_nodes.json  site -> node id (from the key registration), for the messages
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from momkd_fed.config import Config, load_config
from momkd_fed.errors import MomkdError
from momkd_fed.run_log import (BEST_MODEL_FILE, GLOBAL_MODEL_FILE, PERSONAL_MODEL_FILE, ROUNDS_FILE, SUMMARY_FILE,
                               RoundsFollower, read_summary)

from client.run_config import RunOptions, make_run_config
from .app_dir import write_app_dir
from momkd_fed.processes import FlowerProcess, LaunchError, flower_env

from .control import ControlClient, register_keys_before_start
from .deploy import CONNECTION_NAME, flwr_cli, site_keys, start_superlink, write_flwr_config
from .simulate import RoundTable, final_lines, show_new_rounds

log = logging.getLogger(__name__)

FLOWER_DIR = "flower"
FINISHED = "finished"
COMPLETED = "finished:completed"
STATUS_EVERY = 5.0  # seconds between run-status requests (Control API, this process) ...
STATUS_SOON = 1.0  # ... and once summary.json is written (the run is about to finish)
NODES_EVERY = 1.0  # seconds between node-list requests while waiting for sites
SUBMIT_TIMEOUT = 600.0  # seconds for `flwr run` (builds and uploads the app bundle; minutes on a loaded machine)
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
INSECURE_WARNING = ("--insecure: NO TLS and NO SuperNode authentication. Traffic is readable and anyone who "
                    "reaches the port can join the federation and receive the model. Testing only.")


class CoordinatorError(MomkdError):
    """The coordinator cannot start or follow the run; the message says what to fix."""


class Interrupted(Exception):
    """SIGTERM received: unwind so that every process is stopped."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


@dataclass
class ServerOptions:
    """How the coordinator runs (the command line of ``momkd-fed server``)."""

    resume: bool = False
    insecure: bool = False
    host: str = "127.0.0.1"  # SuperLink bind address: keep loopback (the Control API has no authentication)
    port: int = 8000  # SuperLink port (the reverse proxy forwards the Fleet API to it)
    wait_sites: float = 600.0  # seconds to wait for enough sites before giving up
    timeout: float | None = None  # seconds for the whole run; default round_timeout * (rounds + 2)


def required_sites(cfg: Config) -> int:
    """Sites the ServerApp waits for before setup: ``federation.min_sites``, or every listed site."""
    return max(cfg.federation.min_sites, len(cfg.sites), 1)


class Coordinator:
    """One SuperLink and the runs submitted to it, owned by this process.

    Parameters
    ----------
    cfg : Config
        The federation's config (run settings; site paths are not needed here).
    certs : Path or None
        The coordinator bundle from ``momkd-fed certs`` (None only with ``opts.insecure``).
    out : Path
        The run folder.
    opts : ServerOptions
    """

    def __init__(self, cfg: Config, certs: Path | None, out: Path, opts: ServerOptions) -> None:
        self.cfg, self.opts = cfg, opts
        self.certs = None if certs is None else Path(certs).absolute()
        self.out = Path(out).absolute()
        self.flower = self.out / FLOWER_DIR
        self.flwr_home = self.flower / "flwr_home"
        self.link: FlowerProcess | None = None
        self.control: ControlClient | None = None  # the SuperLink's Control API, one connection
        self.site_nodes: dict[str, int] = {}  # site -> node id, for the messages
        self.registration_seconds = 0.0  # how long registering every site key took (one pass)

    # ---------------------------------------------------------------------------------------------------------
    def check_bundle(self) -> None:
        """The coordinator bundle holds what the SuperLink and the key registration need."""
        if self.opts.insecure:
            return
        if self.certs is None:
            raise CoordinatorError("--certs: give the coordinator bundle made by `momkd-fed certs` "
                                   "(its coordinator/ folder), or --insecure for a test without TLS")
        missing = [n for n in ("server.crt", "server.key", "ca.crt") if not (self.certs / n).is_file()]
        if missing:
            raise CoordinatorError(f"{self.certs}: missing {', '.join(missing)} (fix: pass --certs the "
                                   "coordinator/ folder made by `momkd-fed certs`, not the provision root or a "
                                   "site bundle)")
        if not sorted((self.certs / "sites").glob("*.pub")):
            raise CoordinatorError(f"{self.certs / 'sites'}: no site public keys (*.pub) to register (fix: "
                                   "provision sites with `momkd-fed certs`, or copy each site's <site>.pub there)")

    def start(self, timeout: float = 300.0) -> None:
        """Register the site keys in the run folder's SuperLink database, start the SuperLink on it, write the CLI
        connection and open the Control-API connection."""
        self.check_bundle()
        self.flower.mkdir(parents=True, exist_ok=True)
        address = f"{_loopback(self.opts.host)}:{self.opts.port}"
        if not self.opts.insecure:  # before the SuperLink starts: every key is there when it accepts a site
            t0 = time.monotonic()
            ids = register_keys_before_start(self.flower / "superlink.db", site_keys(self.certs))
            self.registration_seconds = time.monotonic() - t0
            known = self.flower / "site_nodes.json"  # registration names the node only the first time
            self.site_nodes = json.loads(known.read_text()) if known.exists() else {}
            self.site_nodes.update({s: n for s, n in ids.items() if n is not None})
            known.write_text(json.dumps(self.site_nodes, indent=1) + "\n")
            log.info("%d site keys registered in %.2f s: %s", len(ids), self.registration_seconds,
                     ", ".join(sorted(ids)))
        try:
            self.link = start_superlink(self.certs, self.flower / "superlink.db", self.flower / "superlink.log",
                                        host=self.opts.host, port=self.opts.port, timeout=timeout,
                                        flwr_home=self.flwr_home, insecure=self.opts.insecure,
                                        die_with_parent=True)
        except LaunchError as exc:
            if "address already in use" in str(exc).lower():
                raise CoordinatorError(f"{address}: the port is in use (another SuperLink? fix: stop it or pass "
                                       f"--port)") from exc
            raise
        self.link.track()
        ca = None if self.opts.insecure else self.certs / "ca.crt"
        write_flwr_config(self.flwr_home, address, ca)
        log.info("SuperLink up on %s (PID %d, state %s)", address, self.link.pid, self.flower / "superlink.db")
        self.control = ControlClient(address, ca)

    def online(self) -> list[int]:
        """Node ids the SuperLink reports online."""
        return self._control().online()

    def wait_for_sites(self, n: int, say=log.info) -> list[int]:
        """Block until ``n`` nodes are online; CoordinatorError after ``opts.wait_sites`` seconds."""
        deadline = time.monotonic() + self.opts.wait_sites
        names = {v: k for k, v in self.site_nodes.items()}
        last: list[int] | None = None
        while True:
            self._check_alive()
            nodes = self.online()
            if nodes != last:
                say(f"sites online: {len(nodes)} of {n} needed"
                    + (f" ({', '.join(names.get(x, f'node {x}') for x in nodes)})" if nodes else ""))
                last = nodes
            if len(nodes) >= n:
                return nodes
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"only {len(nodes)} of {n} sites came online within {self.opts.wait_sites:.0f} s (fix: start "
                    f"`momkd-fed client` at the sites; check that they reach the proxy and that their keys are in "
                    f"{self.certs / 'sites' if self.certs else 'the bundle'}; see {self.flower / 'superlink.log'})")
            time.sleep(NODES_EVERY)

    def submit(self) -> int:
        """Write the app folder with the run's config and ``flwr run`` it; returns the run id."""
        app_dir = self.flower / "app"
        shutil.rmtree(app_dir, ignore_errors=True)
        opts = RunOptions(out_dir=str(self.out), resume=self.opts.resume, state_dir="")
        write_app_dir(app_dir, make_run_config(self.cfg, opts))
        res = flwr_cli(["run", str(app_dir), CONNECTION_NAME], self.flwr_home, timeout=SUBMIT_TIMEOUT)
        if not res.get("success") or res.get("run-id") is None:
            raise LaunchError(f"flwr run did not start the run: {res}")
        run_id = int(res["run-id"])
        self._record({"run_id": run_id, "resume": self.opts.resume, "submitted": time.time()})
        return run_id

    def status(self, run_id: int) -> str:
        """The run's status (``pending``, ``starting``, ``running``, ``finished:completed``, ...)."""
        if self.link is not None:
            self.link.track()
        return self._control().run_status(run_id)

    def follow(self, run_id: int, rows: RoundsFollower, table: RoundTable | None) -> str:
        """Print rounds as they complete until the run finishes; returns its final status."""
        limit = self.opts.timeout or self.cfg.federation.round_timeout * (self.cfg.federation.rounds + 2)
        t0, last_check, status = time.monotonic(), 0.0, ""
        while True:
            show_new_rounds(rows, table)
            now = time.monotonic()
            every = STATUS_SOON if (self.out / SUMMARY_FILE).exists() else STATUS_EVERY
            if now - last_check >= every:
                last_check = now
                new = self.status(run_id)
                if new != status:
                    log.info("run %d: %s", run_id, new)
                    status = new
                if status.startswith(FINISHED):
                    show_new_rounds(rows, table)
                    return status
            self._check_alive()
            if now - t0 > limit:
                return f"timed out after {limit:.0f} s"
            time.sleep(0.5)

    def run_log(self, run_id: int) -> str:
        """The run's log (ServerApp output) as ``flwr log --show`` prints it."""
        r = subprocess.run(["flwr", "log", str(run_id), CONNECTION_NAME, "--show"], capture_output=True, text=True,
                           env=flower_env(self.flwr_home), cwd=self.flwr_home, timeout=60.0,
                           stdin=subprocess.DEVNULL)
        return r.stdout + r.stderr

    def stop(self) -> None:
        """Stop the SuperLink, its superexec and the ServerApp (by PID)."""
        if self.control is not None:  # first: an open connection would hold up the SuperLink's shutdown
            self.control.close()
            self.control = None
        if self.link is not None:
            self.link.stop()
            self.link = None

    # ---------------------------------------------------------------------------------------------------------
    def _control(self) -> ControlClient:
        if self.control is None:
            raise LaunchError("the coordinator's SuperLink is not started")
        return self.control

    def _check_alive(self) -> None:
        if self.link is None or self.link.proc.poll() is not None:
            tail = self.link.tail(20) if self.link is not None else ""
            raise LaunchError(f"the SuperLink exited (see {self.flower / 'superlink.log'}):\n{tail}")
        self.link.track()

    def _record(self, entry: dict) -> None:
        with (self.flower / "runs.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")


def _loopback(host: str) -> str:
    """The address the local `flwr` CLI uses to reach a SuperLink bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# --------------------------------------------------------------------------------------------------------------


def run_server(config: Path, certs: Path | None, out: Path, *, resume: bool = False, insecure: bool = False,
               host: str = "127.0.0.1", port: int = 8000, wait_sites: float = 600.0,
               timeout: float | None = None) -> int:
    """The ``momkd-fed server`` command; returns the exit code (0 = the run completed).

    Parameters
    ----------
    config : Path
        Federation YAML (run settings; the sites' paths are not read here).
    certs : Path or None
        Coordinator bundle (``<provision>/coordinator``); None only with ``insecure``.
    out : Path
        Run folder (rounds.jsonl, checkpoints, summary.json, global_model.pt, report/, flower/).
    resume : bool
        Restart on the same SuperLink database and continue from the run folder's last checkpoint.
    insecure : bool
        No TLS, no node authentication (testing only; logged as a warning).
    host, port : str, int
        SuperLink bind address (default loopback:8000, behind the reverse proxy).
    wait_sites : float
        Seconds to wait for enough sites to come online.
    timeout : float, optional
        Seconds for the whole run (default ``federation.round_timeout * (rounds + 2)``).

    Raises
    ------
    ConfigError, CoordinatorError
        Bad config or coordinator bundle (before anything is started).
    """
    cfg = load_config(config)
    out = Path(out).absolute()
    if insecure:
        log.warning(INSECURE_WARNING)
    if resume and not (out / FLOWER_DIR / "superlink.db").exists():
        log.warning("--resume: %s holds no SuperLink database; sites will be registered afresh",
                    out / FLOWER_DIR)
    if resume and not (out / "checkpoints").is_dir():
        log.warning("--resume: %s holds no checkpoint; the federation starts from round 1", out)
    opts = ServerOptions(resume=resume, insecure=insecure, host=host, port=port, wait_sites=wait_sites,
                         timeout=timeout)
    coord = Coordinator(cfg, certs, out, opts)
    coord.check_bundle()
    names = [s.name for s in cfg.sites] or (sorted(p.stem for p in (Path(certs) / "sites").glob("*.pub"))
                                             if certs is not None else [])
    from momkd_fed.heads import global_model_heads, primary_head

    table = RoundTable(names, primary_head(global_model_heads(cfg)) or "memory")
    say = table.console.print
    rounds_path = out / ROUNDS_FILE
    rows = RoundsFollower(rounds_path, skip_existing=resume)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    run_id, status = None, "not started"
    try:
        coord.start()
        say(f"coordinator: SuperLink on {_loopback(host)}:{port}; waiting for {required_sites(cfg)} site(s)")
        coord.wait_for_sites(required_sites(cfg), say=say)
        if not resume:
            rounds_path.unlink(missing_ok=True)
            (out / SUMMARY_FILE).unlink(missing_ok=True)
        run_id = coord.submit()
        say(f"run {run_id} submitted ({'resuming' if resume else 'fresh'}): {cfg.federation.rounds} rounds -> {out}")
        table.header()
        status = coord.follow(run_id, rows, table)
    except (KeyboardInterrupt, Interrupted) as exc:
        if run_id is not None:
            show_new_rounds(rows, table)  # every round the run folder holds is on screen before we stop
        say(f"interrupted ({exc or 'Ctrl-C'}): stopping the SuperLink and the ServerApp; resume with --resume")
        status = "interrupted"
    except LaunchError as exc:
        status = f"Flower failed: {exc}"
    finally:
        if run_id is not None and coord.link is not None and status != "interrupted":
            try:
                (out / FLOWER_DIR / "run.log").write_text(coord.run_log(run_id))
            except Exception as exc:  # a convenience: never mask the real outcome
                log.warning("could not fetch the run's log: %s", exc)
        coord.stop()
        signal.signal(signal.SIGTERM, old)
    if run_id is not None:
        coord._record({"run_id": run_id, "status": status, "finished": time.time()})
    if status == "interrupted":
        return EXIT_INTERRUPTED
    summary = read_summary(out) if status == COMPLETED else None
    if summary is None:
        say(f"[red]federation failed: {status}[/red]\n  logs: {out / 'server.log'}, {out / FLOWER_DIR / 'run.log'}, "
            f"{out / FLOWER_DIR / 'superlink.log'}")
        return EXIT_FAILED
    try:
        from momkd_fed.report import build_report

        page = build_report(out)
        say(f"report: {page}")
    except Exception as exc:  # the run itself completed: a plotting problem must not fail it
        log.warning("the HTML report could not be built: %s", exc)
    say(f"done: {summary.get('rounds_completed')} rounds -> {out / SUMMARY_FILE}")
    for line in final_lines(summary, "slide-weighted mean over sites"):
        say(line)
    say(f"  model files: {out / BEST_MODEL_FILE}, {out / GLOBAL_MODEL_FILE}; each site's {PERSONAL_MODEL_FILE} "
        f"is in its own state folder")
    return EXIT_OK
