"""Benchmark: MoMKD training-step and inference speed and peak memory, ours vs. a torch_geometric comparator.

The comparator is the same MoMKD model (same weights, heads, losses) except that its histology encoder is built
from torch_geometric's ``GATv2Conv`` at the same dims (2 heads concatenated, residual projection, LayerNorm, ELU,
dropout, jumping-knowledge max), on an ``edge_index`` made from the same kNN graph, and that it steps with torch's
default ``AdamW`` -- what the reference implementation runs. Ours steps with the optimiser the engine builds
(``momkd_fed.engine.make_optimizer``: the fused AdamW kernel where torch has one). torch_geometric is a
benchmark/test-only dependency.

Measured per bag size P and precision (fp32; bf16 = ``torch.autocast`` bfloat16 with fp32 master weights):

- training step: forward, loss with paired omics (G = 768), backward, gradient clipping, AdamW step (see above),
  ``after_step``; median over ``--steps`` steps after ``--warmup``, ours and comparator interleaved step by step
  so that both see the same machine noise; wall time and process CPU time (``x cpu``: the CPU-time ratio, the
  robust figure on a shared machine with ``--threads 1``);
- inference: eval mode, no grad, histology only (no omics), median likewise;
- peak memory: each (model, P, precision, mode) in a fresh subprocess running two steps; CPU: the peak resident
  set (VmHWM, reset after the imports) minus the resident set after the imports, so it includes the model,
  optimiser state, the bag and all activations (``ru_maxrss`` is the fallback where /proc is missing); CUDA:
  ``torch.cuda.max_memory_allocated`` from before the bag and model are made.

Usage::

    python benchmarks/step_speed.py                 # P in {1k, 5k, 20k}, fp32 and bf16, 2 threads (~12 min)
    python benchmarks/step_speed.py --quick         # P = 1k and 5k, fewer steps (~1-2 min)
    python benchmarks/step_speed.py --auc           # also bf16-vs-fp32 AUC on the tiny synthetic federation

On a machine with a CUDA GPU the same configurations are measured on it too (``--device`` to restrict).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("step_speed")

FEATURE_DIM = 1536  # UNI2-h
N_GENES = 768  # paired omics, as in the paper
KNN_K = 8


# --------------------------------------------------------------------------------------------------------------
# Models


class PygHistologyEncoder(nn.Module):
    """The reference histology encoder built from torch_geometric ``GATv2Conv`` layers (the comparator).

    Same structure and weights as :class:`momkd_fed.model.gatv2.HistologyEncoder`; takes the dense (P, k+1)
    neighbour index and turns it into an ``edge_index`` (cached per index tensor, as the reference builds it once
    per slide in its data loader, so the conversion is not timed).
    """

    def __init__(self, enc: nn.Module) -> None:
        super().__init__()
        from torch_geometric.nn import GATv2Conv

        self.gats = nn.ModuleList()
        for g in enc.gats:
            conv = GATv2Conv(g.lin_l.in_features, g.head_dim, heads=g.heads, concat=True, dropout=g.attn_dropout,
                             add_self_loops=False, share_weights=False, negative_slope=g.slope)
            with torch.no_grad():
                conv.lin_l.weight.copy_(g.lin_l.weight)
                conv.lin_l.bias.copy_(g.lin_l.bias)
                conv.lin_r.weight.copy_(g.lin_r.weight)
                conv.lin_r.bias.copy_(g.lin_r.bias)
                conv.att.copy_(g.att.unsqueeze(0))
                conv.bias.copy_(g.bias)
            self.gats.append(conv)
        self.norms = copy.deepcopy(enc.norms)
        self.res_proj = copy.deepcopy(enc.res_proj)
        self.dropout = nn.Dropout(enc.dropout.p)
        self._edges: tuple[int, torch.Tensor] | None = None

    def edge_index(self, neighbors: torch.Tensor) -> torch.Tensor:
        """(P, k+1) -> (2, P*(k+1)) edges j -> i (source row 0, target row 1), cached by tensor identity."""
        key = neighbors.data_ptr()
        if self._edges is None or self._edges[0] != key:
            p, k1 = neighbors.shape
            tgt = torch.arange(p, device=neighbors.device).repeat_interleave(k1)  # (E,)
            self._edges = (key, torch.stack([neighbors.reshape(-1), tgt]))  # (2, E)
        return self._edges[1]

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        edge_index = self.edge_index(neighbors)
        h, out = x, None
        for i, (gat, norm) in enumerate(zip(self.gats, self.norms)):
            res = self.res_proj(h) if i == 0 else h  # (P, D)
            h = self.dropout(F.elu(norm(gat(h, edge_index)))) + res  # (P, D)
            out = h if out is None else torch.maximum(out, h)
        return out


def build_models(device: torch.device, which: str = "both") -> dict[str, nn.Module]:
    """``{"ours": MoMKD, "pyg": the comparator}`` at the reference run dims, identical weights."""
    from momkd_fed.config import LossConfig, MemoryConfig, ModelConfig
    from momkd_fed.model.momkd import MoMKD

    torch.manual_seed(0)
    ours = MoMKD(ModelConfig(), MemoryConfig(), LossConfig(), FEATURE_DIM, N_GENES)
    models = {}
    if which in ("both", "pyg"):
        comp = copy.deepcopy(ours)
        comp.histology_encoder = PygHistologyEncoder(ours.histology_encoder)
        models["pyg"] = comp.to(device)
    if which in ("both", "ours"):
        models["ours"] = ours.to(device)
    return models


def make_bag(p: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic slide: (P, 1536) features, (P, k+1) kNN index on grid coordinates, (G,) omics."""
    from momkd_fed.data.graph import knn_neighbors

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(p * 1.3)))
    cells = np.sort(rng.choice(side * side, size=p, replace=False))  # raster order, as feature extractors write
    coords = (np.stack([cells % side, cells // side], 1) * 512).astype(np.float64)  # (P, 2)
    neighbors = torch.as_tensor(knn_neighbors(coords, KNN_K), dtype=torch.long)  # (P, k+1)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(p, FEATURE_DIM, generator=g)  # (P, D_in)
    omics = torch.randn(N_GENES, generator=g)  # (G,)
    return feats.to(device), neighbors.to(device), omics.to(device)


# --------------------------------------------------------------------------------------------------------------
# One step


class Stepper:
    """A model with its AdamW optimiser; ``train_step`` and ``infer`` as the engine runs them.

    ``reference``: torch's default AdamW, as the reference implementation (the comparator); otherwise the
    engine's ``make_optimizer`` (ours).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str, reference: bool = False) -> None:
        from momkd_fed.config import TrainConfig
        from momkd_fed.engine import make_optimizer

        self.model, self.device, self.precision = model, device, precision
        self.cfg = TrainConfig(precision=precision)
        if reference:
            params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        else:
            self.opt = make_optimizer(model, self.cfg)
        self.params = [p for grp in self.opt.param_groups for p in grp["params"]]
        self.step_no = 0

    def _autocast(self):
        from momkd_fed.device import autocast_context

        return autocast_context(self.device, self.precision)

    def train_step(self, feats, nbrs, omics) -> float:
        label = self.step_no % 2
        self.step_no += 1
        self.model.train()
        with self._autocast():
            out = self.model(feats, nbrs, omics)
            losses = self.model.loss(out, label, omics)
        self.opt.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.model.after_step(out, label)
        return float(losses.total.detach())

    @torch.no_grad()
    def infer(self, feats, nbrs) -> float:
        self.model.eval()
        with self._autocast():
            out = self.model(feats, nbrs, None)
        return float(out.logits[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def time_pair(p: int, precision: str, device: torch.device, steps: int, warmup: int) -> dict:
    """Median train-step and inference seconds of ours and the comparator, interleaved, same bag and weights.

    Returns ``{impl: {"train"|"infer": wall median, "train_cpu"|"infer_cpu": process CPU-time median}}``. CPU time
    is the robust figure on a shared machine with one thread (it does not count time spent descheduled); with
    several threads it also counts OpenMP spin-waiting.
    """
    feats, nbrs, omics = make_bag(p, device)
    steppers = {k: Stepper(m, device, precision, reference=k == "pyg") for k, m in build_models(device).items()}
    times: dict[str, dict[str, list[float]]] = {k: {} for k in steppers}
    for mode in ("train", "infer"):
        for i in range(warmup + steps):
            for name, st in steppers.items():
                if mode == "train":
                    wall, cpu = timed(lambda: st.train_step(feats, nbrs, omics), device)
                else:
                    wall, cpu = timed(lambda: st.infer(feats, nbrs), device)
                if i >= warmup:
                    times[name].setdefault(mode, []).append(wall)
                    times[name].setdefault(mode + "_cpu", []).append(cpu)
    return {name: {key: statistics.median(v) for key, v in d.items()} for name, d in times.items()}


# --------------------------------------------------------------------------------------------------------------
# Peak memory, one configuration per fresh process


def _status_bytes(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak resident set size (VmHWM) of this process (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(impl: str, p: int, precision: str, mode: str, device_name: str, threads: int) -> dict:
    """Run inside a fresh process: peak memory of two steps of one configuration, above the post-import baseline."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if impl == "pyg":
        import torch_geometric.nn  # noqa: F401  (its import is part of the baseline, not of the step)
    import momkd_fed.engine  # noqa: F401
    import momkd_fed.model.momkd  # noqa: F401

    # imports may have peaked above what they keep resident: reset the high-water mark, then measure from here
    hwm = _reset_peak() and _status_bytes("VmHWM") is not None
    base = _status_bytes("VmRSS") if hwm else _maxrss_bytes()
    base_cuda = 0
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    feats, nbrs, omics = make_bag(p, device)
    st = Stepper(build_models(device, impl)[impl], device, precision, reference=impl == "pyg")
    for _ in range(2):
        st.train_step(feats, nbrs, omics) if mode == "train" else st.infer(feats, nbrs)
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base_cuda, "kind": "cuda_max_allocated"}
    if hwm:
        return {"peak_bytes": _status_bytes("VmHWM") - base, "kind": "VmHWM_minus_VmRSS_after_imports"}
    return {"peak_bytes": _maxrss_bytes() - base, "kind": "ru_maxrss_minus_baseline"}


def measure_memory(impl: str, p: int, precision: str, mode: str, device: torch.device, threads: int) -> float:
    """Peak memory in GB of one configuration, measured in a fresh subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", impl, str(p), precision, mode,
           str(device), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory child {cmd[3:]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"] / 1e9


# --------------------------------------------------------------------------------------------------------------
# bf16 vs fp32 AUC on the tiny synthetic federation


def same_weights_bf16(model_path: Path, cfg) -> dict:
    """Test AUC of one trained (fp32) model evaluated in fp32 and in bf16: the precision effect alone."""
    from momkd_fed.checkpoint import load_model
    from momkd_fed.data.site import load_site
    from momkd_fed.engine import evaluate

    model, _, _ = load_model(model_path)
    bags = [b for sc in cfg.sites for b in load_site(sc, cfg).split("test")]
    preds = {prec: evaluate(model, bags, torch.device("cpu"), prec) for prec in ("fp32", "bf16")}
    out = {prec: {head: m["auc"] for head, m in p.metrics().items() if m is not None} for prec, p in preds.items()}
    out["max_abs_prob_diff"] = float(np.abs(preds["bf16"].probs - preds["fp32"].probs).max())
    return out


def auc_comparison(seeds: list[int], threads: int) -> list[dict]:
    """Pooled training on the tiny synthetic federation in fp32 and bf16 per seed; test AUC of both heads.

    Also evaluates each fp32-trained model in bf16 (same weights), which separates the arithmetic effect of bf16
    from the divergence of two training trajectories.
    """
    from momkd_fed.config import load_config
    from momkd_fed.synth import synthesize
    from momkd_fed.training import run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fed = synthesize("tiny", Path(tmp) / "fed", seed=0)
        for seed in seeds:
            row = {"seed": seed}
            for precision in ("fp32", "bf16"):
                cfg = load_config(fed, {"train.precision": precision, "train.seed": seed, "train.threads": threads,
                                        "train.progress": False, "train.device": "cpu"})
                m = run_training(cfg, Path(tmp) / f"run-{seed}-{precision}", pooled=True)
                row[precision] = {"classifier": m["test"]["classifier"]["auc"],
                                  "memory": m["test"]["memory"]["auc"], "seconds": m["seconds"]["fit"],
                                  "test_slides": m["test"]["classifier"]["n"]}
                if precision == "fp32":
                    row["same_weights"] = same_weights_bf16(Path(tmp) / f"run-{seed}-fp32" / "model.pt", cfg)
            rows.append(row)
            log.info("auc seed %d: %s", seed, row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report


def fmt_table(rows: list[dict], with_memory: bool) -> str:
    head = ["device", "P", "prec", "train ours s", "train pyg s", "x", "x cpu", "infer ours s", "infer pyg s", "x",
            "x cpu"]
    if with_memory:
        head += ["train mem ours GB", "train mem pyg GB", "ratio", "infer mem ours GB", "infer mem pyg GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["device"], f"{r['P']:,}", r["precision"]]
        for mode in ("train", "infer"):
            cells += [f"{r[mode + '_ours']:.3f}", f"{r[mode + '_pyg']:.3f}",
                      f"{r[mode + '_pyg'] / r[mode + '_ours']:.2f}",
                      f"{r[mode + '_cpu_pyg'] / r[mode + '_cpu_ours']:.2f}"]
        if with_memory:
            cells += [f"{r['mem_train_ours']:.2f}", f"{r['mem_train_pyg']:.2f}",
                      f"{r['mem_train_ours'] / r['mem_train_pyg']:.2f}",
                      f"{r['mem_infer_ours']:.2f}", f"{r['mem_infer_pyg']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=int, nargs="+", default=[1000, 5000, 20000], help="bag sizes P")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, and CUDA too when available")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="P = 1k, 5k; 3 steps; about a minute or two")
    ap.add_argument("--auc", action="store_true", help="also bf16-vs-fp32 test AUC on the tiny federation")
    ap.add_argument("--auc-seeds", type=int, default=3)
    ap.add_argument("--auc-only", action="store_true", help="only the AUC comparison")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child-memory", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_memory:
        impl, p, precision, mode, dev, threads = args.child_memory
        print(json.dumps(memory_child(impl, int(p), precision, mode, dev, int(threads))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("momkd_fed").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.patches, args.steps = [p for p in args.patches if p <= 5000] or [1000], min(args.steps, 3)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    t_start = time.perf_counter()
    rows: list[dict] = []
    if not args.auc_only:
        for device in devices:
            for p in args.patches:
                for precision in args.precisions:
                    steps = args.steps * (3 if p <= 1000 else 1)  # small bags: cheap, and noisier
                    t = time_pair(p, precision, device, steps, args.warmup)
                    row = {"device": device.type, "P": p, "precision": precision}
                    for key in ("train", "infer", "train_cpu", "infer_cpu"):
                        row[f"{key}_ours"], row[f"{key}_pyg"] = t["ours"][key], t["pyg"][key]
                    if not args.no_memory:
                        for impl in ("ours", "pyg"):
                            for mode in ("train", "infer"):
                                row[f"mem_{mode}_{impl}"] = measure_memory(impl, p, precision, mode, device,
                                                                           args.threads)
                    rows.append(row)
                    log.info("%s", row)
        print(fmt_table(rows, not args.no_memory))
    auc_rows = auc_comparison(list(range(args.auc_seeds)), args.threads) if (args.auc or args.auc_only) else []
    if auc_rows:
        print("\n| seed | fp32 AUC (clf / mem) | bf16 AUC (clf / mem) |\n|---|---|---|")
        for r in auc_rows:
            print(f"| {r['seed']} | {r['fp32']['classifier']:.4f} / {r['fp32']['memory']:.4f} | "
                  f"{r['bf16']['classifier']:.4f} / {r['bf16']['memory']:.4f} |")
        print(f"test slides: {auc_rows[0]['fp32']['test_slides']}")
        for head in ("classifier", "memory"):
            d = [r["bf16"][head] - r["fp32"][head] for r in auc_rows]
            print(f"trained in bf16 vs fp32, mean test AUC difference ({head}): {np.mean(d):+.4f} "
                  f"(per seed {np.round(d, 4).tolist()})")
            d = [r["same_weights"]["bf16"][head] - r["same_weights"]["fp32"][head] for r in auc_rows]
            print(f"fp32-trained model evaluated in bf16 vs fp32, mean test AUC difference ({head}): "
                  f"{np.mean(d):+.4f} (per seed {np.round(d, 4).tolist()})")
        diffs = [r["same_weights"]["max_abs_prob_diff"] for r in auc_rows]
        print(f"same weights: max |P(y=1) bf16 - fp32| over test slides: {max(diffs):.4f}")
    minutes = (time.perf_counter() - t_start) / 60
    print(f"\nthreads {args.threads}; steps {args.steps} (x3 at P <= 1000; median) after {args.warmup} warm-up; "
          f"wall time {minutes:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "auc": auc_rows, "minutes": minutes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
