"""Benchmark: loading a site by parsing every .h5 vs. through the site-local slide cache.

Builds a synthetic site (TRIDENT files, log-normal bag sizes) in a temporary folder, then times, each in a fresh
Python process as a Flower ClientApp would be (the time of ``load_site`` itself, measured inside the process):

1. cold parse, no cache (``use_cache=False``);
2. first cached load (parse + write the cache);
3. cached load (what every later round pays);
4. cached load + reading every feature value once (what an epoch then pays on top, from the page cache);
5. load after rewriting one slide (incremental re-parse).

Plus the kNN graph build for P = 100k patches on a grid. Usage::

    python benchmarks/data_loading.py --slides 200 --median-patches 1000 --dim 1536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_site(root: Path, slides: int, median: int, sigma: float, dim: int, seed: int) -> dict:
    """Write ``slides`` TRIDENT files and a manifest; return the site/config description."""
    from momkd_fed.data.h5 import write_trident_h5

    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(median), sigma, size=slides).astype(int), 1, 20 * median)
    rows = []
    for i, P in enumerate(sizes):
        side = int(np.ceil(np.sqrt(P * 1.3)))
        cells = rng.choice(side * side, size=P, replace=False)
        coords = np.stack([cells % side, cells // side], 1) * 512  # (P, 2)
        feats = rng.standard_normal((P, dim), dtype=np.float32)  # (P, D)
        sid = f"SLIDE-{i:04d}"
        write_trident_h5(root / "features" / f"{sid}.h5", feats, coords)
        rows.append(f"CASE-{i // 2:04d},{sid},{i % 2}")
    (root / "manifest.csv").write_text("case_id,slide_id,label\n" + "\n".join(rows) + "\n")
    return {"manifest": str(root / "manifest.csv"), "features_dir": str(root / "features"), "dim": dim,
            "patches": int(sizes.sum()), "median": float(np.median(sizes)), "max": int(sizes.max())}


def child(spec: dict, mode: str) -> dict:
    """Run inside a fresh process: one load_site call, timed."""
    import torch

    from momkd_fed.config import Config, DataConfig, SiteConfig
    from momkd_fed.data.site import load_site

    torch.set_num_threads(1)
    site = SiteConfig(name="bench", manifest=spec["manifest"], features_dir=spec["features_dir"])
    cfg = Config(data=DataConfig(feature_dim=spec["dim"]), sites=[site])
    t0 = time.perf_counter()
    data = load_site(site, cfg, use_cache=(mode != "nocache"))
    t_load = time.perf_counter() - t0
    checksum = 0.0
    t_touch = 0.0
    if mode == "touch":
        t0 = time.perf_counter()
        checksum = sum(float(b.features.sum()) for b in data.bags)
        t_touch = time.perf_counter() - t0
    return {"load_s": t_load, "touch_s": t_touch, "slides": len(data.bags), "checksum": checksum}


def run_child(spec: dict, mode: str) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--spec", json.dumps(spec)],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def knn_speed(P: int = 100_000) -> float:
    from momkd_fed.data.graph import knn_neighbors

    side = int(np.ceil(np.sqrt(P)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:P] * 512
    t0 = time.perf_counter()
    knn_neighbors(coords, 8)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=200, help="slides in the synthetic site")
    ap.add_argument("--median-patches", type=int, default=1000, help="median patches per slide (log-normal)")
    ap.add_argument("--sigma", type=float, default=0.6, help="log-normal sigma of the bag sizes")
    ap.add_argument("--dim", type=int, default=1536, help="feature dimension D")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="folder for the synthetic site (default: a temp folder, removed)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.spec), args.child)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        spec = build_site(root, args.slides, args.median_patches, args.sigma, args.dim, args.seed)
        gb = spec["patches"] * args.dim * 4 / 1e9
        print(f"site: {args.slides} slides, {spec['patches']} patches (median {spec['median']:.0f}, "
              f"max {spec['max']}), D={args.dim}, {gb:.2f} GB of features; written in "
              f"{time.perf_counter() - t0:.1f} s")
        results = [("cold parse, no cache", run_child(spec, "nocache")),
                   ("first load, builds cache", run_child(spec, "cache")),
                   ("cached load (new process)", run_child(spec, "cache")),
                   ("cached load + read all features", run_child(spec, "touch"))]
        from momkd_fed.data.h5 import write_trident_h5

        victim = Path(spec["features_dir"]) / "SLIDE-0000.h5"
        write_trident_h5(victim, np.ones((500, args.dim), np.float32), np.arange(1000).reshape(500, 2) * 512)
        results.append(("load after 1 slide rewritten", run_child(spec, "cache")))
        results.append(("cached load again", run_child(spec, "cache")))
        cache_bytes = sum(p.stat().st_size for p in (Path(spec["features_dir"]) / ".momkd_cache").rglob("*")
                          if p.is_file())
    print(f"{'step':<34}{'load_site s':>12}{'process s':>11}{'read s':>9}")
    for name, r in results:
        print(f"{name:<34}{r['load_s']:>12.3f}{r['process_s']:>11.2f}{r['touch_s']:>9.2f}")
    cold, warm = results[0][1]["load_s"], results[2][1]["load_s"]
    print(f"cold / cached load_site ratio: {cold / warm:.0f}x; cache size {cache_bytes / 1e9:.2f} GB")
    print(f"kNN graph (k=8) for P=100,000 grid patches: {knn_speed():.2f} s")


if __name__ == "__main__":
    main()
