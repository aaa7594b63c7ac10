"""Benchmark: the initial memory's quality against the set-up messages it costs (federated spherical k-means).

For each preset and seed, every site computes its patch projections under the seeded initial encoder exactly as
the ClientApp does (``client.local_round.kmeans_points``: up to ``memory.kmeans_max_points`` per class), and the
set-up protocols of ``momkd_fed.federation.kmeans`` run on them, in this process:

- ``seed``: the sites' local k-means pooled by the server (1 exchange after the genomic statistics);
- ``old``: seed + one exact federated Lloyd step per exchange, until nothing moves or ``memory.kmeans_iters``
  (20) steps: the protocol before 2026-12 (up to 21 exchanges);
- ``exact1``: seed + one exact step (2 exchanges);
- ``new``: seed + ``memory.kmeans_rounds`` exchanges of ``memory.kmeans_refine_iters`` local Lloyd iterations
  (the defaults: 1 exchange of 5; 2 exchanges in all);
- ``new x2``: seed + 2 such exchanges (3 exchanges).

Quality = inertia on the pooled projections, sum over points of 1 - cos(point, nearest slot of its class); the
table gives each protocol's inertia relative to ``old`` (+0.5% = 0.5% worse). The genomic statistics are one
more exchange for every protocol.

Usage::

    python benchmarks/kmeans_init.py                        # tiny and tcga-brca (HER2), seeds 0-2, ~10 min
    python benchmarks/kmeans_init.py --presets tiny --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from momkd_fed.federation import kmeans  # noqa: E402

MEDIUM = {"model.hidden_dim": 128, "model.shared_dim": 32, "model.omics_hidden": 128, "model.omics_embed_dim": 128,
          "model.cls_hidden": 64, "memory.slots": 8}  # configs/cpu_small.yaml (accuracy.py --medium)
PROTOCOLS = ("seed", "exact1", "new", "new x2", "old")


def site_points(config: Path, overrides: dict, seed: int) -> tuple[object, list[dict[int, torch.Tensor]]]:
    """Every site's k-means points under the seeded initial encoder, through the ClientApp's own code."""
    from client.local_round import GlobalModel, kmeans_points
    from client.run_config import RunOptions
    from client.site_runtime import SiteRuntime, build_initial_model
    from momkd_fed.config import load_config
    from momkd_fed.federation.sharing import partition_state

    cfg = load_config(config, {**overrides, "train.seed": seed, "train.device": "cpu"})
    shared = dict(partition_state(build_initial_model(cfg, 0).state_dict(), cfg.federation).shared)
    g = GlobalModel(shared=shared, slots=None, omics_mean=None, omics_std=None, n_genes=0, round=0)
    with tempfile.TemporaryDirectory() as d:
        sites = [kmeans_points(SiteRuntime.load(cfg, RunOptions(), {"partition-id": i}), g, Path(d) / s.name)
                 for i, s in enumerate(cfg.sites)]
    return cfg, sites


def inertia(sites: list[dict[int, torch.Tensor]], cent: torch.Tensor) -> float:
    return sum(float((1 - (F.normalize(x.float(), dim=-1) @ cent[c].T).max(dim=1).values).sum())
               for pts in sites for c, x in pts.items())


def protocols(cfg, sites) -> tuple[dict[str, float], dict[str, int]]:
    """Inertia and message exchanges (after the genomic statistics) of each protocol."""
    mem, mc = cfg.memory, cfg.federation.min_slot_count
    seeds = [kmeans.local_kmeans_seed(p, mem.slots, mem.kmeans_iters, seed=cfg.train.seed, min_count=mc)
             for p in sites]
    c0 = kmeans.kmeans_seed(seeds, mem.slots, mem.kmeans_iters, seed=cfg.train.seed)

    def refine(c, rounds, iters):
        for _ in range(rounds):
            new, _ = kmeans.kmeans_update(c, [kmeans.local_kmeans_stats(p, c, mc, iters=iters) for p in sites])
            moved, c = float((new - c).norm(dim=-1).max()), new
            if moved < 1e-6:
                break
        return c

    old, steps = c0, 0
    for steps in range(1, mem.kmeans_iters + 1):
        new, _ = kmeans.kmeans_update(old, [kmeans.local_kmeans_stats(p, old, mc) for p in sites])
        moved, old = float((new - old).norm(dim=-1).max()), new
        if moved < 1e-6:
            break
    cents = {"seed": c0, "exact1": refine(c0, 1, 1), "new": refine(c0, mem.kmeans_rounds, mem.kmeans_refine_iters),
             "new x2": refine(c0, 2, mem.kmeans_refine_iters), "old": old}
    exchanges = {"seed": 1, "exact1": 2, "new": 1 + mem.kmeans_rounds, "new x2": 3, "old": 1 + steps}
    return {k: inertia(sites, c) for k, c in cents.items()}, exchanges


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,tcga-brca-medium,tcga-brca")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "kmeans_init")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from momkd_fed.synth import synthesize

    rows = []
    for preset in [p.strip() for p in a.presets.split(",") if p.strip()]:
        if preset == "tiny":
            path, ov = a.out / "data" / "tiny" / "federation.yaml", {}
            if not path.exists():
                synthesize("tiny", path.parent, seed=0)
        else:
            path = a.out / "data" / "brca-her2" / "federation.yaml"
            ov = MEDIUM if preset.endswith("-medium") else {}
            if not path.exists():
                synthesize("tcga-brca", path.parent, seed=0, task="her2", max_slides_per_site=0, median_patches=100,
                           max_patches=300)
        for seed in (int(s) for s in a.seeds.split(",") if s.strip()):
            t0 = time.perf_counter()
            cfg, sites = site_points(path, ov, seed)
            val, ex = protocols(cfg, sites)
            row = {"preset": preset, "seed": seed, "slots": cfg.memory.slots, "sites": len(sites),
                   "points": sum(int(x.shape[0]) for p in sites for x in p.values()), "inertia": val,
                   "exchanges": ex, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| preset | seed | K | points | " + " | ".join(f"{p} (exchanges)" for p in PROTOCOLS) + " |")
    print("|---" * (4 + len(PROTOCOLS)) + "|")
    for r in rows:
        old = r["inertia"]["old"]
        cells = [f"{(r['inertia'][p] / old - 1) * 100:+.2f}% ({r['exchanges'][p]})" for p in PROTOCOLS]
        print(f"| {r['preset']} | {r['seed']} | {r['slots']} | {r['points']} | " + " | ".join(cells) + " |")
    rel = [(r["inertia"]["new"] / r["inertia"]["old"] - 1) * 100 for r in rows]
    print(f"\nworst 'new' vs 'old': {max(rel):+.2f}% (median {statistics.median(rel):+.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
