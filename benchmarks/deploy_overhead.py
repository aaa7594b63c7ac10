"""Benchmark: what a real deployment costs beyond the training itself (TLS, node authentication, real processes).

Three parts (``--parts``, all by default):

- ``registration``: site keys made by ``momkd-fed certs`` (50 sites), registered the way ``momkd-fed server``
  does it (``before start``: :func:`server.control.register_keys_before_start`, into a fresh state database
  before the SuperLink starts) and, for reference, through a running TLS SuperLink's Control API (``control
  api``: one process, one connection, one pass). Each measurement runs in a fresh Python process and times the
  whole step (imports, connection, registering), for 1 key and for 50 keys (fresh database each, ``--repeats``
  times, interleaved); also its CPU seconds (with the SuperLink's share for the Control API), what it costs on
  idle cores. The old way (one ``flwr supernode register`` process per key) is timed once.
- ``startup``: a ClientApp's start-up before its first training step. Cold = a fresh process that imports what
  ``flwr-clientapp`` imports, then ``client.client_app``, then handles a round-1 train message of the site
  (:mod:`client.timings` phases: process start -> imported -> handler -> data loaded -> model and optimiser ->
  first step). Warm (``momkd-fed client``'s default, :mod:`client.warm_start`) is read from the deployment part:
  the shim's start -> the forked child's ``imported``, plus the same handler phases.
- ``deploy``: ``momkd-fed server`` and one ``momkd-fed client`` per site as real processes on this machine (TLS,
  SuperNode authentication, loopback), the tcga-brca preset (HER2 task) at the ``--medium`` dims of
  ``benchmarks/accuracy.py`` (configs/cpu_small.yaml, fp32, 1 thread, median 100 patches, full cohort), 3 and 6
  sites (the first N regions of the preset), ``--rounds`` rounds. Per round, from ``rounds.jsonl`` (server) and
  each site's ``timings.jsonl`` (:mod:`client.timings`):

  * ``round wall``: the server's round seconds (train exchange + aggregation + evaluate exchange + checkpoint);
  * ``compute`` of a site: its local training (first step -> trained, the first step included), validation
    and test evaluation: what it would spend on the round alone; ``slowest`` = the largest over sites;
  * the breakdown, for the slowest site: ``start-up`` (process start -> imports done; per message), ``load``
    (handler -> config and site data ready), ``build`` (model and optimiser), ``transfer in`` (imports done ->
    handler: Flower pulls the message from the SuperNode, installs the app bundle), ``reply`` (building the
    reply), and ``Flower`` = the server's reply time for that site minus the site's own process wall time
    (SuperNode and SuperExec polling, the message's way SuperLink -> SuperNode and back, the ServerApp's reply
    polling); server-side ``aggregate`` and ``checkpoint``;
  * ``ratio`` = round wall / slowest site's compute (target <= 1.15 at 3 sites);
  * ``setup``: key registration (the coordinator's log), the ServerApp's set-up seconds (``summary.json``:
    genomic statistics, k-means seed, refine) against one round's wall time (target: at most one round).

Results: ``<out>/results.jsonl`` (one row per measurement; a finished configuration is skipped on a re-run, so
an interrupted run resumes) and a Markdown table on stdout.

Usage::

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 python benchmarks/deploy_overhead.py
    python benchmarks/deploy_overhead.py --parts deploy --sites 3 --rounds 2          # one deployment
    python benchmarks/deploy_overhead.py --parts deploy --sites 3 --cold              # Flower's cold ClientApps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from momkd_fed.processes import FlowerProcess, flower_env, free_port  # noqa: E402

log = logging.getLogger("deploy_overhead")

MOMKD = [sys.executable, "-m", "momkd_fed.cli"]
MEDIUM_MODEL = {"model": {"hidden_dim": 128, "shared_dim": 32, "omics_hidden": 128, "omics_embed_dim": 128,
                          "cls_hidden": 64}, "memory": {"slots": 8}}  # configs/cpu_small.yaml's dims
MEDIUM_DATA = {"max_slides_per_site": 0, "median_patches": 100, "max_patches": 300}  # accuracy.py --medium


# --------------------------------------------------------------------------------------------------------------
# helpers


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    return f"{platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}"


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def cohort(out: Path, seed: int) -> Path:
    """The tcga-brca HER2 cohort at accuracy.py --medium's data settings (generated once)."""
    from momkd_fed.synth import synthesize

    path = out / "data" / "brca-her2" / "federation.yaml"
    if not path.exists():
        log.info("synthesising the tcga-brca cohort in %s", path.parent)
        synthesize("tcga-brca", path.parent, seed=seed, task="her2", **MEDIUM_DATA)
    return path


def federation_yaml(src: Path, n_sites: int, rounds: int, dest: Path) -> tuple[Path, list[str]]:
    """The first ``n_sites`` sites of ``src`` with the medium dims, ``rounds`` rounds, 1 thread; absolute paths."""
    import yaml

    doc = yaml.safe_load(src.read_text())
    sites = doc["sites"][:n_sites]
    for s in sites:
        for k in ("manifest", "features_dir", "omics"):
            if s.get(k):
                s[k] = str((src.parent / s[k]).resolve())
    doc["sites"] = sites
    for section, values in MEDIUM_MODEL.items():
        doc.setdefault(section, {}).update(values)
    doc.setdefault("train", {}).update({"threads": 1, "precision": "fp32", "device": "cpu", "progress": False})
    doc.setdefault("federation", {}).update({"rounds": rounds, "min_sites": n_sites, "round_timeout": 3600.0})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(doc))
    return dest, [s["name"] for s in sites]


# --------------------------------------------------------------------------------------------------------------
# registration


_REGISTER = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from server.deploy import site_keys
certs, where, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
keys = site_keys(certs)[:n]
if where.endswith(".db"):  # the coordinator's way: into the state database before the SuperLink starts
    from server.control import register_keys_before_start
    t1 = time.perf_counter()
    ids = register_keys_before_start(Path(where), keys)
else:  # a running SuperLink's Control API (host:port)
    from server.control import ControlClient
    with ControlClient(where, certs / "ca.crt") as c:
        t1 = time.perf_counter()
        ids = c.register_keys(keys)
t2 = time.perf_counter()
print(json.dumps({"keys": len(ids), "new": sum(v is not None for v in ids.values()), "step_s": t2 - t0,
                  "requests_s": t2 - t1, "step_cpu_s": time.process_time()}))
"""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def part_registration(out: Path, repeats: int, n_keys: int) -> list[dict]:
    from server.deploy import flwr_cli, site_keys, start_superlink, write_flwr_config

    work = out / "registration"
    prov = work / "certs"
    if not (prov / "coordinator" / "sites").is_dir():
        sites = ",".join(f"site{i:02d}" for i in range(n_keys))
        subprocess.run([*MOMKD, "certs", "--out", str(prov), "--sites", sites, "--hosts", "localhost"], check=True,
                       capture_output=True, env=flower_env())
    coord = prov / "coordinator"
    rows = []

    def run(n: int, where: str) -> dict:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _REGISTER, str(coord), where, str(n)], capture_output=True,
                           text=True, env=flower_env(), cwd=REPO, timeout=900)
        wall = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        return {"process_s": wall, **json.loads(r.stdout.strip().splitlines()[-1])}

    for rep in range(repeats):
        for n in (1, n_keys):
            db = work / f"r{rep}-{n}.db"
            for old in work.glob(f"{db.name}*"):  # a fresh state: every key is new
                old.unlink()
            res = run(n, str(db))  # the coordinator's way, before its SuperLink starts
            rows.append({"part": "registration", "way": "before start", "keys": n, "repeat": rep, **res,
                         "cpu_s": res["step_cpu_s"], "load": load_average()})
            log.info("registration: %s", rows[-1])
            # a running SuperLink's Control API (fresh database), and once the old way: a CLI process per key
            db = work / f"c{rep}-{n}.db"
            for old in work.glob(f"{db.name}*"):
                old.unlink()
            port = free_port()
            link = start_superlink(coord, db, work / f"superlink-{rep}-{n}.log", port=port, timeout=300,
                                   flwr_home=work / "flwr_home")
            try:
                c0 = _cpu_seconds(link.pid)
                res = run(n, f"127.0.0.1:{port}")
                link_cpu = _cpu_seconds(link.pid) - c0
                row = {"part": "registration", "way": "control api", "keys": n, "repeat": rep, **res,
                       "superlink_cpu_s": link_cpu, "cpu_s": res["step_cpu_s"] + link_cpu, "load": load_average()}
                if n == 1 and rep == 0:
                    write_flwr_config(work / "flwr_home", f"127.0.0.1:{port}", coord / "ca.crt")
                    pub = site_keys(coord)[-1]
                    t0 = time.perf_counter()
                    flwr_cli(["supernode", "register", str(pub)], work / "flwr_home", timeout=300)
                    row["cli_one_key_s"] = time.perf_counter() - t0
                rows.append(row)
                log.info("registration: %s", row)
            finally:
                link.stop()
    return rows


# --------------------------------------------------------------------------------------------------------------
# start-up (cold)


_PREP = r"""
import json, sys, torch
from pathlib import Path
from momkd_fed.config import load_config
from momkd_fed.federation.sharing import partition_state
from client.run_config import RunOptions, make_run_config
from client.site_runtime import build_initial_model, SiteRuntime
cfg = load_config(sys.argv[1])
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
rt = SiteRuntime.load(cfg, RunOptions(), {"site": cfg.sites[0].name})  # warms the site cache, as a running site has
n_genes = len(rt.data.genes)
m = build_initial_model(cfg, n_genes)
rc = make_run_config(cfg, RunOptions(out_dir=str(out / "run"), state_dir=str(out / "state")))
(out / "rc.json").write_text(json.dumps(rc))
torch.save({"shared": dict(partition_state(m.state_dict(), cfg.federation).shared), "n_genes": n_genes,
            "slots": m.memory.slots.detach().clone(), "site": cfg.sites[0].name}, out / "global.pt")
"""

_COLD = r"""
import flwr.supernode.runtime.run_clientapp  # what a cold flwr-clientapp imports before the app
import client.client_app as ca
import json, sys, torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client import records as R
from momkd_fed.federation import contract
d, run_key = sys.argv[1], sys.argv[2]
rc, g = json.load(open(f"{d}/rc.json")), torch.load(f"{d}/global.pt")
cfg = ConfigRecord({contract.CFG_ROUND: 1, contract.CFG_LR: 2e-4, contract.CFG_LOCAL_EPOCHS: 1,
                    R.CFG_N_GENES: g["n_genes"], R.CFG_RUN_KEY: run_key})
content = RecordDict({contract.ARRAYS_RECORD: R.to_record(g["shared"]), contract.CONFIG_RECORD: cfg,
                      contract.MEMORY_RECORD: R.to_record({contract.SLOTS: g["slots"]})})
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
ca.app(msg, Context(run_id=1, node_id=1, node_config={"site": g["site"]}, state=RecordDict(), run_config=rc))
"""


def part_startup(out: Path, config: Path, repeats: int) -> list[dict]:
    work = out / "startup"
    env = {**flower_env(), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _PREP, str(config), str(work)], check=True, env=env, cwd=REPO)
    rows = []
    for rep in range(repeats):
        key = f"cold{rep}-{time.time():.0f}"
        r = subprocess.run([sys.executable, "-c", _COLD, str(work), key], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=1200)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        rec = json.loads(next((work / "state").rglob(f"{key}/timings.jsonl")).read_text().splitlines()[-1])
        row = {"part": "startup", "mode": "cold", "repeat": rep, **_startup_figures(rec), "load": load_average()}
        rows.append(row)
        log.info("startup: %s", row)
    return rows


def _startup_figures(rec: dict) -> dict:
    """Start-up of one train message from its timings record: imports, then handler -> first step."""
    w, c = rec["wall"], rec["cpu"]
    return {"imports_s": w["imported"], "imports_cpu_s": c["imported"],
            "handler_to_step_s": w["first_step"] - w["handler"],
            "handler_to_step_cpu_s": c["first_step"] - c["handler"],
            "startup_s": w["imported"] + w["first_step"] - w["handler"],
            "startup_cpu_s": c["imported"] + c["first_step"] - c["handler"]}


# --------------------------------------------------------------------------------------------------------------
# deployment


def part_deploy(out: Path, config_src: Path, n_sites: int, rounds: int, cold: bool, timeout: float) -> dict:
    from momkd_fed.certs import provision

    tag = f"{n_sites}sites-{rounds}r-{'cold' if cold else 'warm'}-{time.strftime('%H%M%S')}"
    work = out / "deploy" / tag
    config, sites = federation_yaml(config_src, n_sites, rounds, work / "federation.yaml")
    _warm_site_caches(config)  # a running site's slide cache is warm after its first message: measure that state
    prov = provision(work / "certs", coordinator_hosts=["localhost"], sites=sites)
    port = free_port()
    env = {**flower_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[FlowerProcess] = []
    t0 = time.time()
    load = [load_average()]
    try:
        server = FlowerProcess("server", [*MOMKD, "server", "--config", str(config), "--certs",
                                          str(prov.coordinator_dir), "--out", str(work / "run"), "--port", str(port),
                                          "--wait-sites", "900"], work / "server.out",
                               {**env, "FLWR_HOME": str(work / "flwr_server")})
        procs.append(server)
        for s in sites:
            argv = [*MOMKD, "client", "--config", str(config), "--site", s, "--certs", str(prov.site_dirs[s]),
                    "--superlink", f"127.0.0.1:{port}", "--state-dir", str(work / "state" / s)]
            procs.append(FlowerProcess(f"client {s}", argv + (["--cold"] if cold else []), work / f"client_{s}.out",
                                       {**env, "FLWR_HOME": str(work / f"flwr_{s}")}))
        while server.proc.poll() is None:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"deployment not finished after {timeout:.0f} s:\n{server.tail(30)}")
            time.sleep(5)
            if int(time.time() - t0) % 60 < 5:
                load.append(load_average())
        if server.proc.returncode != 0:
            raise RuntimeError(f"momkd-fed server exited {server.proc.returncode}:\n{server.tail(40)}")
    finally:
        for p in reversed(procs):
            p.stop(timeout=20)
    wall = time.time() - t0
    return analyse(work, sites, rounds, cold, wall, load)


def _warm_site_caches(config: Path) -> None:
    from momkd_fed.config import load_config
    from momkd_fed.data.site import load_site

    cfg = load_config(config)
    for site in cfg.sites:
        load_site(site, cfg)


def _site_timings(work: Path, site: str) -> dict[tuple[str, int], dict]:
    path = next((work / "state" / site).rglob("timings.jsonl"))
    return {(r["kind"], r["round"]): r for r in read_rows(path)}


def analyse(work: Path, sites: list[str], rounds: int, cold: bool, wall: float, load: list[str]) -> dict:
    run = work / "run"
    rows = read_rows(run / "rounds.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    reg = None
    for line in (work / "server.out").read_text().splitlines():
        if "site keys registered in" in line:
            reg = float(line.split("site keys registered in")[1].split()[0])
    timings = {s: _site_timings(work, s) for s in sites}
    per_round = []
    for row in rows:
        r = row["round"]
        sec = row["seconds"]
        site_fig = {}
        for s in sites:
            tr, ev = timings[s].get(("train", r)), timings[s].get(("evaluate", r))
            if tr is None or ev is None:
                continue
            w, we = tr["wall"], ev["wall"]
            train = w["trained"] - w["model"]
            val = w["validated"] - w["trained"]
            evaluate = we["evaluated"] - we["loaded"]
            replies = sec.get("replies", {})
            flower = (replies.get("train", {}).get(s, float("nan")) - w["reply"]
                      + replies.get("evaluate", {}).get(s, float("nan")) - we["reply"])
            site_fig[s] = {
                "compute": train + val + evaluate, "train": train, "validate": val, "evaluate": evaluate,
                "startup": w["imported"] + we["imported"],
                "startup_train_to_step": w["imported"] + w["first_step"] - w["handler"],
                "transfer_in": (w["handler"] - w["imported"]) + (we["handler"] - we["imported"]),
                "load": (w["loaded"] - w["handler"]) + (we["loaded"] - we["handler"]),
                "build": w["model"] - w["loaded"],
                "reply": (w["reply"] - w["validated"]) + (we["reply"] - we["evaluated"]),
                "flower": flower,
                "startup_cpu": tr["cpu"]["imported"] + ev["cpu"]["imported"]}
        slowest = max(site_fig, key=lambda s: site_fig[s]["compute"])
        per_round.append({"round": r, "wall": sec["total"], "train_exchange": sec["train"] - sec.get("aggregate", 0),
                          "aggregate": sec.get("aggregate"), "checkpoint": sec.get("checkpoint"),
                          "slowest": slowest, "ratio": sec["total"] / site_fig[slowest]["compute"],
                          "sites": site_fig})
    setup_msgs = {s: {k: v["wall"]["reply"] for (k, rr), v in timings[s].items() if rr == 0} for s in sites}
    return {"part": "deploy", "sites": len(sites), "site_names": sites, "rounds": rounds,
            "mode": "cold" if cold else "warm", "wall_s": wall, "registration_s": reg,
            "setup_s": summary.get("setup_seconds"), "setup_messages": setup_msgs, "per_round": per_round,
            "load": load, "folder": str(work)}


# --------------------------------------------------------------------------------------------------------------
# report


def report(rows: list[dict]) -> str:
    out = []
    reg = [r for r in rows if r["part"] == "registration" and "way" in r]
    if reg:
        out.append("| way | keys | step s (median wall) | of which registering s | ratio to 1 key | CPU s | "
                   "CPU ratio |")
        out.append("|---|---|---|---|---|---|---|")
        many_n = max(r["keys"] for r in reg)
        for way in ("before start", "control api"):
            med = {n: {k: statistics.median(r[k] for r in reg if r["way"] == way and r["keys"] == n)
                       for k in ("step_s", "requests_s", "cpu_s")} for n in (1, many_n)}
            for n in (1, many_n):
                m = med[n]
                out.append(f"| {way} | {n} | {m['step_s']:.2f} | {m['requests_s']:.3f} | "
                           f"{m['step_s'] / med[1]['step_s']:.2f} | {m['cpu_s']:.2f} | "
                           f"{m['cpu_s'] / med[1]['cpu_s']:.2f} |")
        cli = next((r["cli_one_key_s"] for r in reg if "cli_one_key_s" in r), None)
        if cli is not None:
            out.append(f"\nold way, one `flwr supernode register` process for one key: {cli:.2f} s")
        out.append(f"loads: {sorted({r['load'] for r in reg})}\n")
    st = [r for r in rows if r["part"] == "startup"]
    if st:
        out.append("| ClientApp | imports s (cpu) | handler -> first step s (cpu) | start-up s (cpu) |")
        out.append("|---|---|---|---|")
        for r in st:
            out.append(f"| {r['mode']} #{r['repeat']} | {r['imports_s']:.2f} ({r['imports_cpu_s']:.2f}) | "
                       f"{r['handler_to_step_s']:.2f} ({r['handler_to_step_cpu_s']:.2f}) | {r['startup_s']:.2f} "
                       f"({r['startup_cpu_s']:.2f}) | load {r['load']}")
        out.append("")
    for d in (r for r in rows if r["part"] == "deploy"):
        out.append(f"**{d['sites']} sites, {d['mode']} ClientApps**, {d['rounds']} rounds, wall {d['wall_s']:.0f} s, "
                   f"key registration {d['registration_s']} s, set-up {d['setup_s']:.1f} s, load {d['load']}")
        out.append("| round | wall s | slowest site | its compute s | ratio | start-up s | load s | build s | "
                   "transfer in s | reply s | Flower s | aggregate s | checkpoint s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for pr in d["per_round"]:
            f = pr["sites"][pr["slowest"]]
            out.append(f"| {pr['round']} | {pr['wall']:.1f} | {pr['slowest']} | {f['compute']:.1f} | {pr['ratio']:.2f} "
                       f"| {f['startup']:.2f} | {f['load']:.2f} | {f['build']:.2f} | {f['transfer_in']:.2f} | "
                       f"{f['reply']:.2f} | {f['flower']:.2f} | {pr['aggregate']:.2f} | {pr['checkpoint']:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="registration,startup,deploy")
    ap.add_argument("--sites", default="3,6", help="site counts of the deployment part")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="deployment with Flower's cold ClientApp processes")
    ap.add_argument("--keys", type=int, default=50, help="site keys of the registration part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="cohort seed")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per deployment")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "deploy_overhead")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    a.out = a.out.resolve()  # the flwr CLI runs in other folders
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    results = a.out / "results.jsonl"
    done = read_rows(results)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if not a.report_only:
        if "registration" in parts and not any(r["part"] == "registration" for r in done):
            for row in part_registration(a.out, a.repeats, a.keys):
                append_row(results, row)
        if "startup" in parts or "deploy" in parts:
            src = cohort(a.out, a.seed)
        if "startup" in parts and not any(r["part"] == "startup" for r in done):
            cfg, _ = federation_yaml(src, 1, 1, a.out / "startup" / "federation.yaml")
            for row in part_startup(a.out, cfg, a.repeats):
                append_row(results, row)
        if "deploy" in parts:
            mode = "cold" if a.cold else "warm"
            for n in (int(x) for x in a.sites.split(",") if x.strip()):
                if any(r["part"] == "deploy" and r["sites"] == n and r["mode"] == mode and r["rounds"] == a.rounds
                       for r in read_rows(results)):
                    log.info("deploy: %d sites (%s) already measured; skipped", n, mode)
                    continue
                try:
                    append_row(results, part_deploy(a.out, src, n, a.rounds, a.cold, a.timeout))
                except RuntimeError as exc:  # an overloaded machine can time a deployment out: say so, go on
                    log.error("deploy: %d sites (%s) failed: %s", n, mode, exc)
    print(f"machine: {machine()}; load now {load_average()}\n")
    print(report(read_rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
