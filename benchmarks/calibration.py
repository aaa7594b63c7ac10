"""Benchmark: are the probabilities a hospital reads calibrated? Expected calibration error (ECE) of each model
file's calibrated probability against its raw score, on the pooled test slides.

Runs (the real code paths, nothing re-implemented):

- ``federated``: :func:`server.simulate.run_simulation` (Flower's simulation engine) with the default sharing
  (the classifier stays at the sites). Scored afterwards: ``best_model.pt`` (global model, memory head,
  calibrated by the server from the sites' pooled validation histograms) and every site's ``personal_model.pt``
  (classifier, calibrated on the site's own validation split), each site's test slides by its own personal model.
- ``pooled``: :func:`momkd_fed.training.run_training` on all sites pooled; ``model.pt``'s classifier and memory
  head, each calibrated on the pooled validation split.

For every (model file, head): test AUC over the union of all sites' test slides, and ECE with 10 equal-width
probability bins (:func:`momkd_fed.calibration.expected_calibration_error`) of

- ``calibrated``: the file's stored calibration applied to the raw score (what ``predict`` writes);
- ``raw (softmax / sigmoid)``: the uncalibrated head output read as a probability: the classifier's softmax P,
  sigmoid(delta) for the memory score (:func:`momkd_fed.calibration.raw_probability`);
- ``raw (range-mapped)``: memory head only, delta mapped linearly from its range [-2, 2] onto [0, 1].

Presets: ``--preset tiny`` (the synthetic tiny federation `simulate` runs, its own config: 3 rounds) and
``--preset tcga-brca`` (one task of the accuracy benchmark's ``--medium`` cohort and settings: full-size cohort,
median 100 patches, configs/cpu_small.yaml dims, 15 rounds / epochs, 1 thread).

Usage::

    python benchmarks/calibration.py --preset tiny --out runs/calib_tiny
    python benchmarks/calibration.py --preset tcga-brca --task her2 --out runs/calib_her2

Resumable: a part whose ``<out>/<part>.json`` exists is not rerun; a federated run stopped part-way resumes from
its last round checkpoint. Results: ``<out>/results.json`` and the rows
printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from momkd_fed.calibration import Calibration, expected_calibration_error, raw_probability  # noqa: E402
from momkd_fed.config import Config, load_config  # noqa: E402
from momkd_fed.metrics import roc_auc  # noqa: E402

log = logging.getLogger("calibration")
PARTS = ("federated", "pooled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "tcga-brca"), default="tiny")
    p.add_argument("--task", default="her2", help="tcga-brca: her2, pr or odx")
    p.add_argument("--seed", type=int, default=0, help="training seed (train.seed)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", default="runs/calibration")
    p.add_argument("--shared-data", default=None, help="folder holding tcga_brca/ (default: ../shared/data)")
    a = p.parse_args(argv)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"unknown part {bad}")
    return a


def config(a: argparse.Namespace, out: Path) -> Config:
    """The run's config: tiny as `simulate` runs it, or the accuracy benchmark's --medium settings for one task."""
    if a.preset == "tiny":
        from momkd_fed.synth import synthesize

        yaml = out / "data" / "federation.yaml"
        if not yaml.is_file():
            synthesize("tiny", out / "data", seed=0)
        return load_config(yaml, {"train.seed": a.seed, "train.threads": 1, "train.progress": False,
                                  "train.device": "cpu"})
    import accuracy

    argv = ["--medium", "--tasks", a.task, "--seeds", str(a.seed), "--out", str(out)]
    if a.shared_data:
        argv += ["--shared-data", a.shared_data]
    acc = accuracy.parse_args(argv)
    base = load_config(accuracy.cohort(acc, a.task))
    return accuracy.with_overrides(base, {**accuracy.model_overrides(acc), "train.seed": a.seed})


def scores(model_path: Path, cfg: Config, sites: list) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Labels (N,), raw scores per trained head (N,) over the test slides of ``sites``, and the file's meta."""
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate
    from momkd_fed.heads import TRAINED, checkpoint_heads

    model, mcfg, meta = load_model(model_path)
    heads = [h for h, s in checkpoint_heads(meta, mcfg).items() if s == TRAINED]
    y, raw = [], {h: [] for h in heads}
    for sc in sites:
        pred = evaluate(model, load_site(sc, cfg).split("test"), torch.device("cpu"), cfg.train.precision)
        y.append(pred.labels)
        for h in heads:
            raw[h].append(pred.scores(h))
    return np.concatenate(y), {h: np.concatenate(v) for h, v in raw.items()}, meta


def figures(y: np.ndarray, raw: np.ndarray, head: str, cal: Calibration | None) -> dict:
    out = {"auc": roc_auc(y, raw), "slides": int(len(y)), "positives": int(y.sum()),
           "ece_calibrated": expected_calibration_error(y, cal.probability(raw)) if cal else None,
           "ece_raw": expected_calibration_error(y, raw_probability(head, raw))}
    if head == "memory":
        out["ece_raw_range_mapped"] = expected_calibration_error(y, np.clip((raw + 2.0) / 4.0, 0.0, 1.0))
    if cal is not None:
        out["calibration"] = {k: getattr(cal, k) for k in ("slope", "intercept", "threshold", "positives",
                                                          "negatives", "source")}
    return out


def _cal(meta: dict, head: str) -> Calibration | None:
    c = (meta.get("calibration") or {}).get(head)
    return Calibration.from_dict(c) if c else None


def run_federated(cfg: Config, out: Path) -> dict:
    from server.simulate import personal_model_paths, run_simulation

    t0 = time.perf_counter()
    resume = (out / "federated" / "checkpoints").is_dir()  # a run stopped part-way continues from its checkpoint
    status, summary = run_simulation(cfg, out / "federated", resume=resume)
    if summary is None:
        raise RuntimeError(f"federated run did not complete: {status}")
    res = {"seconds": time.perf_counter() - t0, "rounds": summary["rounds_completed"],
           "best_round": summary["best"]["round"]}
    y, raw, meta = scores(out / "federated" / "best_model.pt", cfg, cfg.sites)
    res["best_model.pt"] = {h: figures(y, raw[h], h, _cal(meta, h)) for h in raw}
    ys, rs, ps = [], [], []
    for site, path in personal_model_paths(cfg, out / "federated", summary["run_key"]).items():
        y1, raw1, meta1 = scores(path, cfg, [cfg.site(site)])
        cal = _cal(meta1, "classifier")
        ys.append(y1)
        rs.append(raw1["classifier"])
        ps.append(cal.probability(raw1["classifier"]))
    y, raw, prob = np.concatenate(ys), np.concatenate(rs), np.concatenate(ps)
    res["personal_model.pt"] = {"classifier": {
        "auc": roc_auc(y, raw), "slides": int(len(y)), "positives": int(y.sum()),
        "ece_calibrated": expected_calibration_error(y, prob), "ece_raw": expected_calibration_error(y, raw),
        "note": "each site's test slides scored by its own personal_model.pt, pooled"}}
    return res


def run_pooled(cfg: Config, out: Path) -> dict:
    from momkd_fed.training import run_training

    t0 = time.perf_counter()
    run_training(cfg, out / "pooled", pooled=True)
    y, raw, meta = scores(out / "pooled" / "model.pt", cfg, cfg.sites)
    return {"seconds": time.perf_counter() - t0,
            "model.pt": {h: figures(y, raw[h], h, _cal(meta, h)) for h in raw}}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def rows(results: dict, preset: str) -> list[str]:
    """Markdown rows: preset, model file, head, test slides, AUC, ECE raw (sigmoid/softmax), ECE raw (range-mapped),
    ECE calibrated."""
    label = {"best_model.pt": "federated global model", "personal_model.pt": "federated personal models",
             "model.pt": "centralised (pooled)"}
    out = []
    for part in PARTS:
        for file, heads in (results.get(part) or {}).items():
            if not isinstance(heads, dict) or file in ("seconds", "rounds", "best_round"):
                continue
            for head, f in heads.items():
                out.append(f"| {preset} | {label[file]}: `{file}` | {head} | {f['slides']} ({f['positives']} pos.) | "
                           f"{_fmt(f['auc'])} | {_fmt(f['ece_raw'])} | {_fmt(f.get('ece_raw_range_mapped'))} | "
                           f"{_fmt(f['ece_calibrated'])} |")
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import accuracy  # benchmarks/ is on the path: this script's folder

    accuracy.quiet_process(1)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(a, out)
    results = {"preset": a.preset, "task": a.task if a.preset == "tcga-brca" else None, "seed": a.seed,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or
               platform.machine(), "date": time.strftime("%Y-%m-%d")}
    for part in a.parts:
        path = out / f"{part}.json"
        if path.is_file():
            results[part] = json.loads(path.read_text())
            log.info("%s: already done (%s)", part, path)
            continue
        log.info("%s: running", part)
        res = run_federated(cfg, out) if part == "federated" else run_pooled(cfg, out)
        path.write_text(json.dumps(res, indent=1))
        results[part] = res
    (out / "results.json").write_text(json.dumps(results, indent=1))
    preset = a.preset if a.preset == "tiny" else f"tcga-brca {a.task.upper()}"
    print("| preset | model file | head | test slides | AUC | ECE raw (softmax / sigmoid) | ECE raw (range-mapped) "
          "| ECE calibrated |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows(results, preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
