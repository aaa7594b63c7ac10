"""``momkd-fed client``: check this site's data, then run its Flower SuperNode until stopped.

1. ``momkd_fed.data.check.check_site`` on the local site YAML: any error-level problem refuses to join (each is
   listed with its file, field and fix); warnings are shown and the site joins.
2. ``flower-supernode`` with the site bundle (``--root-certificates ca.crt``, ``--auth-supernode-private-key
   <site>.key``), ``--node-config 'site="NAME" config-path="/abs/site.yaml" state-dir="/abs/state"'`` (paths stay
   local: only the ClientApp on this machine reads them), a free local ``--port`` for its Runtime API (several
   SuperNodes can share a host) and bounded reconnection (``--max-retries`` / ``--max-wait-time``).
3. Follow it: its output goes to ``<state-dir>/supernode.log`` and is echoed; one clear line when it is connected
   and when it fails: coordinator unreachable, certificate mismatch (TLS verification), key not registered
   (Flower logs exit code 305 for all three; the cause is read from the log). SIGTERM / Ctrl-C stop the SuperNode
   (it deactivates itself at the SuperLink) and everything below it, by PID.

Once the SuperNode is connected, every message's ClientApp process is forked from a warm starter that has
already imported torch, flwr and this package (:mod:`client.warm_start`; ``--cold`` leaves it to Flower), so a
message no longer pays the imports.

Start order does not matter. A site started before the coordinator waits for it (Flower's own reconnection,
bounded by ``--max-wait-time``). A site that reaches a coordinator which is up but has not registered its key yet
is refused by Flower at once; the SuperNode is then started again (after 2, 4, 8, 10, 10... s), saying so once,
until it is accepted or ``--max-wait-time`` (counted from the first start) runs out: then "key not registered",
exit 1.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from momkd_fed.config import Config, SiteConfig, load_config
from momkd_fed.data.site import CACHE_FOLDER
from momkd_fed.errors import ConfigError

from momkd_fed.processes import FlowerProcess, LaunchError, flower_env, free_port
from .deploy import FLOWER_EXIT_CODE, SUPERNODE_CONNECTED, diagnose, read_bundle, refusal, supernode_command
from .warm_start import SOCKET_NAME, STARTER_ENV, real_clientapp, write_shim

log = logging.getLogger(__name__)

STATE_FOLDER = "federated_state"  # under the site's cache folder, as client.site_runtime does by default
EXIT_OK, EXIT_DATA, EXIT_FAILED, EXIT_INTERRUPTED = 0, 3, 1, 130
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower 1.42's SuperExec asks for new tasks every 1 s ...
SUPEREXEC_POLL_SECONDS = "0.25"  # ... this much sooner: a message's ClientApp starts ~0.4 s earlier on average
TRACK_EVERY = 5.0  # seconds between scans for the SuperNode's helpers (so that they are stopped with it)
EXIT_GRACE = 10.0  # seconds a SuperNode that logged Flower's exit code may take to exit before it is stopped
KEY_RETRY_DELAY = 2.0  # seconds before the first new attempt after "key not registered" (then doubled) ...
KEY_RETRY_MAX_DELAY = 10.0  # ... up to this; all attempts within --max-wait-time
INSECURE_WARNING = ("--insecure: NO TLS and NO node authentication: the coordinator is not verified and the "
                    "traffic is readable. Testing only.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Interrupted(Exception):
    """SIGTERM received: unwind so that the SuperNode is stopped."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


@dataclass
class ClientOptions:
    """How the SuperNode runs (the command line of ``momkd-fed client``)."""

    superlink: str | None = None  # host:port; default: the address in the bundle
    insecure: bool = False
    port: int | None = None  # local Runtime API port; default: a free one
    state_dir: str | None = None  # site's private federated state; default: <cache>/federated_state/<site>
    max_retries: int | None = None  # reconnection attempts (None = unbounded, bounded by max_wait_time)
    max_wait_time: float | None = 600.0  # seconds of reconnection before giving up (also after a restart)
    connect_timeout: float = 0.0  # >0: give up if not connected within this many seconds
    warm: bool = True  # fork each message's flwr-clientapp from a process with the imports done (client.warm_start)


def default_state_dir(site: SiteConfig, cfg: Config) -> Path:
    """``<data.cache_dir or features_dir/.momkd_cache>/federated_state/<site>`` (local; never sent)."""
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(site.features_dir) / CACHE_FOLDER
    return (cache / STATE_FOLDER / site.name).absolute()


def check_data(site: SiteConfig, cfg: Config, say) -> bool:
    """Run check-data on this site; print the problems; True if the site may join (no error-level problem)."""
    from momkd_fed.data.check import check_site

    problems = check_site(site, cfg)
    errors = [p for p in problems if p.level == "error"]
    for p in problems:
        if p.level != "info" or errors:
            say(str(p))
    if errors:
        say(f"refusing to join the federation: {len(errors)} data problem(s) at site {site.name} "
            f"(fix them, then check with `momkd-fed check-data --site {site.name}`)")
        return False
    return True


def run_client(config: Path, site: str, certs: Path | None, superlink: str | None = None, *,
               insecure: bool = False, port: int | None = None, state_dir: Path | None = None,
               max_retries: int | None = None, max_wait_time: float | None = 600.0,
               connect_timeout: float = 0.0, warm: bool = True, say=None) -> int:
    """The ``momkd-fed client`` command; returns the exit code.

    0: stopped by SIGTERM/Ctrl-C after running, or the SuperNode ended by itself without error;
    3: the site's data breaks the contract (nothing was started); 1: the SuperNode failed (the reason is printed);
    130: interrupted before it connected.

    Raises
    ------
    ConfigError
        The site is not in the YAML, no bundle without ``insecure``, or the bundle is another site's.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = Path(config).absolute()
    cfg = load_config(config)
    site_cfg = cfg.site(site)
    if not check_data(site_cfg, cfg, say):
        return EXIT_DATA
    opts = ClientOptions(superlink=superlink, insecure=insecure, port=port,
                         state_dir=None if state_dir is None else str(state_dir), max_retries=max_retries,
                         max_wait_time=max_wait_time, connect_timeout=connect_timeout, warm=warm)
    try:
        argv, address = _command(config, site_cfg, cfg, certs, opts)
    except LaunchError as exc:  # an unreadable bundle: a setup problem, reported like a config error
        raise ConfigError(str(exc)) from exc
    state = Path(opts.state_dir) if opts.state_dir else default_state_dir(site_cfg, cfg)
    started: list[FlowerProcess] = []
    env = {**flower_env(), SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_SECONDS}
    warm = _Warm(site, state, env) if opts.warm else None  # the shim goes on PATH now, the starter once connected

    def start(port: int, max_wait_time: float | None) -> FlowerProcess:
        cmd = _with(argv, "--port", port)
        if max_wait_time is not None:  # a later attempt gets what is left of --max-wait-time
            cmd = _with(cmd, "--max-wait-time", f"{max_wait_time:.0f}")
        node = FlowerProcess(f"supernode {site}", cmd, state / "supernode.log", env, die_with_parent=True)
        started.append(node)
        return node

    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _follow(start, _port_of(argv), site, address, opts, say,
                       on_connected=warm.start if warm is not None else None)
    except (KeyboardInterrupt, Interrupted) as exc:
        connected = bool(started) and SUPERNODE_CONNECTED.search(started[-1].output()) is not None
        say(f"site {site}: stopping the SuperNode ({exc or 'Ctrl-C'})")
        return EXIT_OK if connected else EXIT_INTERRUPTED
    finally:
        for node in reversed(started):
            node.stop()
        if warm is not None:
            warm.stop()
        signal.signal(signal.SIGTERM, old)


class _Warm:
    """The site's warm ClientApp starter (:mod:`client.warm_start`): its ``flwr-clientapp`` shim goes first on
    ``env``'s PATH at once (the SuperNode and its SuperExec inherit it); the starter itself is started when the
    SuperNode has connected, so that its imports do not compete with the connection (and a site that never
    connects never starts one). Until it is ready, the shim starts Flower's ClientApp cold."""

    def __init__(self, site: str, state: Path, env: dict[str, str]) -> None:
        self.site, self.state, self.env = site, state, env
        self.starter: FlowerProcess | None = None
        self.real = real_clientapp()
        self.folder = None
        if self.real is None:
            return
        self.folder = Path(tempfile.mkdtemp(prefix="momkd-warm-"))  # 0700; short: a Unix socket path has ~100 bytes
        bin_dir = write_shim(self.folder / "bin", self.folder / SOCKET_NAME, self.real)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    def start(self) -> None:
        if self.folder is None or self.starter is not None:
            return
        self.starter = FlowerProcess(f"warm starter {self.site}",
                                     [sys.executable, "-m", "client.warm_start", str(self.folder / SOCKET_NAME)],
                                     self.state / "warm_start.log", {**self.env, **STARTER_ENV}, die_with_parent=True)
        log.info("site %s: ClientApp processes start warm (starter PID %d, log %s)", self.site, self.starter.pid,
                 self.starter.log_path)

    def stop(self) -> None:
        if self.starter is not None:
            self.starter.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _command(config: Path, site: SiteConfig, cfg: Config, certs: Path | None,
             opts: ClientOptions) -> tuple[list[str], str]:
    """The flower-supernode command line and the coordinator address it uses."""
    state = Path(opts.state_dir).absolute() if opts.state_dir else default_state_dir(site, cfg)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{state}: cannot create the site's state folder ({exc.strerror}) (fix: pass --state-dir "
                          "a writable local folder, or set data.cache_dir)") from exc
    node_config = {"site": site.name, "config-path": str(config), "state-dir": str(state)}
    port = opts.port or free_port()
    if opts.insecure:
        log.warning(INSECURE_WARNING)
        if not opts.superlink:
            raise ConfigError("--superlink: give the coordinator address host:port (no bundle with --insecure)")
        argv = supernode_command(None, superlink=opts.superlink, port=port, node_config=node_config,
                                 max_retries=opts.max_retries, max_wait_time=opts.max_wait_time, insecure=True)
        return argv, opts.superlink
    if certs is None:
        raise ConfigError("--certs: give this site's bundle (sites/<site> made by `momkd-fed certs`), or "
                          "--insecure for a test without TLS")
    info = read_bundle(certs)
    if info.get("site") != site.name:
        raise ConfigError(f"{Path(certs) / 'bundle.json'}: this bundle is for site {info.get('site')!r}, not "
                          f"{site.name!r} (fix: pass --certs the sites/{site.name} folder)")
    address = opts.superlink or info["superlink"]
    argv = supernode_command(certs, superlink=address, port=port, node_config=node_config,
                             max_retries=opts.max_retries, max_wait_time=opts.max_wait_time)
    return argv, address


def _port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def _with(argv: list[str], flag: str, value: object) -> list[str]:
    """``argv`` with the value after ``flag`` replaced (``flag`` must be there)."""
    out = list(argv)
    out[out.index(flag) + 1] = str(value)
    return out


def _follow(start, port: int, site: str, address: str, opts: ClientOptions, say, on_connected=None) -> int:
    """Run the SuperNode until it ends; while the coordinator does not know this site's key yet, start it again
    (within ``opts.max_wait_time``, saying so once). Returns the exit code.

    Parameters
    ----------
    start : callable
        ``start(port, max_wait_time) -> FlowerProcess``: one SuperNode with its local Runtime API on ``port``,
        reconnecting for at most ``max_wait_time`` seconds (None: as ``opts`` says).
    port : int
        The port of the first attempt; later attempts take a free one unless ``opts.port`` fixed it.
    on_connected : callable, optional
        Called once the SuperNode is connected.
    """
    t0 = time.monotonic()
    attempt, known = 0, None  # known: why the last attempt was refused
    while True:
        left = None if opts.max_wait_time is None else max(1.0, opts.max_wait_time - (time.monotonic() - t0))
        node = start(port, left if attempt else None)
        if attempt == 0:
            say(f"site {site}: data OK; SuperNode (PID {node.pid}) connecting to {address}; log {node.log_path}")
        code, text = _watch(node, site, opts, say, echo=attempt == 0, t0=t0, on_connected=on_connected, known=known)
        if code is not None:
            return code
        # refused because the coordinator does not (yet) hold this site's key: the coordinator may be up and still
        # registering its sites' keys, so try again within --max-wait-time
        node.stop()
        known = diagnose(text, site, address)
        waited = time.monotonic() - t0
        attempt += 1
        delay = min(KEY_RETRY_MAX_DELAY, KEY_RETRY_DELAY * 2 ** (attempt - 1))
        out_of_time = opts.max_wait_time is not None and waited + delay > opts.max_wait_time
        out_of_tries = opts.max_retries is not None and attempt > opts.max_retries
        if out_of_time or out_of_tries:
            why = diagnose(text, site, address)
            say(f"site {site}: {why} (still refused after {waited:.0f} s and {attempt} attempt(s); "
                f"log: {node.log_path})")
            return EXIT_FAILED
        if attempt == 1:
            bound = (f"for up to {opts.max_wait_time:.0f} s (--max-wait-time)" if opts.max_wait_time is not None
                     else "until it is (no --max-wait-time)")
            say(f"site {site}: the coordinator at {address} is up but does not know this site's key yet (it may still "
                f"be registering its sites); trying again {bound}")
        log.debug("site %s: key refused (attempt %d); next try in %.0f s", site, attempt, delay)
        time.sleep(delay)
        if not opts.port:
            port = free_port()


def _watch(node: FlowerProcess, site: str, opts: ClientOptions, say, *, echo: bool, t0: float,
           on_connected=None, known: str | None = None) -> tuple[int | None, str]:
    """Follow one SuperNode until it exits: echo its log (once connected, or always with ``echo``), announce the
    connection, explain a failure. Returns (exit code, log); exit code None: it was refused because its key is
    unknown, before it ever connected (the caller may try again). A SuperNode that logged Flower's exit code but
    is still there :data:`EXIT_GRACE` seconds later (Flower 1.42 after a refusal, often) is stopped; so is one not
    connected when ``--max-wait-time`` has passed since ``t0`` (``known``: the cause an earlier attempt met)."""
    seen, connected, fatal_at, tracked = 0, False, None, 0.0
    address = node.argv[node.argv.index("--superlink") + 1]
    while True:
        text = node.output()
        if echo or connected:
            for line in text[seen:].splitlines():
                if line.strip():
                    log.info("[supernode] %s", _ANSI.sub("", line))
            seen = len(text)
        if not connected and (m := SUPERNODE_CONNECTED.search(text)):
            connected = True
            say(f"site {site}: connected to the coordinator as node {m.group(1)}")
            if on_connected is not None:
                on_connected()
            continue
        code = node.proc.poll()
        if code is None and FLOWER_EXIT_CODE.search(text):
            fatal_at = fatal_at or time.monotonic()
            if time.monotonic() - fatal_at > EXIT_GRACE:
                log.warning("site %s: the SuperNode logged its exit but did not exit; stopping it", site)
                node.stop()
                code = node.proc.poll() or 1
        if code is not None:
            text = node.output()
            if code == 0 and "Exit Code" not in text:
                say(f"site {site}: the SuperNode ended")
                return EXIT_OK, text
            if not connected and refusal(text) == "key":
                return None, text
            why = diagnose(text, site, address) or f"the SuperNode exited with status {code}"
            if known is not None and refusal(text) == "unreachable":  # refused for its key before, then the
                # coordinator went away (it finished or stopped): the key is what this site must fix
                why = f"{known}; then the coordinator stopped answering ({why})"
            say(f"site {site}: {why} (log: {node.log_path})")
            return EXIT_FAILED, text
        if (not connected and opts.max_wait_time is not None
                and time.monotonic() - t0 > opts.max_wait_time + EXIT_GRACE):  # Flower counts from its own start
            node.stop()
            why = diagnose(node.output(), site, address) or known  # this attempt may not have got that far
            say(f"site {site}: " + (f"{why} (" if why else "not connected (") + f"still not connected after "
                f"--max-wait-time {opts.max_wait_time:.0f} s; log: {node.log_path})")
            return EXIT_FAILED, node.output()
        if not connected and opts.connect_timeout and time.monotonic() - t0 > opts.connect_timeout:
            why = diagnose(text, site, address)
            say(f"site {site}: not connected after {opts.connect_timeout:.0f} s"
                + (f": {why}" if why else "") + f" (log: {node.log_path})")
            return EXIT_FAILED, text
        if time.monotonic() - tracked > TRACK_EVERY:
            node.track()
            tracked = time.monotonic()
        time.sleep(0.3)
