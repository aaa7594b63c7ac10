"""The federation's machinery with nothing to federate: every site of a cohort merged into ONE site (issue 14).

A diagnostic of where the federated-vs-centralised gap of ``accuracy.py --fed-variants`` comes from. With one
site, averaging is the identity: what is left of the federation is its machinery (rounds as epochs with a fresh
sampling seed each, the site's AdamW state carried across rounds, the server's memory merge with
``federation.slot_momentum``, the k-means set-up exchange, the round picked on pooled validation, the personal
model file, kept here at the site's best validation round: the pooled validation split's, as the centralised
run keeps its best epoch). If this run matches centralised MoMKD on the same slides, the gap comes from training
at several sites and averaging; if not, from the machinery.

The merged site's manifest is the sites' manifests one after another (their ``split`` column kept: the same
train / validation / test slides as the original cohort), its genomics the paired sites' files concatenated (the
histology-only sites' cases have none, as in the centralised run), its features the original files linked. The
models are scored on each ORIGINAL site's test slides and compared, seed by seed, with the centralised rows that
``accuracy.py --fed-variants`` wrote to the same ``--out`` (same cohort, seeds, config; run that first)::

    python benchmarks/accuracy.py --medium --fed-variants default --tasks odx --seeds 0,1,2,3,4 --out runs/fedgap
    python benchmarks/one_site_federation.py --medium --tasks odx --seeds 0,1,2,3,4 --out runs/fedgap

Resumable: a seed whose row ``one_site.jsonl`` holds is not run again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as acc  # noqa: E402  (the benchmarks' cohort, config overrides and scoring)

from momkd_fed.config import load_config  # noqa: E402

log = logging.getLogger("one_site")
SITE = "all_sites"


def merge_cohort(yaml_path: Path, out: Path) -> Path:
    """Write ``out/federation.yaml``: the cohort's sites as one site (manifests and genomics concatenated,
    feature files linked). Returns its path."""
    path = out / "federation.yaml"
    if path.is_file():  # written last: the merge is complete (and the same for every seed and process)
        return path
    src = yaml.safe_load(yaml_path.read_text())
    root = yaml_path.parent
    shutil.rmtree(out, ignore_errors=True)
    feats = out / SITE / "features"
    feats.mkdir(parents=True)
    manifests, omics = [], []
    for s in src["sites"]:
        manifests.append(pd.read_csv(root / s["manifest"], dtype=str))
        if s.get("omics"):
            omics.append(pd.read_csv(root / s["omics"], dtype={"case_id": str}))
        for f in (root / s["features_dir"]).rglob("*.h5"):
            rel = f.relative_to(root / s["features_dir"])
            (feats / rel.parent).mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), feats / rel)
    pd.concat(manifests).to_csv(out / SITE / "manifest.csv", index=False)
    site = {"name": SITE, "manifest": f"{SITE}/manifest.csv", "features_dir": f"{SITE}/features", "omics": ""}
    if omics:
        pd.concat(omics).to_csv(out / SITE / "omics.csv", index=False)
        site["omics"] = f"{SITE}/omics.csv"
    merged = {k: v for k, v in src.items() if k != "sites"}
    merged["federation"] = {**(merged.get("federation") or {}), "min_sites": 1}
    merged["sites"] = [site]
    tmp = out / "federation.yaml.part"
    tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
    tmp.replace(path)
    return path


def site_mean(res: dict, head: str) -> float:
    return float(np.mean([v[head] for v in res["sites"].values()]))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    a = acc.parse_args(argv)
    out = Path(a.out).resolve()
    ov = acc.model_overrides(a)
    rows_path = out / "one_site.jsonl"
    done = {(r["task"], r["seed"]) for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.is_file() else set()
    central = {(r["task"], r["seed"]): r for r in acc._read_rows(out / "results.jsonl", ov)
               if r.get("variant") == "centralised" and "result" in r}
    for task in a.tasks:
        original = acc.cohort(a, task)
        merged_yaml = merge_cohort(original, out / "data" / f"{task}-one-site")
        for seed in a.seeds:
            if (task, seed) in done:
                continue
            # the one site's own validation split is the pooled one: its personal model is kept at its best
            # validation round, as the centralised run keeps its best epoch
            cfg = acc.with_overrides(load_config(merged_yaml), {**ov, "train.seed": seed, "federation.min_sites": 1,
                                                               "federation.personal_round": "best_validation"})
            sites = acc.with_overrides(load_config(original), {**ov, "train.seed": seed}).sites
            run_dir = out / "runs" / task / f"seed{seed}" / "one-site-federation"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            from server.simulate import run_simulation

            status, summary = run_simulation(cfg, run_dir)
            if summary is None:
                raise RuntimeError(f"{task} seed {seed}: the federation did not complete ({status})")
            glob = acc.evaluate_checkpoint(run_dir / "best_model.pt", cfg, sites)
            personal = next((run_dir / "site_state" / SITE).rglob("personal_model.pt"))
            pers = acc.evaluate_checkpoint(personal, cfg, sites)
            row = {"task": task, "seed": seed, "overrides": ov, "best_round": summary.get("best", {}).get("round"),
                   "global": glob, "personal_file": pers, "seconds": time.perf_counter() - t0}
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("%s seed %d: one-site federation memory head %.3f (round %s), classifier %.3f (site means)",
                     task, seed, site_mean(glob, "memory"), row["best_round"], site_mean(pers, "classifier"))
    report(rows_path, central)
    return 0


def report(rows_path: Path, central: dict) -> None:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    print("| task | seed | one-site federation memory head | centralised memory head | Δ | one-site personal "
          "classifier | centralised classifier | Δ | best round |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_task: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["seed"])):
        c = central.get((r["task"], r["seed"]))
        cm = site_mean(c["result"], "memory") if c else math.nan
        cc = site_mean(c["result"], "classifier") if c else math.nan
        m, p = site_mean(r["global"], "memory"), site_mean(r["personal_file"], "classifier")
        by_task.setdefault(r["task"], []).append((m - cm, p - cc))
        print(f"| {r['task']} | {r['seed']} | {m:.3f} | {cm:.3f} | {m - cm:+.3f} | {p:.3f} | {cc:.3f} | {p - cc:+.3f} "
              f"| {r['best_round']} |")
    for task, d in by_task.items():
        d = np.array(d)
        sd = d.std(axis=0, ddof=1) if len(d) > 1 else np.full(2, math.nan)
        print(f"\n{task}: Δ memory head {d[:, 0].mean():+.3f}±{sd[0]:.3f}, Δ classifier {d[:, 1].mean():+.3f}"
              f"±{sd[1]:.3f} (site means, mean±std over {len(d)} seeds)")


if __name__ == "__main__":
    sys.exit(main())
