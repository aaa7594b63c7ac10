"""Launch a site's Flower SuperNode from its ``momkd-fed certs`` bundle and wait until the SuperLink accepts it.

The process layer under ``momkd-fed client``: the exact ``flower-supernode`` command (TLS with the federation CA,
the site's OpenSSH EC node key, node-config pointing at the local data), readiness and refusal detection. Runs
Flower's executables; does not import flwr. Verified on loopback in tests/test_certs_flower.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from momkd_fed.processes import FlowerProcess, LaunchError, flower_env

SUPERNODE_CONNECTED = re.compile(r"SuperNode ID: (\d+)")  # logged once the SuperLink activated this node
EXIT_AUTH_REFUSED = 305  # Flower exit code logged when the SuperNode cannot connect: unregistered key,
# TLS verification failure or coordinator unreachable (see FAILURES / diagnose)
FLOWER_EXIT_CODE = re.compile(r"Exit Code: (\d+)")  # Flower logs its own code; the process itself exits with 1

# causes of a refused connection, read from the SuperNode's log (it logs "Exit Code: 305" for each of them)
FAILURES = (
    ("certificate", re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error|Hostname mismatch"),
     "certificate mismatch: the coordinator's TLS certificate is not signed by this bundle's ca.crt or does not "
     "name the address used (fix: use the ca.crt of the same `momkd-fed certs` provision, and an address listed "
     "in its --hosts)"),
    ("key", re.compile(r"Failed to activate SuperNode|No SuperNode found with the given public key|"
                       r"\[code: 2004\]"),
     "key not registered: the coordinator refused this site's node key (fix: the coordinator must hold "
     "sites/{site}.pub from the same provision and (re)start `momkd-fed server`; check that --certs is this "
     "site's bundle)"),  # momkd-fed client retries this one until --max-wait-time: the coordinator may be
    # registering the keys right now
    ("unreachable", re.compile(r"Giving up reconnection|Connection refused|Name or service not known|"
                               r"Temporary failure in name resolution|No route to host|timed out", re.I),
     "coordinator unreachable at {superlink} (fix: check the address and port, the coordinator's proxy and the "
     "firewall; retries are bounded by --max-retries / --max-wait-time)"),
)


def flower_exit_code(log_text: str) -> int | None:
    """The Flower exit code a process logged (``Exit Code: 305``), or None if it logged none."""
    m = FLOWER_EXIT_CODE.search(log_text)
    return int(m.group(1)) if m else None


def refusal(log_text: str) -> str | None:
    """Why the SuperNode could not connect, read from its log: ``"certificate"``, ``"key"`` or
    ``"unreachable"`` (the first of :data:`FAILURES` that matches); None if no known cause."""
    return next((cause for cause, rx, _ in FAILURES if rx.search(log_text)), None)


def diagnose(log_text: str, site: str, superlink: str) -> str | None:
    """One line saying why the SuperNode could not connect, read from its log; None if no known cause."""
    cause = refusal(log_text)
    if cause is None:
        return None
    return next(m for c, _, m in FAILURES if c == cause).format(site=site, superlink=superlink)


def read_bundle(bundle: Path) -> dict:
    """The site bundle's ``bundle.json`` (site, superlink address, file names), with paths made absolute."""
    bundle = Path(bundle).absolute()
    path = bundle / "bundle.json"
    if not path.is_file():
        raise LaunchError(f"{path}: not found (fix: pass --certs the folder sites/<site> made by momkd-fed certs)")
    info = json.loads(path.read_text())
    for k in ("root_certificates", "private_key", "public_key"):
        info[k] = str(bundle / info[k])
    return info


def node_config_arg(values: dict[str, str | int | float | bool]) -> str:
    """Format ``--node-config``: space-separated ``key=value``, strings double-quoted (Flower's TOML-ish syntax)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if '"' in v or "\\" in v:
                raise LaunchError(f"node-config {k}={v!r}: quotes and backslashes are not allowed")
            parts.append(f'{k}="{v}"')
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def supernode_command(bundle: Path | None, *, superlink: str | None = None, port: int = 9094,
                      node_config: dict[str, str | int | float | bool] | None = None,
                      max_retries: int | None = None, max_wait_time: float | None = None,
                      insecure: bool = False) -> list[str]:
    """``flower-supernode`` for the site whose bundle is ``bundle`` (``out/sites/<site>``).

    Parameters
    ----------
    bundle : Path or None
        The site bundle; None only with ``insecure``.
    superlink : str, optional
        ``host:port`` of the coordinator's Fleet API; default: the address in ``bundle.json``.
    port : int
        The SuperNode's local Runtime API port (loopback; distinct per SuperNode on one host).
    node_config : dict, optional
        Site values for the ClientApp's ``context.node_config`` (e.g. ``{"site": "hospital_a", "config-path": P}``).
    max_retries, max_wait_time : optional
        Bound the reconnection attempts (count / seconds); Flower's default is to retry forever.
    insecure : bool
        Plain HTTP, no node key (testing only).
    """
    if insecure:
        if not superlink:
            raise LaunchError("supernode: --insecure needs the coordinator address (superlink=host:port)")
        argv = ["flower-supernode", "--superlink", superlink, "--insecure", "--port", str(port)]
    else:
        if bundle is None:
            raise LaunchError("supernode: no site bundle given (fix: pass --certs the sites/<site> folder made by "
                              "momkd-fed certs)")
        info = read_bundle(bundle)
        argv = ["flower-supernode",
                "--superlink", superlink or info["superlink"],
                "--root-certificates", info["root_certificates"],
                "--auth-supernode-private-key", info["private_key"],
                "--port", str(port)]
    if node_config:
        argv += ["--node-config", node_config_arg(node_config)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def start_supernode(bundle: Path, log_path: Path, *, timeout: float = 60.0, **kwargs) -> tuple[FlowerProcess, int]:
    """Start the SuperNode and wait until the SuperLink has accepted it; return the process and its node id.

    Raises LaunchError (with the log tail) if it exits first: exit code 305 means the SuperLink refused it, most
    often because the coordinator has not registered this site's public key.
    """
    name = f"supernode {read_bundle(bundle)['site']}"
    p = FlowerProcess(name, supernode_command(bundle, **kwargs), log_path, flower_env())
    try:
        m = p.wait_for(SUPERNODE_CONNECTED, timeout)
    except LaunchError as exc:
        p.stop()
        if flower_exit_code(p.output()) == EXIT_AUTH_REFUSED:
            why = diagnose(p.output(), name.split()[-1], kwargs.get("superlink") or "the bundle's address")
            raise LaunchError(f"{name}: could not connect (Flower exit 305): {why or 'see the log'}\n"
                              f"{p.tail(15)}") from exc
        raise
    except BaseException:
        p.stop()
        raise
    return p, int(m.group(1))
