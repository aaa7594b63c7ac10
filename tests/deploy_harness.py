"""Helpers for the deployment end-to-end tests: a tiny 2-site federation, certificates, and the real
``momkd-fed server`` / ``momkd-fed client`` commands run as processes (optionally inside a network namespace).

Every process is started through :class:`momkd_fed.processes.FlowerProcess` (output in a file, stopped by PID together
with everything below it); tests stop them in ``finally`` blocks. Each test gets a private ``FLWR_HOME``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from momkd_fed.certs import add_site, provision
from momkd_fed.processes import FlowerProcess, descendants

SITES = ("hospital_a", "hospital_b")
THREE_SITES = ("hospital_a", "hospital_b", "hospital_c")  # hospital_b holds no genomics in either federation
MOMKD = [sys.executable, "-m", "momkd_fed.cli"]


def have_flower() -> bool:
    return shutil.which("flower-superlink") is not None and shutil.which("flower-supernode") is not None


def make_federation(root: Path, sites: tuple[str, ...] = SITES, **federation) -> Path:
    """Synthesise the tiny federation with ``sites`` (30 slides each; hospital_b histology-only) and write a test
    config next to it: 2 rounds, every site needed, one thread, short round timeout; ``federation`` overrides."""
    from momkd_fed.synth import synthesize

    data = root / f"data{len(sites)}"
    if not (data / "federation.yaml").exists():
        synthesize("tiny", data, seed=0, sites=sites, slides_per_site=(30,) * len(sites),
                   prevalence=(0.4, 0.6, 0.5)[: len(sites)], histology_only=("hospital_b",))
    doc = yaml.safe_load((data / "federation.yaml").read_text())
    doc["federation"].update({"rounds": 2, "min_sites": len(sites), "round_timeout": 150.0, **federation})
    doc.setdefault("train", {})["threads"] = 1
    name = "test_" + "_".join(f"{k}{v}" for k, v in sorted(federation.items())) + ".yaml"
    path = data / name
    path.write_text(yaml.safe_dump(doc))
    return path


def site_yaml(config: Path, site: str, as_name: str, out: Path) -> Path:
    """A site YAML holding ``site``'s data (absolute paths) under the name ``as_name``."""
    doc = yaml.safe_load(config.read_text())
    entry = next(s for s in doc["sites"] if s["name"] == site)
    entry = {k: (str((config.parent / v).resolve()) if k in ("manifest", "features_dir", "omics") and v else v)
             for k, v in entry.items()}
    entry["name"] = as_name
    doc["sites"] = [entry]
    out.write_text(yaml.safe_dump(doc))
    return out


def make_certs(root: Path, hosts: list[str], intruder: bool = False, sites: tuple[str, ...] = SITES):
    """Provision ``sites`` (plus an ``intruder`` whose key the coordinator does NOT hold)."""
    prov = provision(root / "certs", coordinator_hosts=hosts, sites=list(sites))
    if intruder:
        add_site(root / "certs", "intruder")
        (prov.coordinator_dir / "sites" / "intruder.pub").unlink()  # issued, never registered
    return prov


def env(flwr_home: Path) -> dict[str, str]:
    e = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_HOME": str(flwr_home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    return e


def start_server(tmp: Path, config: Path, certs: Path | None, out: Path, *args: str, netns: str | None = None,
                 name: str = "server") -> FlowerProcess:
    argv = [*MOMKD, "server", "--config", str(config), "--out", str(out), "--wait-sites", "120", *args]
    if certs is not None:
        argv += ["--certs", str(certs)]
    return FlowerProcess(name, _in(netns, argv), tmp / f"{name}.out", env(tmp / f"flwr_{name}"))


def start_client(tmp: Path, config: Path, site: str, bundle: Path | None, *args: str, netns: str | None = None,
                 name: str | None = None) -> FlowerProcess:
    name = name or f"client_{site}"
    argv = [*MOMKD, "client", "--config", str(config), "--site", site, "--state-dir", str(tmp / "state" / name),
            *args]
    if bundle is not None:
        argv += ["--certs", str(bundle)]
    return FlowerProcess(name, _in(netns, argv), tmp / f"{name}.out", env(tmp / f"flwr_{name}"))


def _in(netns: str | None, argv: list[str]) -> list[str]:
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


def wait_until(pred, timeout: float, what: str, procs: list[FlowerProcess] = (), every: float = 0.5):
    """Poll ``pred()`` until truthy; AssertionError naming ``what`` (with the processes' log tails) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(25)}" for p in procs)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(every)


def rounds(out: Path) -> list[dict]:
    path = out / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_tree(p: FlowerProcess, include_self: bool = True) -> list[int]:
    """SIGKILL ``p``'s descendants (and ``p``): a crash, no chance to say goodbye. Returns the PIDs killed."""
    pids = descendants(p.pid) + ([p.pid] if include_self else [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def stop_all(procs: list[FlowerProcess]) -> None:
    for p in reversed(procs):
        try:
            p.stop(timeout=15)
        except Exception:  # keep stopping the others
            pass


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def leftover(pids: set[int]) -> list[str]:
    """Which of ``pids`` are still alive (not zombies): 'pid cmdline'."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmd = _cmdline(pid)
        if stat != "Z":
            out.append(f"{pid} {cmd[:150]}")
    return out


def run(argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


class Watch:
    """Samples every process below this one while a test runs, to check afterwards that none survived.

    ``seen``: pid -> (start time, command line) of every process sampled.
    """

    def __init__(self) -> None:
        import threading

        self.seen: dict[int, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from momkd_fed.processes import start_time

        while not self._stop.is_set():
            for pid in descendants(os.getpid()):
                if pid not in self.seen:
                    self.seen[pid] = (start_time(pid), _cmdline(pid))
            self._stop.wait(0.3)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def survivors(self) -> list[str]:
        from momkd_fed.processes import start_time

        return leftover({pid for pid, (t, _) in self.seen.items() if t and start_time(pid) == t})
