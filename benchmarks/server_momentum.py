"""Benchmark: FedAvg vs FedAvgM server momentum on the tiny federation, round by round.

Runs the tiny synthetic federation (3 sites, one histology-only) through Flower's simulation engine
(:func:`server.simulate.run_simulation`) once per (seed, server momentum), sharing the classifier and the
attention temperature with the encoders (as benchmarks/accuracy.py does), and prints after every round the test
AUC of the global model's memory head and of the classifier (the global weights plus the site's private parts;
with the head and tau shared that is the global classifier) -- each the slide-weighted mean of the sites' AUCs,
as rounds.jsonl reports them -- and the aggregate training cross-entropy. Used to
choose the default of ``federation.server_momentum`` (benchmarks/README.md, accuracy section).

Usage::

    python benchmarks/server_momentum.py                          # momenta 0.9 and 0, seeds 0 and 1, 12 rounds
    python benchmarks/server_momentum.py --momenta 0.9,0.5,0 --server-lr 1.0 --seeds 0 --rounds 20

About 1-2.5 min per simulation on a 2-core machine (4 simulations by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from momkd_fed.config import load_config  # noqa: E402
from momkd_fed.synth import synthesize  # noqa: E402

SHARED_EXTRA = ["classifier.", "log_tau"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--momenta", default="0.9,0", help="server momenta to compare (comma list)")
    p.add_argument("--server-lr", type=float, default=1.0, help="server learning rate for every run")
    p.add_argument("--seeds", default="0,1", help="training seeds (comma list)")
    p.add_argument("--rounds", type=int, default=12, help="federated rounds")
    p.add_argument("--out", default="runs/server_momentum", help="output folder (cohort and run folders)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from server.simulate import run_simulation

    out = Path(a.out).resolve()
    yaml_path = out / "data" / "federation.yaml"
    if not yaml_path.is_file():
        yaml_path = synthesize("tiny", out / "data", seed=0)
    base = load_config(yaml_path)
    lines = ["| seed | momentum | server lr | memory-head test AUC per round | final | classifier test AUC per round | "
             "final | train CE per round | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        for mom in _floats(a.momenta):
            fed = dataclasses.replace(base.federation, server_momentum=mom, server_lr=a.server_lr, rounds=a.rounds,
                                      shared=list(dict.fromkeys(base.federation.shared + SHARED_EXTRA)))
            cfg = dataclasses.replace(base, federation=fed, train=dataclasses.replace(base.train, seed=seed))
            run_dir = out / f"seed{seed}-momentum{mom:g}"
            t0 = time.perf_counter()
            status, summary = run_simulation(cfg, run_dir)
            if summary is None:
                raise SystemExit(f"simulation seed {seed} momentum {mom} did not complete: {status} "
                                 f"(see {run_dir / 'flower' / 'run.log'})")
            rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
            # the memory head's slide-weighted mean (the rows' test_auc is the primary head: here the shared classifier)
            mem = [r["evaluate_aggregate"]["global_test_auc_memory"] for r in rows]
            clf = [r["test_auc_personal"]["pooled"] for r in rows]
            ce = [r["train_aggregate"].get("loss_ce", float("nan")) for r in rows]
            lines.append(f"| {seed} | {mom:g} | {a.server_lr:g} | {' '.join(f'{x:.3f}' for x in mem)} | {mem[-1]:.3f} "
                         f"| {' '.join(f'{x:.3f}' for x in clf)} | {clf[-1]:.3f} | {' '.join(f'{x:.3f}' for x in ce)} "
                         f"| {time.perf_counter() - t0:.0f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
