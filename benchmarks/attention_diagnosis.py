"""Diagnosis: where do MoMKD's and ABMIL's attention go on a synthetic federation, and what limits MoMKD?

The synthetic generator (``momkd_fed.synth.generator``) makes every bag from background tissue types plus a
small fraction (3-15%) of *label-phenotype* patches whose mix and appearance follow the case's genomic
programs. Each slide's bag depends only on (seed, slide_id), so the per-patch tissue type of every written slide
can be regenerated; this script does so (and checks that the regenerated features equal the .h5 features), then
trains pooled MoMKD and ABMIL (the engine's ``train_epoch`` / ``evaluate``, best epoch by validation AUC as in
``fit``) and measures, on the test slides:

1. per epoch: test AUC and the attention mass on label-phenotype patches (``mass``) against the uniform baseline
   (their fraction, ``frac``), the attention's perplexity / P (``eff_n``, 1 = uniform); for MoMKD also tau and
   the mean s+ - s- gap of label vs background patches;
2. attention mass per tissue type (best epoch), and MoMKD's s+, s-, s+ - s- per tissue type;
3. counterfactual pooling of the trained networks' patch features h: the model's own attention, uniform mean,
   the oracle (uniform over label-phenotype patches) and, for MoMKD, ABMIL's attention transplanted; each pooled
   V is scored by the trained classifier / memory head and by a linear probe (logistic regression fit on the
   training slides' V); plus the same linear probe on raw features (data ceilings);
4. MoMKD's memory geometry: cosine between C+ and C- slots, slot usage by tissue type.

Usage::

    python benchmarks/attention_diagnosis.py --out /tmp/diag            # tiny preset, seed 0: ~3-6 min, 1 thread
    python benchmarks/attention_diagnosis.py --out /tmp/diag --seeds 0,1 --epochs 12

Nothing is written but the cohort (``<out>/data-<preset>-<seed>``) and ``<out>/attention_diagnosis.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from momkd_fed import losses as L  # noqa: E402
from momkd_fed.config import Config, from_flat, load_config, to_flat  # noqa: E402
from momkd_fed.data.site import load_site  # noqa: E402
from momkd_fed.engine import evaluate, init_memory_from_bags, make_optimizer, train_epoch  # noqa: E402
from momkd_fed.metrics import roc_auc  # noqa: E402
from momkd_fed.model import build_model  # noqa: E402
from momkd_fed.training import normalise_sites  # noqa: E402

log = logging.getLogger("attention_diagnosis")


# --------------------------------------------------------------------------------------------------------------
# data and tissue labels


def make_cohort(out: Path, preset: str, seed: int) -> Path:
    from momkd_fed.synth import synthesize

    path = out / f"data-{preset}-{seed}" / "federation.yaml"
    if not path.is_file():
        synthesize(preset, path.parent, seed=seed)
    return path


def regenerate_tissue(preset: str, seed: int) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """{slide_id: (site, tissue (P,), features (P, D))} regenerated exactly as ``write_cohort`` draws them."""
    import pandas as pd

    from momkd_fed.synth.generator import HistologyModel, stable_rng
    from momkd_fed.synth.presets import PRESETS, make_preset

    params = make_preset(preset)
    cohort = PRESETS[preset][1](params, seed)
    model = HistologyModel(params.histology, n_genes=cohort.genes.shape[1], seed=seed)
    model.fit_programs(cohort.genes.to_numpy())
    programs = pd.DataFrame(model.programs(cohort.genes.to_numpy()), index=cohort.genes.index)
    out = {}
    for site in cohort.sites:
        for row in site.slides.itertuples(index=False):
            srng = stable_rng(seed, "slide", row.slide_id)
            n = model.bag_size(srng)
            s = model.slide(srng, site.name, programs.loc[row.case_id].to_numpy(), n,
                            level0_magnification=int(row.level0_magnification))
            out[row.slide_id] = (site.name, s.tissue, s.features)
    return out, params.histology.n_background, params.histology.n_label_phenotypes


def load_splits(cfg: Config) -> dict[str, list]:
    datas = [load_site(sc, cfg) for sc in cfg.sites]
    normalise_sites(datas, list(cfg.sites), cfg)
    split = {"train": [], "val": [], "test": []}
    site_of = {}
    for d in datas:
        for name in split:
            split[name] += d.split(name)
        for b in d.bags:
            site_of[b.slide_id] = d.name
    return split, site_of


# --------------------------------------------------------------------------------------------------------------
# model internals


@torch.no_grad()
def internals(model, bag) -> dict:
    """Per-patch h (P, D), attention (P,), and for MoMKD s+ / s- (P,), in eval mode."""
    model.eval()
    x, nb = bag.features, bag.neighbors
    if getattr(model, "has_memory", False):
        h = model.histology_encoder(x, nb).float()
        p = model._project_patches(h)
        sc = model.memory.scores(p)
        a = model(x, nb).attention  # the model's own pooling rule (= softmax((s+ - s-) / tau))
        nearest = torch.einsum("ns,cks->cnk", p, model.memory.normalized()).argmax(-1)  # (2, P)
        return {"h": h, "a": a, "s_pos": sc[1], "s_neg": sc[0], "p": p, "nearest": nearest}
    h = model.embed(x)
    gate = torch.tanh(model.attn_v(h)) * torch.sigmoid(model.attn_u(h))
    a = torch.softmax(model.attn_w(gate).squeeze(-1), dim=0)
    return {"h": h, "a": a}


@torch.no_grad()
def heads(model, v: torch.Tensor) -> tuple[float, float | None]:
    """(P(y=1) of the classifier, memory score or None) for one pooled V (D,)."""
    prob = float(torch.softmax(model.classifier(v.unsqueeze(0)).squeeze(0), -1)[1])
    if not getattr(model, "has_memory", False):
        return prob, None
    f = F.normalize(model.slide_proj(v), dim=-1)
    return prob, float(L.memory_delta(f, model.memory.normalized(), model.loss_cfg.align_t))


def probe_auc(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Test AUC of an L2 logistic regression (C by 5-fold CV on the training rows), standardised inputs."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, max_iter=2000, scoring="roc_auc"))
    clf.fit(xtr, ytr)
    return roc_auc(yte, clf.predict_proba(xte)[:, 1])


# --------------------------------------------------------------------------------------------------------------
# measurements


def label_mass(model, bags, tissue, n_bg) -> dict:
    """Mean attention mass on label-phenotype patches, their mean fraction, and for MoMKD the s+ - s- gap."""
    mass, frac, gap_l, gap_b, eff = [], [], [], [], []
    for b in bags:
        r = internals(model, b)
        lab = torch.from_numpy(tissue[b.slide_id] >= n_bg)
        a = r["a"].clamp_min(1e-30)
        eff.append(float(torch.exp(-(a * a.log()).sum())) / a.numel())  # perplexity / P: 1 = uniform
        mass.append(float(r["a"][lab].sum()))
        frac.append(float(lab.float().mean()))
        if "s_pos" in r:
            g = r["s_pos"] - r["s_neg"]
            if lab.any():
                gap_l.append(float(g[lab].mean()))
            gap_b.append(float(g[~lab].mean()))
    out = {"mass": float(np.mean(mass)), "frac": float(np.mean(frac)), "eff_n": float(np.mean(eff))}
    if gap_b:
        out["gap_label"] = float(np.mean(gap_l))
        out["gap_bg"] = float(np.mean(gap_b))
    return out


def train(cfg: Config, split: dict, tissue: dict, n_bg: int, epochs: int) -> tuple[torch.nn.Module, list[dict]]:
    """Pooled training as run_training/fit do it, with per-epoch attention diagnostics; best val-AUC state."""
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    n_genes = next((int(b.omics.shape[0]) for b in split["train"] if b.omics is not None), 0)
    model = build_model(cfg, cfg.data.feature_dim, n_genes)
    init_memory_from_bags(model, split["train"], cfg, device=torch.device("cpu"))
    opt = make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    rows, best, best_state = [], -math.inf, None
    for epoch in range(0, epochs + 1):
        if epoch > 0:
            train_epoch(model, split["train"], opt, cfg, generator=gen, device=torch.device("cpu"))
        val = evaluate(model, split["val"], torch.device("cpu")).metrics()
        test = evaluate(model, split["test"], torch.device("cpu")).metrics()
        row = {"epoch": epoch, "val_auc": val["classifier"]["auc"], "test_auc": test["classifier"]["auc"],
               "test_mem_auc": test["memory"]["auc"] if test["memory"] else math.nan}
        row.update(label_mass(model, split["test"], tissue, n_bg))
        if hasattr(model, "tau"):
            row["tau"] = float(model.tau().detach())
        rows.append(row)
        if epoch > 0 and row["val_auc"] > best:
            best, best_state = row["val_auc"], copy.deepcopy(model.state_dict())
            row["best"] = True
    model.load_state_dict(best_state)
    return model, rows


def per_tissue(model, bags, tissue, n_types, site_of) -> dict:
    """Per tissue type: mean attention mass per slide, mean fraction per slide; MoMKD: s+, s-, gap (patch means)."""
    mass = np.zeros((len(bags), n_types))
    frac = np.zeros((len(bags), n_types))
    sums = {k: np.zeros(n_types) for k in ("s_pos", "s_neg")}
    cnt = np.zeros(n_types)
    by_site: dict[str, list[np.ndarray]] = {}
    for i, b in enumerate(bags):
        r = internals(model, b)
        t = tissue[b.slide_id]
        a = r["a"].numpy()
        for k in range(n_types):
            m = t == k
            mass[i, k] = a[m].sum()
            frac[i, k] = m.mean()
            if "s_pos" in r and m.any():
                for key in sums:
                    sums[key][k] += r[key].numpy()[m].sum()
        cnt += np.bincount(t, minlength=n_types)
        by_site.setdefault(site_of[b.slide_id], []).append(mass[i] - frac[i])
    out = {"mass": mass.mean(0).tolist(), "frac": frac.mean(0).tolist(),
           "mass_by_class": {str(c): mass[[b.label == c for b in bags]].mean(0).tolist() for c in (0, 1)},
           "excess_by_site": {s: np.mean(v, 0).tolist() for s, v in sorted(by_site.items())}}
    if getattr(model, "has_memory", False):
        out["s_pos"] = (sums["s_pos"] / np.maximum(cnt, 1)).tolist()
        out["s_neg"] = (sums["s_neg"] / np.maximum(cnt, 1)).tolist()
    return out


def pooled_features(model, bags, tissue, n_bg, other=None) -> dict[str, np.ndarray]:
    """V (N, D) per pooling rule: own attention, uniform, oracle (uniform over label patches), other's attention."""
    out: dict[str, list] = {"own": [], "uniform": [], "oracle": []}
    if other is not None:
        out["abmil_att"] = []
    for b in bags:
        r = internals(model, b)
        h = r["h"]
        lab = torch.from_numpy(tissue[b.slide_id] >= n_bg)
        out["own"].append(r["a"] @ h)
        out["uniform"].append(h.mean(0))
        out["oracle"].append(h[lab].mean(0) if lab.any() else h.mean(0))
        if other is not None:
            out["abmil_att"].append(internals(other, b)["a"] @ h)
    return {k: torch.stack(v) for k, v in out.items()}


def counterfactuals(model, split, tissue, n_bg, other=None) -> dict:
    ytr = np.array([b.label for b in split["train"]])
    yte = np.array([b.label for b in split["test"]])
    vtr = pooled_features(model, split["train"], tissue, n_bg, other)
    vte = pooled_features(model, split["test"], tissue, n_bg, other)
    res = {}
    for k in vte:
        sc = [heads(model, v) for v in vte[k]]
        row = {"classifier": roc_auc(yte, [s[0] for s in sc]),
               "probe": probe_auc(vtr[k].numpy(), ytr, vte[k].numpy(), yte)}
        if sc[0][1] is not None:
            row["memory"] = roc_auc(yte, [s[1] for s in sc])
        res[k] = row
    return res


def raw_ceilings(split, tissue, n_bg) -> dict:
    """Linear probes on raw features: slide mean, label-patch mean (+ label fraction)."""
    def feats(bags, kind):
        rows = []
        for b in bags:
            x = b.features.numpy()
            lab = tissue[b.slide_id] >= n_bg
            if kind == "mean":
                rows.append(x.mean(0))
            else:
                m = x[lab].mean(0) if lab.any() else x.mean(0)
                rows.append(np.concatenate([m, [lab.mean()]]) if kind == "oracle+frac" else m)
        return np.stack(rows)
    ytr = np.array([b.label for b in split["train"]])
    yte = np.array([b.label for b in split["test"]])
    return {k: probe_auc(feats(split["train"], k), ytr, feats(split["test"], k), yte)
            for k in ("mean", "oracle", "oracle+frac")}


def memory_geometry(model, bags, tissue, n_types) -> dict:
    """Max cosine of each C+ slot to C-; which tissue types the slots of each class are nearest to (test)."""
    mem = model.memory.normalized().detach()
    cross = (mem[1] @ mem[0].T).amax(1)  # (K,) each C+ slot's nearest C- slot
    k = mem.shape[1]
    use = np.zeros((2, k, n_types))
    for b in bags:
        r = internals(model, b)
        t = tissue[b.slide_id]
        for c in (0, 1):
            np.add.at(use[c], (r["nearest"][c].numpy(), t), 1)
    return {"cplus_to_cminus_max_cos": cross.tolist(), "slot_use": use.tolist()}


# --------------------------------------------------------------------------------------------------------------
# printing


def fmt(x) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:5.3f}"


def print_report(res: dict, n_bg: int, n_types: int) -> None:
    names = [f"bg{k}" for k in range(n_bg)] + [f"L{k - n_bg}" for k in range(n_bg, n_types)]
    print(f"\n=== seed {res['seed']} ===")
    for name in ("momkd", "abmil"):
        print(f"\n[{name}] per epoch (test): mass = attention on label-phenotype patches, frac = their fraction")
        cols = ["epoch", "val_auc", "test_auc", "test_mem_auc", "mass", "frac", "eff_n", "gap_label", "gap_bg", "tau"]
        print("  " + " ".join(f"{c:>12}" for c in cols))
        for r in res[name]["epochs"]:
            print("  " + " ".join(f"{r[c]:>12}" if c == "epoch" else f"{fmt(r.get(c)):>12}" for c in cols)
                  + ("  *" if r.get("best") else ""))
    print("\nper tissue type, best epoch, test slides (bg0 = generic tumour; L* = label phenotypes)")
    print("  " + f"{'':28}" + " ".join(f"{n:>7}" for n in names))
    pt = res["abmil"]["tissue"]
    print("  " + f"{'fraction':28}" + " ".join(f"{v:7.3f}" for v in pt["frac"]))
    for name in ("momkd", "abmil"):
        pt = res[name]["tissue"]
        print("  " + f"{name + ' attention mass':28}" + " ".join(f"{v:7.3f}" for v in pt["mass"]))
        for c in ("0", "1"):
            print("  " + f"{name + ' mass, y=' + c:28}" + " ".join(f"{v:7.3f}" for v in pt["mass_by_class"][c]))
        for s, v in pt["excess_by_site"].items():
            print("  " + f"{name + ' excess ' + s:28}" + " ".join(f"{x:+7.3f}" for x in v))
    pt = res["momkd"]["tissue"]
    for key in ("s_pos", "s_neg"):
        print("  " + f"{'momkd ' + key:28}" + " ".join(f"{v:7.3f}" for v in pt[key]))
    print("  " + f"{'momkd s+ - s-':28}" + " ".join(f"{a - b:+7.3f}" for a, b in zip(pt["s_pos"], pt["s_neg"])))
    print("\ncounterfactual pooling (test AUC): trained head on V, and a linear probe fit on training V")
    for name in ("momkd", "abmil"):
        for k, r in res[name]["pooling"].items():
            print(f"  {name:6} {k:10} classifier {fmt(r['classifier'])}  memory {fmt(r.get('memory'))}"
                  f"  probe {fmt(r['probe'])}")
    print("raw-feature linear probes (test AUC): " + ", ".join(f"{k} {v:.3f}" for k, v in res["raw"].items()))
    g = res["momkd"]["memory"]
    print("momkd memory: max cos of each C+ slot to C-: " + " ".join(f"{v:.2f}" for v in
                                                                     g["cplus_to_cminus_max_cos"]))
    for c, cname in ((1, "C+"), (0, "C-")):
        use = np.asarray(g["slot_use"][c])
        tot = use.sum(0, keepdims=True).clip(1)
        print(f"  nearest-{cname}-slot share per tissue type (rows: slots with >2% of some type)")
        for j, row in enumerate(use / tot):
            if row.max() > 0.02:
                print(f"    slot {j:2d} " + " ".join(f"{v:7.2f}" for v in row))


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="synthetic preset (tiny is the one sized for this)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", default="0", help="training seeds, comma list")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's train.epochs")
    p.add_argument("--override", action="append", default=[],
                   help="extra MoMKD config override KEY=VALUE (YAML value), e.g. loss.w_mem=0; repeatable")
    p.add_argument("--out", default="runs/attention_diagnosis")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's LogisticRegressionCV notices
    torch.set_num_threads(1)
    import yaml

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    yaml_path = make_cohort(out, a.preset, a.data_seed)
    regen, n_bg, n_lab = regenerate_tissue(a.preset, a.data_seed)
    base = load_config(yaml_path, {"train.progress": False, "train.threads": 1, "train.device": "cpu"})
    split, site_of = load_splits(base)
    tissue = {}
    for bags in split.values():
        for b in bags:
            site, t, f = regen[b.slide_id]
            if not np.array_equal(f, b.features.numpy()):
                raise SystemExit(f"regenerated features differ from the .h5 for {b.slide_id}")
            tissue[b.slide_id] = t
    n_types = n_bg + n_lab
    print(f"cohort {yaml_path}: {', '.join(f'{k} {len(v)}' for k, v in split.items())} slides; "
          f"regenerated tissue labels match the .h5 features for all {len(tissue)} slides")
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        res = {"seed": seed}
        trained = {}
        for name in ("abmil", "momkd"):
            flat = to_flat(base)
            flat.update({"model.name": name, "train.seed": seed})
            if name == "momkd":
                for kv in a.override:
                    k, v = kv.split("=", 1)
                    flat[k] = yaml.safe_load(v)
            cfg = from_flat(flat)
            epochs = a.epochs or cfg.train.epochs
            t1 = time.perf_counter()
            model, rows = train(cfg, split, tissue, n_bg, epochs)
            trained[name] = model
            res[name] = {"epochs": rows, "seconds": time.perf_counter() - t1,
                         "tissue": per_tissue(model, split["test"], tissue, n_types, site_of)}
        res["momkd"]["pooling"] = counterfactuals(trained["momkd"], split, tissue, n_bg, other=trained["abmil"])
        res["abmil"]["pooling"] = counterfactuals(trained["abmil"], split, tissue, n_bg)
        res["momkd"]["memory"] = memory_geometry(trained["momkd"], split["test"], tissue, n_types)
        res["raw"] = raw_ceilings(split, tissue, n_bg)
        print_report(res, n_bg, n_types)
        results.append(res)
    (out / "attention_diagnosis.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; {out / 'attention_diagnosis.json'}")


if __name__ == "__main__":
    main()
