"""Benchmark: bytes a site sends and receives per round, from the records the real packing code builds.

For the reference dims (D_in 1536, hidden 512, S 64, K 16, G 768: ``Config()`` defaults) and the tiny preset's
dims, for a paired site and a histology-only site (which leaves out the paired-only genomic encoder), and for
each ``federation.wire_dtype``:

- the train reply as ``client.client_app.train`` builds it: shared weights (``sharing.partition_state`` with the
  default policy, paired-only keys dropped at a histology-only site, packed by ``records.to_record`` with the
  wire dtype), the memory record of each mode (``client.local_round._memory_reply``: ema = sums + counts +
  slides, gradient = slots + usage + slides), the metrics and site records;
- what the server sends the site per round (``MomkdFedAvgM._content``): in round 1 a train message with shared
  weights, global memory and genomic statistics and an evaluate message with shared weights and memory; from
  round 2 on the train message refers to the previous evaluate message's model, which the site cached, and
  carries only the settings and genomic statistics (``down``; round 1: ``down r1``). A histology-only site is sent
  neither the genomic encoder nor the genomic statistics;
- against sending the whole model (full ``state_dict``: private head, decoder, temperature and memory included).

"payload" = the arrays' serialised bytes (``records.record_bytes``, what ``rounds.jsonl`` logs as
``bytes_sent``/``bytes_received``); "serialised" = every Flower object of the RecordDict deflated (arrays, chunks,
records, metadata: what Flower actually transfers, before HTTP framing).

Cross-check (unless ``--no-run``): one short real simulation of the tiny federation (Flower's simulation engine,
2 rounds, per wire dtype asked for with ``--run-wire``) and its ``rounds.jsonl`` bytes per site and round compared
with the computed ones. About 1.5 minutes per run on 2 shared cores; the tables alone take seconds::

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 python benchmarks/communication.py
    python benchmarks/communication.py --no-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
WIRES = ("float32", "bfloat16", "float16")
REFERENCE_GENES = 768

log = logging.getLogger("communication")


def serialised_bytes(content) -> int:
    """Every Flower object of a RecordDict deflated (identical chunks counted once, as Flower sends them)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


def tiny_config():
    """The tiny preset's federation config (model dims as ``momkd-fed synth tiny`` writes them)."""
    from momkd_fed.config import config_from_dict
    from momkd_fed.synth import make_preset
    from momkd_fed.synth.tiny import _config

    preset = make_preset("tiny")
    return config_from_dict(_config(preset, 0)), preset.n_genes



def measure(cfg, n_genes: int) -> list[dict]:
    """One row per (site kind, wire dtype): bytes of every part of a train reply and of the server's messages."""
    import numpy as np
    import torch
    from flwr.app import RecordDict

    from client import records as R
    from client.local_round import _memory_reply
    from client.site_runtime import build_initial_model
    from momkd_fed.federation import contract
    from momkd_fed.federation.aggregate import FedAvgMState
    from momkd_fed.federation.sharing import histology_only_part, partition_state
    from server.run_outputs import ServerState
    from server.strategy import MomkdFedAvgM

    model = build_initial_model(cfg, n_genes)
    sd = model.state_dict()
    part = partition_state(sd, cfg.federation)
    glob = {k: v.clone() for k, v in part.shared.items()}
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in glob.items()}  # a plausible local update
    memory = {}
    for mode in ("ema", "gradient"):
        mcfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, update=mode))
        memory[mode] = _memory_reply(model, mcfg, None, Path(tempfile.gettempdir()), {})
    metrics = contract.train_metrics(num_examples=40, paired=True, losses={t: 0.5 for t in contract.LOSS_TERMS},
                                     val_auc=0.7, val_auc_memory=0.7, train_seconds=1.0, privacy_epsilon=float("nan"))
    side = RecordDict({contract.METRICS_RECORD: R.metrics_record(metrics),
                       R.SITE_RECORD: R.site_record("hospital_name", True, n_genes, 40, 10)})
    full = RecordDict({contract.ARRAYS_RECORD: R.to_record(sd)})
    # the evaluate reply's only arrays: the calibration histograms of the global model's trained heads, float64
    from momkd_fed.heads import TRAINED, global_model_heads

    calibration = RecordDict({contract.CALIBRATION_RECORD: R.to_record(
        {h: np.zeros((2, cfg.calibration.bins)) for h, st in global_model_heads(cfg).items() if st == TRAINED})})

    state = ServerState(round=0, shared=glob, slots=sd.get("memory.slots"),
                        momentum=FedAvgMState(cfg.federation.server_lr, cfg.federation.server_momentum),
                        n_genes=n_genes, omics_mean=np.zeros(n_genes, np.float32),
                        omics_std=np.ones(n_genes, np.float32), run_key="bench")
    strategy = MomkdFedAvgM(cfg, state, {})
    rows = []
    for paired in (True, False):
        train_full = strategy._content(1, with_omics=True, paired=paired)
        train_cached = strategy._content(2, with_omics=True, paired=paired, cached=True)
        evaluate = strategy._content(1, with_omics=False, paired=paired)
        down_first = R.record_bytes(train_full) + R.record_bytes(evaluate)
        down = R.record_bytes(train_cached) + R.record_bytes(evaluate)
        down_ser = serialised_bytes(train_cached) + serialised_bytes(evaluate)
        shared = dict(trained) if paired else histology_only_part(trained, cfg.federation)
        for wire in WIRES:
            arrays = RecordDict({contract.ARRAYS_RECORD: R.to_record(shared, wire, glob)})
            mem = {m: RecordDict({contract.MEMORY_RECORD: R.to_record(t)}) for m, t in memory.items()}
            reply = {m: RecordDict({contract.ARRAYS_RECORD: arrays[contract.ARRAYS_RECORD],
                                    contract.MEMORY_RECORD: mem[m][contract.MEMORY_RECORD],
                                    **{k: v for k, v in side.items()}}) for m in mem}
            rows.append({
                "site": "paired" if paired else "histology-only", "wire": wire,
                "params_shared": int(sum(v.numel() for v in shared.values())),
                "shared": R.record_bytes(arrays), "memory_ema": R.record_bytes(mem["ema"]),
                "memory_gradient": R.record_bytes(mem["gradient"]), "metrics_serialised": serialised_bytes(side),
                "reply_payload": R.record_bytes(reply["gradient"]),
                "reply_serialised": serialised_bytes(reply["gradient"]),
                "reply_payload_ema": R.record_bytes(reply["ema"]),
                "full_model": R.record_bytes(full), "full_model_serialised": serialised_bytes(full),
                "down_payload": down, "down_serialised": down_ser, "down_first_payload": down_first,
                "evaluate_reply_payload": R.record_bytes(calibration),
            })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# cross-check against a real simulation


def real_run(out: Path, wire: str) -> dict:
    """Two rounds of the tiny federation through Flower's simulation engine; their rounds.jsonl rows."""
    from momkd_fed.config import load_config
    from momkd_fed.run_log import read_rounds
    from server.simulate import run_simulation

    path = out / "data" / "federation.yaml"
    cfg = load_config(path, {"federation.rounds": 2, "memory.kmeans_iters": 3, "federation.wire_dtype": wire})
    status, summary = run_simulation(cfg, out / f"run_{wire}", timeout=900.0)
    if summary is None:
        raise RuntimeError(f"tiny simulation ({wire}) ended with status {status!r}; see {out / f'run_{wire}'}")
    rows = read_rounds(out / f"run_{wire}")
    return {"cfg": cfg, "rows": rows, "paired": {s: bool(v.get("paired")) for s, v in summary["sites"].items()}}


def crosscheck(out: Path, wires: list[str]) -> list[dict]:
    from momkd_fed.data.site import load_site
    from momkd_fed.synth import synthesize

    shutil.rmtree(out / "data", ignore_errors=True)  # fresh: a kept folder would hold an older preset's dims
    synthesize("tiny", out / "data", seed=0)
    lines = []
    for wire in wires:
        t0 = time.perf_counter()
        run = real_run(out, wire)
        cfg = run["cfg"]
        n_genes = len(load_site(cfg.sites[0], cfg).genes)  # the federation's gene panel (a paired site)
        calc = {(r["site"], r["wire"]): r for r in measure(cfg, n_genes)}
        for row in run["rows"]:
            for site, paired in sorted(run["paired"].items()):
                c = calc[("paired" if paired else "histology-only", wire)]
                sent = c["down_first_payload"] if row["round"] == 1 else c["down_payload"]
                lines.append({"wire": wire, "round": row["round"], "site": site, "paired": paired,
                              "logged_received": row["bytes_received"][site],
                              "computed_received": c["reply_payload"] + c["evaluate_reply_payload"],
                              "logged_sent": row["bytes_sent"][site], "computed_sent": sent,
                              "memory_update": cfg.memory.update, "seconds": time.perf_counter() - t0})
    return lines


# ----------------------------------------------------------------------------------------------------------------


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}: KiB per site per round (payload = serialised array bytes, as rounds.jsonl logs them)")
    print(f"{'site':<15}{'wire':<9}{'params':>10}{'shared':>11}{'mem ema':>9}{'mem grad':>9}{'metrics':>8}"
          f"{'reply':>11}{'serialised':>11}{'full model':>11}{'reply/full':>11}{'down r1':>11}{'down':>11}")
    for r in rows:
        print(f"{r['site']:<15}{r['wire']:<9}{r['params_shared']:>10,}{_kb(r['shared']):>11}"
              f"{_kb(r['memory_ema']):>9}{_kb(r['memory_gradient']):>9}{_kb(r['metrics_serialised']):>8}"
              f"{_kb(r['reply_payload']):>11}{_kb(r['reply_serialised']):>11}{_kb(r['full_model']):>11}"
              f"{r['reply_payload'] / r['full_model']:>11.3f}{_kb(r['down_first_payload']):>11}"
              f"{_kb(r['down_payload']):>11}")
    print("  reply = shared + memory (gradient mode, the default); metrics = MetricRecord + site ConfigRecord "
          "serialised; full model = whole state_dict in float32; down = server -> site (train + evaluate "
          "messages, float32) from round 2 on (the train message refers to the site's cached model); down r1 = "
          "round 1 (both carry the model)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-run", action="store_true", help="skip the real tiny simulation cross-check")
    ap.add_argument("--run-wire", nargs="+", default=["float32", "bfloat16"], choices=WIRES,
                    help="wire dtypes of the cross-check runs (one simulation each)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "communication")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from momkd_fed.config import Config

    torch.manual_seed(0)
    t_all = time.perf_counter()
    ref = measure(Config(), REFERENCE_GENES)
    tiny_cfg, tiny_genes = tiny_config()
    tiny = measure(tiny_cfg, tiny_genes)
    print_table(f"reference dims (D_in 1536, hidden 512, S 64, K 16, G {REFERENCE_GENES})", ref)
    print_table(f"tiny dims (D_in {tiny_cfg.data.feature_dim}, hidden {tiny_cfg.model.hidden_dim}, "
                f"S {tiny_cfg.model.shared_dim}, K {tiny_cfg.memory.slots}, G {tiny_genes})", tiny)
    checks = []
    if not args.no_run:
        checks = crosscheck(args.out, args.run_wire)
        print("\ncross-check: real tiny simulation (2 rounds), rounds.jsonl bytes vs computed")
        print(f"{'wire':<9}{'round':<6}{'site':<13}{'paired':<7}{'received':>10}{'computed':>10}{'sent':>10}"
              f"{'computed':>10}")
        for c in checks:
            print(f"{c['wire']:<9}{c['round']:<6}{c['site']:<13}{str(c['paired']):<7}{c['logged_received']:>10,}"
                  f"{c['computed_received']:>10,}{c['logged_sent']:>10,}{c['computed_sent']:>10,}")
        bad = [c for c in checks if c["logged_received"] != c["computed_received"]
               or c["logged_sent"] != c["computed_sent"]]
        print("  all equal" if not bad else f"  {len(bad)} site(s) differ")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"reference": ref, "tiny": tiny, "crosscheck": checks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
