"""Where the federated-vs-centralised gap comes from: the same slides laid out as other federations (issue 14).

A diagnostic for the gap of ``accuracy.py --fed-variants``, on the same cohort, splits, seeds and config:

``one_site``: every site merged into ONE site. Averaging is then the identity: what is left of the federation is
its machinery (rounds as epochs with a fresh sampling seed each, the site's AdamW state carried across rounds, the
server's memory merge with ``federation.slot_momentum``, the k-means set-up exchange, the round picked on pooled
validation, the personal model file, kept here at the site's best validation round: the pooled validation
split's, as the centralised run keeps its best epoch). If this matches centralised MoMKD, the gap comes from
training at several sites and averaging; if not, from the machinery.

``iid``: the same slides dealt at random (whole cases, each slide keeping its split) into sites of the original
sites' sizes: the averaging and the sites' sizes as in the real federation, without the regions' differences
(label prevalence, genomics, scanner and stain). If the gap stays, it comes from each site holding a sixth of the
slides, not from how the sites differ.

The merged site's manifest is the sites' manifests one after another (their ``split`` column kept), its genomics
the paired sites' files concatenated (cases of the histology-only sites have none, as in the centralised run; in
``iid`` every site gets that file and uses the rows of its own cases), its features the original files linked.
The global model's memory head (``best_model.pt``) and, for ``one_site``, the site's personal model are scored on
each ORIGINAL site's test slides and compared, seed by seed, with the centralised rows ``accuracy.py
--fed-variants`` wrote to the same ``--out`` (run that first)::

    python benchmarks/accuracy.py --medium --fed-variants default --tasks odx --seeds 0,1,2,3,4 --out runs/fedgap
    python benchmarks/site_layouts.py --medium --layout one_site --tasks odx --seeds 0,1,2,3,4 --out runs/fedgap
    python benchmarks/site_layouts.py --medium --layout iid --tasks odx --seeds 0,1,2,3,4 --out runs/fedgap
    python benchmarks/site_layouts.py --medium --layout one_site --layout-set federation.slot_momentum=0 ...

Resumable: a (layout, task, seed) that ``site_layouts.jsonl`` holds is not run again.
"""

from __future__ import annotations

import argparse
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

log = logging.getLogger("site_layouts")
LAYOUTS = ("one_site", "iid")
ONE_SITE = "all_sites"
LAYOUT_SEED = 0  # the iid deal is fixed (like the cohort), the training seeds vary


def relayout(yaml_path: Path, out: Path, layout: str) -> Path:
    """Write ``out/federation.yaml``: the cohort's slides as ``layout`` (module docstring). Returns its path."""
    path = out / "federation.yaml"
    if path.is_file():  # written last: the layout is complete (and the same for every seed and process)
        return path
    src = yaml.safe_load(yaml_path.read_text())
    root = yaml_path.parent
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    links = out / "features"  # every feature file, linked once; each site's features_dir is this folder
    manifests, omics, sizes = [], [], {}
    for s in src["sites"]:
        m = pd.read_csv(root / s["manifest"], dtype=str)
        manifests.append(m)
        sizes[s["name"]] = len(m)
        if s.get("omics"):
            omics.append(pd.read_csv(root / s["omics"], dtype={"case_id": str}))
        for f in (root / s["features_dir"]).rglob("*.h5"):
            rel = f.relative_to(root / s["features_dir"])
            (links / rel.parent).mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), links / rel)
    slides = pd.concat(manifests, ignore_index=True)
    if layout == "one_site":
        parts = {ONE_SITE: slides}
    else:  # whole cases in random order, each to the site with the most room left relative to its size: the
        # original manifests' sizes (to within a case's slides)
        rng = np.random.default_rng(LAYOUT_SEED)
        count = slides["case_id"].value_counts()
        cases = list(dict.fromkeys(slides["case_id"]))
        rng.shuffle(cases)
        room = dict(sizes)
        owner = {}
        for c in cases:
            site = max(room, key=lambda k: room[k] / sizes[k])
            owner[c] = site
            room[site] -= int(count[c])
        parts = {name: slides[slides["case_id"].map(owner) == name] for name in sizes}
    omics_rel = ""
    if omics:
        pd.concat(omics).to_csv(out / "omics.csv", index=False)
        omics_rel = "omics.csv"
    sites = []
    for name, m in parts.items():
        m.to_csv(out / f"{name}.csv", index=False)
        sites.append({"name": name, "manifest": f"{name}.csv", "features_dir": "features", "omics": omics_rel})
    new = {k: v for k, v in src.items() if k != "sites"}
    new["federation"] = {**(new.get("federation") or {}), "min_sites": len(sites)}
    new["sites"] = sites
    tmp = out / "federation.yaml.part"
    tmp.write_text(yaml.safe_dump(new, sort_keys=False))
    tmp.replace(path)
    return path


def site_mean(res: dict, head: str) -> float:
    return float(np.mean([v[head] for v in res["sites"].values()]))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--layout", choices=LAYOUTS, required=True)
    pre.add_argument("--layout-set", action="append", default=[], metavar="KEY=VALUE",
                     help="config override of the layout's runs only (the centralised rows stay the reference)")
    known, rest = pre.parse_known_args(argv)
    layout = known.layout
    lov = acc.key_values(known.layout_set)
    tag = "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in sorted(lov.items()))
    a = acc.parse_args(rest)  # accuracy.py's options: --medium, --tasks, --seeds, --out, --set, ...
    out = Path(a.out).resolve()
    ov = acc.model_overrides(a)
    rows_path = out / "site_layouts.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    done = {(r["layout"], r["task"], r["seed"], json.dumps(r.get("layout_overrides", {}), sort_keys=True))
            for r in rows if r.get("overrides") == json.loads(json.dumps(ov))}
    results = [r for r in acc._read_rows(out / "results.jsonl", ov) if "result" in r]
    from server.simulate import run_simulation

    for task in a.tasks:
        original = acc.cohort(a, task)
        new_yaml = relayout(original, out / "data" / f"{task}-{layout}", layout)
        for seed in a.seeds:
            if (layout, task, seed, json.dumps(lov, sort_keys=True)) in done:
                continue
            over = {**ov, "train.seed": seed, **lov}
            if layout == "one_site":  # its own validation split is the pooled one: the centralised rule
                over["federation.personal_round"] = "best_validation"
            cfg = acc.with_overrides(load_config(new_yaml), over)
            sites = acc.with_overrides(load_config(original), {**ov, "train.seed": seed}).sites
            run_dir = out / "runs" / task / f"seed{seed}" / f"layout-{layout}{tag}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            status, summary = run_simulation(cfg, run_dir)
            if summary is None:
                raise RuntimeError(f"{task} seed {seed} {layout}: the federation did not complete ({status})")
            row = {"layout": layout, "task": task, "seed": seed, "overrides": ov, "layout_overrides": lov,
                   "best_round": summary.get("best", {}).get("round"),
                   "global": acc.evaluate_checkpoint(run_dir / "best_model.pt", cfg, sites)}
            if layout == "one_site":  # the one site's personal model, on the original sites' test slides
                personal = next((run_dir / "site_state" / ONE_SITE).rglob("personal_model.pt"))
                row["personal_file"] = acc.evaluate_checkpoint(personal, cfg, sites)
            row["seconds"] = time.perf_counter() - t0
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("%s seed %d %s: global memory head %.3f (round %s), site mean", task, seed, layout,
                     site_mean(row["global"], "memory"), row["best_round"])
    report(rows_path, results, ov, a.tasks)
    return 0


def report(rows_path: Path, results: list[dict], ov: dict, tasks: list[str]) -> None:
    """Per seed: the global memory head of each layout and of the preset's own federation (``accuracy.py``'s
    ``default`` rows) against centralised, as site means and over all test slides pooled; the personal classifiers
    (the one site's; the preset's sites', as ``federation.personal_round`` keeps them) against the centralised
    classifier."""
    central = {(r["task"], r["seed"]): r["result"] for r in results if r.get("variant") == "centralised"}
    rows = [r for r in map(json.loads, rows_path.read_text().splitlines())
            if r.get("overrides") == json.loads(json.dumps(ov))]
    for r in rows:  # a layout run with overrides of its own is a layout of its own in the tables
        r["layout"] += "".join(f", {k}={v}" for k, v in sorted(r.get("layout_overrides", {}).items()))
    rows += [{"layout": "regions (the preset)", "task": r["task"], "seed": r["seed"], "global": r["result"]["global"],
              "best_round": r["result"].get("best_round"),  # the sites' personal files, as the default keeps them:
              "personal_file": {"sites": {s: {"classifier": v}
                                          for s, v in acc.personal_by_rule(r)[acc.personal_rule(r)].items()}}}
             for r in results if r.get("variant") == "default" and r.get("setting") == "federated"]
    rows = [r for r in rows if (r["task"], r["seed"]) in central and r["task"] in tasks]
    print("| layout | task | seed | global memory head, site mean / pooled | Δ vs centralised memory head "
          "| personal classifier, site mean | Δ vs centralised classifier | best round |")
    print("|---|---|---|---|---|---|---|---|")
    deltas: dict[tuple, list] = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["layout"], r["seed"])):
        c = central[(r["task"], r["seed"])]
        dm = site_mean(r["global"], "memory") - site_mean(c, "memory")
        dp = r["global"]["pooled"]["memory"] - c["pooled"]["memory"]
        dc = site_mean(r["personal_file"], "classifier") - site_mean(c, "classifier") \
            if "personal_file" in r else math.nan
        deltas.setdefault((r["task"], r["layout"]), []).append((dm, dp, dc))
        pc = f"{site_mean(r['personal_file'], 'classifier'):.3f} | {dc:+.3f}" if "personal_file" in r else "n/a | n/a"
        print(f"| {r['layout']} | {r['task']} | {r['seed']} | {site_mean(r['global'], 'memory'):.3f} / "
              f"{r['global']['pooled']['memory']:.3f} | {dm:+.3f} / {dp:+.3f} | {pc} | {r['best_round']} |")
    print()
    for (task, layout), d in deltas.items():
        d = np.array(d)
        sd = d.std(axis=0, ddof=1) if len(d) > 1 else np.full(3, math.nan)
        clf = f", Δ classifier {d[:, 2].mean():+.3f}±{sd[2]:.3f}" if not np.isnan(d[:, 2]).any() else ""
        print(f"- {task}, {layout}: Δ memory head {d[:, 0].mean():+.3f}±{sd[0]:.3f} (site mean), "
              f"{d[:, 1].mean():+.3f}±{sd[1]:.3f} (pooled){clf}; mean±std over {len(d)} seeds")


if __name__ == "__main__":
    sys.exit(main())
