"""Launch and stop the coordinator's Flower processes: a TLS SuperLink with SuperNode authentication.

This is the process layer under ``momkd-fed server``: it builds the exact ``flower-superlink`` command line,
writes the ``flwr`` CLI connection (``$FLWR_HOME/config.toml``) and registers the sites' public keys (through
:mod:`server.control`, in this process). The commands are the ones verified on
loopback in tests/test_certs_flower.py and written down in deploy/README.md.

Processes are started and stopped by PID through :mod:`momkd_fed.processes` (shared with ``client/``).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

from momkd_fed.processes import FlowerProcess, LaunchError, flower_env

from .control import ControlClient

log = logging.getLogger(__name__)

SUPERLINK_READY = re.compile(r"Uvicorn running on https?://")
CONNECTION_NAME = "momkd-fed"  # name of the SuperLink connection in $FLWR_HOME/config.toml


# --------------------------------------------------------------------------------------------------------------
# SuperLink


def superlink_command(certs: Path | None, database: Path, *, host: str = "127.0.0.1", port: int = 8000,
                      log_file: Path | None = None, install_dependencies: bool = False,
                      insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS from the coordinator bundle, SuperNode authentication and a state database.

    Parameters
    ----------
    certs : Path or None
        The coordinator bundle (``out/coordinator`` of ``momkd-fed certs``): server.crt, server.key, ca.crt.
        Ignored (may be None) with ``insecure``.
    database : Path
        SQLite file for the SuperLink state (runs and registered nodes survive a restart).
    host, port : str, int
        Bind address. Keep ``127.0.0.1``: the Control API on the same port has no authentication; sites reach
        the Fleet API through the reverse proxy (deploy/nginx/momkd-fed.conf).
    insecure : bool
        Plain HTTP and **no SuperNode authentication** (Flower refuses ``--enable-supernode-auth`` without TLS):
        any process that reaches the port can join. Testing only.
    """
    if insecure:
        argv = ["flower-superlink", "--insecure"]
    else:
        if certs is None:
            raise LaunchError("superlink: no coordinator bundle given (fix: pass --certs DIR, the coordinator "
                              "folder made by momkd-fed certs)")
        certs = Path(certs).absolute()
        argv = ["flower-superlink",
                "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key"),
                "--ssl-ca-certfile", str(certs / "ca.crt"),
                "--enable-supernode-auth"]
    argv += ["--database", str(Path(database).absolute()), "--host", host, "--port", str(port)]
    if not install_dependencies:
        argv.append("--disable-runtime-dependency-installation")
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    return argv


def start_superlink(certs: Path | None, database: Path, log_path: Path, *, host: str = "127.0.0.1",
                    port: int = 8000, timeout: float = 60.0, flwr_home: Path | None = None,
                    insecure: bool = False, die_with_parent: bool = False) -> FlowerProcess:
    """Start the SuperLink and wait until it serves HTTPS (HTTP with ``insecure``)."""
    p = FlowerProcess("superlink", superlink_command(certs, database, host=host, port=port, insecure=insecure),
                      log_path, flower_env(flwr_home), die_with_parent=die_with_parent)
    try:
        p.wait_for(SUPERLINK_READY, timeout)
    except BaseException:
        p.stop()
        raise
    return p


def write_flwr_config(flwr_home: Path, address: str, root_certificates: Path | None,
                      name: str = CONNECTION_NAME) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default) and return it.

    TLS verified against ``root_certificates``; ``None`` writes an insecure (plain HTTP) connection.
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    tls = ("insecure = true\n" if root_certificates is None
           else f'root-certificates = "{Path(root_certificates).absolute()}"\n')
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flwr_cli(args: list[str], flwr_home: Path, *, cwd: Path | None = None, timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` against the connection in ``flwr_home``; return the parsed JSON.

    Raises LaunchError when the command fails or prints no JSON. Note that ``flwr`` exits 0 even when the JSON says
    ``"success": false``: callers must look at it.
    """
    argv = ["flwr", *args, "--format", "json"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=flower_env(flwr_home), timeout=timeout,
                           cwd=cwd or flwr_home, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LaunchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s (an overloaded machine? "
                          "see the SuperLink's log)") from exc
    start = r.stdout.find("{")
    if r.returncode != 0 or start < 0:
        raise LaunchError(f"{' '.join(argv)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(r.stdout[start:])


def site_keys(certs: Path, sites: list[str] | None = None) -> list[Path]:
    """The site public keys of a coordinator bundle: ``certs/sites/<site>.pub`` (all of them, or ``sites``)."""
    keys_dir = Path(certs) / "sites"
    pubs = sorted(keys_dir.glob("*.pub")) if sites is None else [keys_dir / f"{s}.pub" for s in sites]
    if not pubs:
        raise LaunchError(f"{keys_dir}: no site public keys (*.pub) to register")
    return pubs


def register_site_keys(certs: Path, control: ControlClient, sites: list[str] | None = None
                       ) -> dict[str, int | None]:
    """Register ``certs/sites/<site>.pub`` with a running SuperLink in one pass over ``control``'s connection;
    already-registered keys are accepted. Returns site -> node id (``None`` for a key registered before). (The
    coordinator registers before it starts its SuperLink: :func:`server.control.register_keys_before_start`.)"""
    out = control.register_keys(site_keys(certs, sites))
    for site, node in out.items():
        log.info("site %s: key registered (node %s)", site, node if node is not None else "known before")
    return out
