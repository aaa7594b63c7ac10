"""Benchmark: how the federation's wall time grows with the number of sites (Flower's real simulation engine).

For each site count (default 2, 4 and 8) a tiny-like synthetic federation is written with that many sites, each
of the same size (``--slides`` slides, every other site histology-only), and run for ``--rounds`` rounds through
``server.simulate.run_simulation`` (private SuperLink in simulation mode, ``flwr run``, Ray, one CPU per virtual
client). From ``rounds.jsonl`` and ``summary.json``, per round:

- ``wall``: the round's wall seconds (train phase + evaluate phase + checkpoint), as the server logs them;
- ``train wall``: the train phase alone (send, every site trains, replies, aggregation);
- ``sum local`` / ``max local``: the sum and the maximum over sites of ``train_seconds`` (the train metric each
  site reports: wall seconds of ``client.local_round.train_round`` = load state, assemble model, local epochs,
  validation, save state -- not the message unpacking, the site's data loading or the evaluate phase);
- overhead ratios ``train wall / sum local`` (1.0 = no overhead, strictly serial clients) and
  ``train wall / max local`` (1.0 = perfectly parallel clients with no overhead; with 2 cores and 1 CPU per
  client the floor is about ``n_sites / 2`` times the mean site).

Also per site count: seconds to start the engine (SuperLink, ``flwr run``, Ray) and to set up before round 1
(genomic moments, k-means seed, ``memory.kmeans_rounds`` k-means refine exchanges; until 2026-12 one exchange
per k-means iteration, ``memory.kmeans_iters`` of them). Finally the
fixed cost a ClientApp message pays before any training, measured separately: a fresh Python process importing the
ClientApp (a SuperNode starts one per message in a deployment), ``SiteRuntime.load`` (config parse + slide-cache
read), the seeded model build and the first optimiser construction (``torch.optim.AdamW`` imported ``torch._dynamo``
the first time, ~2-3 s: it is inside the round-1 ``train_seconds`` of every Ray worker, and inside every train
message of a deployment, where each message gets a fresh process).

Usage (3-5 minutes on 2 shared cores with the defaults)::

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 python benchmarks/federation_scaling.py
    python benchmarks/federation_scaling.py --sites 2 4 --rounds 2 --slides 24   # ~3 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

log = logging.getLogger("federation_scaling")

REPO = Path(__file__).resolve().parents[1]
PREVALENCE = (0.35, 0.5, 0.65)


def write_federation(root: Path, n_sites: int, slides: int, seed: int) -> Path:
    """A tiny-preset federation of ``n_sites`` equal sites (odd-numbered ones histology-only); its YAML path."""
    from momkd_fed.synth import synthesize

    names = tuple(f"site_{i:02d}" for i in range(n_sites))
    return synthesize("tiny", root, seed=seed, sites=names, slides_per_site=(slides,) * n_sites,
                      prevalence=tuple(PREVALENCE[i % len(PREVALENCE)] for i in range(n_sites)),
                      histology_only=names[1::2])


def run_one(n_sites: int, rounds: int, slides: int, out: Path, seed: int) -> dict:
    """Synthesise and simulate one federation; return its timing figures."""
    from momkd_fed.config import load_config
    from momkd_fed.run_log import read_rounds
    from server.simulate import run_simulation

    t0 = time.perf_counter()
    cfg = load_config(write_federation(out / "data", n_sites, slides, seed))
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds))
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    status, summary = run_simulation(cfg, out / "run", timeout=60.0 * (5 + 3 * rounds) * max(1, n_sites // 2))
    t_sim = time.perf_counter() - t0
    if summary is None:
        raise RuntimeError(f"{n_sites} sites: simulation ended with status {status!r}; see {out / 'run'}")
    rows = read_rounds(out / "run")
    per_round = []
    for r in rows:
        local = [float(m["train_seconds"]) for m in r["train"].values()]
        sec = r["seconds"]
        per_round.append({"round": r["round"], "wall": sec["total"], "train_wall": sec["train"],
                          "evaluate_wall": sec["evaluate"], "sum_local": sum(local), "max_local": max(local),
                          "mean_local": statistics.mean(local), "sites": len(local)})
    rounds_wall = sum(p["wall"] for p in per_round)
    kmeans_s = setup_kmeans_seconds(out / "run" / "server.log")
    return {"sites": n_sites, "rounds": per_round, "synth_s": t_synth, "simulate_s": t_sim,
            "setup_round_trips": 2 + cfg.memory.kmeans_rounds,  # omics moments, k-means seed, k-means refines
            "setup_first_contact_s": float(summary["seconds"]) - rounds_wall - kmeans_s
            if kmeans_s is not None else None, "setup_kmeans_s": kmeans_s,
            "server_s": float(summary["seconds"]), "setup_s": float(summary["seconds"]) - rounds_wall,
            "engine_s": t_sim - float(summary["seconds"]), "bytes_sent": summary["bytes_sent"],
            "bytes_received": summary["bytes_received"]}


def setup_kmeans_seconds(server_log: Path) -> float | None:
    """Seconds from the roster ("setup: sites ...", after the first message reached every site) to round 1, read
    from the last run in ``server.log``; None if the lines are missing. The rest of the setup is first contact:
    node wait, the first message to each simulation worker (process start, imports, first site load)."""
    from datetime import datetime

    def stamp(line: str) -> datetime:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

    if not server_log.is_file():
        return None
    lines = server_log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if "setup: sites" in line]
    if not starts:
        return None
    tail = lines[starts[-1]:]
    r1 = next((line for line in tail if "round 1: training" in line), None)
    return None if r1 is None else (stamp(r1) - stamp(tail[0])).total_seconds()


# ----------------------------------------------------------------------------------------------------------------
# fixed per-message costs


_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import client.client_app  # noqa: F401  (torch, flwr, the package: what a fresh flwr-clientapp process imports)
t_import = time.perf_counter() - t0
from momkd_fed.config import load_config
from client.run_config import RunOptions, make_run_config, split_run_config
from client.site_runtime import SiteRuntime
from momkd_fed.engine import make_optimizer
cfg = load_config(sys.argv[1])
rc = make_run_config(cfg, RunOptions(out_dir="/tmp/unused"))
out = {"import_s": t_import}
for k in range(2):  # 1st: cold within the process; 2nd: what a reused (Ray actor) process pays
    t0 = time.perf_counter()
    c, o = split_run_config(rc)
    rt = SiteRuntime.load(c, o, {"partition-id": 0})
    t1 = time.perf_counter()
    model = rt.build_model(64)
    t2 = time.perf_counter()
    make_optimizer(model, c.train)  # until 2026-12 the first AdamW in a process imported torch._dynamo
    t3 = time.perf_counter()
    out[f"load_s_{k}"], out[f"build_s_{k}"], out[f"optim_s_{k}"] = t1 - t0, t2 - t1, t3 - t2
out["slides"] = len(rt.data.bags)
print(json.dumps(out))
"""


def message_fixed_costs(config_path: Path, repeats: int = 2) -> dict:
    """Median over ``repeats`` fresh processes: import of the ClientApp, site load (cache), model build."""
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _PROBE, str(config_path)], capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=300)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"probe failed:\n{res.stderr[-2000:]}")
        d = json.loads(res.stdout.strip().splitlines()[-1])
        d["process_s"] = wall
        runs.append(d)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ----------------------------------------------------------------------------------------------------------------


def print_tables(results: list[dict], fixed: dict | None) -> None:
    print("\nper round (seconds; local = the sites' train_seconds; rounds after the first are steadier)")
    print(f"{'sites':>5} {'round':>5} {'wall':>7} {'train':>7} {'eval':>6} {'sum loc':>8} {'max loc':>8} "
          f"{'train/sum':>9} {'train/max':>9} {'wall/sum':>8} {'wall/max':>8}")
    for res in results:
        for p in res["rounds"]:
            print(f"{res['sites']:>5} {p['round']:>5} {p['wall']:>7.1f} {p['train_wall']:>7.1f} "
                  f"{p['evaluate_wall']:>6.1f} {p['sum_local']:>8.1f} {p['max_local']:>8.1f} "
                  f"{p['train_wall'] / p['sum_local']:>9.2f} {p['train_wall'] / p['max_local']:>9.2f} "
                  f"{p['wall'] / p['sum_local']:>8.2f} {p['wall'] / p['max_local']:>8.2f}")
    print("\nper federation (seconds; means over rounds)")
    print(f"{'sites':>5} {'synth':>6} {'engine':>7} {'setup':>6} {'round':>6} {'train':>6} {'eval':>6} "
          f"{'mean loc':>8} {'train/sum':>9} {'train/max':>9} {'MB/round':>8} {'1st contact':>11} {'k-means':>7}")
    for res in results:
        ps = res["rounds"]
        m = {k: statistics.mean(p[k] for p in ps) for k in ("wall", "train_wall", "evaluate_wall", "sum_local",
                                                             "max_local", "mean_local")}
        mb = (res["bytes_sent"] + res["bytes_received"]) / len(ps) / 1e6
        print(f"{res['sites']:>5} {res['synth_s']:>6.1f} {res['engine_s']:>7.1f} {res['setup_s']:>6.1f} "
              f"{m['wall']:>6.1f} {m['train_wall']:>6.1f} {m['evaluate_wall']:>6.1f} {m['mean_local']:>8.2f} "
              f"{m['train_wall'] / m['sum_local']:>9.2f} {m['train_wall'] / m['max_local']:>9.2f} {mb:>8.2f} "
              f"{_num(res['setup_first_contact_s']):>11} {_num(res['setup_kmeans_s']):>7}")
    print("  setup = 1st contact (node wait + the first message to each worker: process start, imports, site load, "
          "omics moments) + k-means (seed + memory.kmeans_iters steps, one round trip each)")
    if fixed:
        print("\nfixed cost of one ClientApp message before training (median of fresh processes, seconds)")
        print(f"  new process + import client.client_app (torch, flwr): {fixed['import_s']:.2f} "
              f"(whole process {fixed['process_s']:.2f})")
        print(f"  SiteRuntime.load (run-config parse + slide cache, {fixed['slides']:.0f} slides): "
              f"first {fixed['load_s_0']:.3f}, again {fixed['load_s_1']:.3f}")
        print(f"  seeded model build (tiny dims): first {fixed['build_s_0']:.3f}, again {fixed['build_s_1']:.3f}")
        print(f"  optimiser construction (first AdamW imports torch._dynamo): first {fixed['optim_s_0']:.2f}, "
              f"again {fixed['optim_s_1']:.4f}")


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8], help="site counts to run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per federation")
    ap.add_argument("--slides", type=int, default=48, help="slides per site (fixed across site counts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "federation_scaling")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-message fixed-cost probe")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_all = time.perf_counter()
    results = []
    for n in args.sites:
        t0 = time.perf_counter()
        results.append(run_one(n, args.rounds, args.slides, args.out / f"sites_{n}", args.seed))
        print(f"{n} sites x {args.rounds} rounds: {time.perf_counter() - t0:.0f} s", flush=True)
    fixed = None if args.no_probe else message_fixed_costs(args.out / f"sites_{args.sites[0]}" / "data" /
                                                           "federation.yaml")
    print_tables(results, fixed)
    minutes = (time.perf_counter() - t_all) / 60
    print(f"\ntotal {minutes:.1f} min on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "fixed": fixed, "minutes": minutes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
