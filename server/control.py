"""Site keys into a SuperLink, and its Control API called from this process: list nodes, read a run's status.

The ``flwr`` CLI does each of these in a fresh process that imports flwr and opens a new TLS connection (1-2 s
of CPU each, 10-14 s on a loaded 2-core machine: registering 50 sites one ``flwr supernode register`` at a time
took minutes). :class:`ControlClient` is the CLI's own client (``flwr.supercore.control.ControlHttpClient``, the
same request headers: the CLI marker and the runtime version) kept open for the coordinator's whole life, so
registering every key in ``sites/`` is one pass over one connection, and polling who is online or whether the
run finished costs a request, not a process.

Before the coordinator starts its SuperLink it registers every key straight into the SuperLink's state database
with Flower's own LinkState (:func:`register_keys_before_start`): one pass, an SQLite insert per key, and no
moment in which a site can find the SuperLink up but its key unknown. :meth:`ControlClient.register` does the same
through a running SuperLink's Control API (a key added later).

What the Control API accepts is Flower's business: the same answers and errors as ``flwr supernode register``
(``PUBLIC_KEY_ALREADY_IN_USE`` for a key registered before: fine, the node keeps its id), ``flwr supernode ls``
and ``flwr ls --run-id``. Starting a run stays with ``flwr run`` (it builds and uploads the app bundle).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from momkd_fed.processes import LaunchError

log = logging.getLogger(__name__)

ALREADY_REGISTERED = "already in use"  # Flower's error text for a key registered before
TRANSPORT_RETRIES = 3  # a request whose connection dropped is sent again this many times (0.2, 0.4, 0.8 s apart)


def read_public_key(path: Path) -> bytes:
    """The key of an OpenSSH public-key line (``<site>.pub`` from ``momkd-fed certs``) as Flower stores it.

    Raises
    ------
    LaunchError
        Not an EC key on a NIST curve (what Flower accepts), or unreadable; the message names the file.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: not an OpenSSH public key ({exc}) (fix: use the <site>.pub written by "
                          "`momkd-fed certs`)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise LaunchError(f"{path}: Flower accepts only EC keys on a NIST curve (fix: use the <site>.pub written "
                          "by `momkd-fed certs`)")
    return public_key_to_bytes(key)


def register_keys_before_start(database: Path, public_keys: list[Path]) -> dict[str, int | None]:
    """Register site keys straight into a SuperLink's state database, before that SuperLink is started.

    The SuperLink's Control API handles a registration by calling ``LinkState.create_node`` with the account of
    the request (unauthenticated in open-source Flower: ``NOOP_FLWR_AID`` / ``NOOP_ACCOUNT_NAME``) and Flower's
    default heartbeat interval. This does exactly that, through Flower's own LinkState on the same ``--database``
    file, one SQLite insert per key: no HTTPS request, middleware and access log per key (~30 ms of SuperLink CPU
    each), and the keys are there the moment the SuperLink accepts its first SuperNode. Must not run while a
    SuperLink has the database open (the coordinator calls it just before starting its own).

    Returns
    -------
    dict
        Site (the key file's stem) -> new node id, or None for a key registered before (a restart, ``--resume``).
    """
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

    Path(database).parent.mkdir(parents=True, exist_ok=True)
    _, factory = get_objectstore_linkstate_factories(str(Path(database).absolute()), get_federation_manager())
    state = factory.state()
    out: dict[str, int | None] = {}
    try:
        for pub in public_keys:
            try:
                out[Path(pub).stem] = int(state.create_node(
                    owner_aid=NOOP_FLWR_AID, owner_name=NOOP_ACCOUNT_NAME, public_key=read_public_key(pub),
                    heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
            except ValueError as exc:  # "Public key already in use."
                if ALREADY_REGISTERED not in str(exc).lower():
                    raise LaunchError(f"registering {pub} in {database} failed: {exc}") from exc
                out[Path(pub).stem] = None
    finally:
        engine = getattr(state, "_engine", None)
        if engine is not None:
            engine.dispose()  # no connection left open for the SuperLink to meet
    return out


class ControlClient:
    """One open connection to a SuperLink's Control API.

    Parameters
    ----------
    address : str
        ``host:port`` of the SuperLink (loopback on the coordinator).
    root_certificates : Path or None
        The federation CA (``ca.crt``) that signed the SuperLink's certificate; None: plain HTTP (``--insecure``).
    timeout : float
        Seconds per request.
    """

    def __init__(self, address: str, root_certificates: Path | None, timeout: float = 30.0) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would flood the console
        self.address = address
        self.timeout = timeout
        certs = None if root_certificates is None else Path(root_certificates).read_bytes()
        self._client = ControlHttpClient.from_server_address(
            address, insecure=root_certificates is None, root_certificates=certs,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------------------
    def register(self, public_key: Path) -> int | None:
        """Register one site key; returns its new node id, or None when the key was registered before.

        Raises
        ------
        LaunchError
            The SuperLink refused the key for another reason (the message is Flower's).
        """
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module

        request = RegisterNodeRequest(public_key=read_public_key(public_key))
        try:
            res = self._call(lambda: self._client.RegisterNode(request), f"register {public_key}")
        except LaunchError as exc:
            if ALREADY_REGISTERED in str(exc).lower():
                return None
            raise
        if not res.node_id:
            raise LaunchError(f"registering {public_key}: the SuperLink at {self.address} returned no node id")
        return int(res.node_id)

    def register_keys(self, public_keys: list[Path]) -> dict[str, int | None]:
        """Register every key (``<site>.pub``) in one pass; site -> new node id (None: registered before)."""
        return {Path(p).stem: self.register(p) for p in public_keys}

    def nodes(self) -> list[dict]:
        """Every node the SuperLink knows: ``{"node-id": int, "status": "registered" | "online" | "offline" |
        "unregistered"}`` (as ``flwr supernode ls --format json`` reports them)."""
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

        res = self._call(lambda: self._client.ListNodes(ListNodesRequest()), "list the nodes")
        return [{"node-id": int(n.node_id), "status": str(n.status)} for n in res.nodes_info]

    def online(self) -> list[int]:
        """Ids of the nodes online now (sorted)."""
        return sorted(n["node-id"] for n in self.nodes() if n["status"] == "online")

    def run_status(self, run_id: int) -> str:
        """``status`` or ``status:sub_status`` of a run, as ``flwr ls`` prints it (``finished:completed``)."""
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        res = self._call(lambda: self._client.ListRuns(ListRunsRequest(run_id=int(run_id))), f"read run {run_id}")
        run = res.run_dict.get(int(run_id))
        if run is None:
            raise LaunchError(f"the SuperLink at {self.address} knows no run {run_id}")
        return run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")

    def _call(self, fn, what: str):
        """``fn()``; a dropped connection is tried again (the SuperLink closes idle keep-alive connections after
        5 s, and a request can race that), anything else raises LaunchError with Flower's message."""
        import httpx

        for attempt in range(TRANSPORT_RETRIES + 1):
            try:
                return fn()
            except httpx.TransportError as exc:
                if attempt == TRANSPORT_RETRIES:
                    raise LaunchError(f"could not {what} at the SuperLink {self.address}: {_error_text(exc)}") from exc
                log.debug("%s: %s; trying again", what, exc)
                time.sleep(0.2 * 2**attempt)
            except Exception as exc:  # httpx.HTTPStatusError carrying Flower's error JSON, ...
                raise LaunchError(f"could not {what} at the SuperLink {self.address}: {_error_text(exc)}") from exc
        raise AssertionError("unreachable")


def _error_text(exc: Exception) -> str:
    """Flower's error message inside an HTTP error response, else the exception's text."""
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            from flwr.supercore.error import FlowerError

            err = FlowerError.from_json(response.text)
            if err is not None:
                return f"[code: {err.code}] {err.message}"
        except Exception:  # not Flower's JSON: fall back to the raw text
            pass
        return f"HTTP {response.status_code}: {response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"
