"""The report's PNG plots, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend).

Every ``plot_*`` function takes the series it draws and an output path and returns a :class:`Plot`: ``path`` set
when a file was written, otherwise ``reason`` says which data was absent. Nothing is drawn from invented data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..metrics import roc_auc
from .comparison import Stat, ordered_wheres
from .run_folder import CLASSIFIER, MEAN_OF_SITES, MEMORY, Predictions, finite

log = logging.getLogger(__name__)

DPI = 100


@dataclass
class Plot:
    """One figure of the report: written to ``path``, or skipped for ``reason``."""

    name: str  # file stem, e.g. "roc"
    title: str
    path: Path | None = None
    reason: str = ""
    caption: str = ""


def new_figure(width: float, height: float):
    """A matplotlib Figure bound to an Agg canvas (thread-safe; leaves pyplot's global state alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, plot: Plot, out_dir: Path) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot.path = out_dir / f"{plot.name}.png"
    fig.savefig(plot.path, dpi=DPI)
    log.debug("wrote %s", plot.path)
    return plot


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve vertices (FPR (R+1,), TPR (R+1,)) with tied scores as one threshold; needs both classes."""
    order = np.argsort(-scores, kind="mergesort")  # (N,) descending
    y = labels[order]
    s = scores[order]
    last = np.r_[s[1:] != s[:-1], True]  # (N,) last index of each distinct score
    tps = np.cumsum(y)[last]  # (R,)
    fps = np.cumsum(1 - y)[last]  # (R,)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


_BLACK = ("pooled", "all sites", MEAN_OF_SITES)  # drawn thick and black: the whole federation


def _palette(*series: dict) -> dict[str, str]:
    """One colour per site over every panel of a figure (a site keeps its colour where another has no data)."""
    names = [w for s in series for w in s if w not in _BLACK]
    return {w: f"C{i % 10}" for i, w in enumerate(dict.fromkeys(names))}


def _style(where: str, colors: dict[str, str]) -> dict:
    if where in _BLACK:
        return dict(color="black", lw=2.5, zorder=3)
    return dict(color=colors.get(where), lw=1.5)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_roc(preds: dict[str, Predictions], out_dir: Path, model: str = "") -> Plot:
    """ROC per site and pooled on the test split, one panel per head the CSVs hold (the heads the model trained);
    ``model`` names the model file in the title."""
    plot = Plot("roc", f"ROC curves on the test split{': ' + model if model else ''}")
    if not preds:
        plot.reason = ("no predictions/test_<site>.csv in the run folder (per-slide scores are written only where "
                       "the slides are local: simulate and train runs)")
        return plot
    heads = []  # only the heads the model file trained are in the CSVs
    if any(p.prob is not None for p in preds.values()):
        heads.append(("prob", "classifier"))
    if any(p.memory_score is not None for p in preds.values()):
        heads.append(("memory_score", "memory head δ(F_wsi)"))
    colors = _palette(preds)
    fig = new_figure(5.2 * len(heads), 5.0)
    axes = fig.subplots(1, len(heads), squeeze=False)[0]
    skipped = []
    for ax, (attr, head) in zip(axes, heads):
        for where, p in preds.items():
            scores = getattr(p, attr)
            if scores is None:
                continue
            n_pos = int(p.labels.sum())
            if n_pos == 0 or n_pos == p.labels.size:
                skipped.append(where)
                continue
            fpr, tpr = roc_points(p.labels, scores)
            ax.plot(fpr, tpr, drawstyle="default", label=f"{where}: AUC {roc_auc(p.labels, scores):.3f} "
                    f"(n={p.labels.size})", **_style(where, colors))
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=head)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=8)
    if skipped:
        plot.caption = f"No ROC curve for {', '.join(sorted(set(skipped)))}: one class only in the test split."
    return _save(fig, plot, out_dir)


def _lines(ax, series: dict[str, tuple[list, list]], colors: dict[str, str], marker: str = "o",
           ls: str = "-") -> None:
    for where, (xs, ys) in series.items():
        if finite(ys):
            ax.plot(xs, ys, marker=marker, ms=4, ls=ls, label=where, **_style(where, colors))
    _integer_x(ax)


_HEAD_STYLE = {CLASSIFIER: "-", MEMORY: "--"}


def _legend_handles(ax, heads: list[str]) -> list:
    """One entry per site (its colour) and one per head (its line style), instead of one per line."""
    from matplotlib.lines import Line2D

    seen: dict[str, object] = {}
    for line in ax.get_lines():
        label = line.get_label()
        if not label.startswith("_") and label not in seen:
            seen[label] = Line2D([], [], color=line.get_color(), lw=line.get_linewidth(), label=label)
    styles = [Line2D([], [], color="grey", ls=_HEAD_STYLE.get(h, ":"), label=h) for h in heads]
    return [*seen.values(), *styles]


def plot_auc_rounds(auc: dict[tuple[str, str], dict[str, tuple[list, list]]], xlabel: str, out_dir: Path,
                    best: int | None = None) -> Plot:
    """AUC per round (or epoch): one panel per model (global, personalised, validation), one colour per site,
    solid = classifier head, dashed = memory score; ``best``: the round (epoch) kept by validation, marked."""
    plot = Plot("auc_per_round" if xlabel == "round" else "auc_per_epoch", f"AUC per {xlabel}")
    models = list(dict.fromkeys(m for m, _ in auc))
    panels = [m for m in models if any(finite(ys) for (mm, _), s in auc.items() if mm == m for _, ys in s.values())]
    if not panels:
        plot.reason = f"no AUC recorded per {xlabel} (no finite test or validation AUC values)"
        return plot
    colors = _palette(*auc.values())
    fig = new_figure(5.0 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, panels):
        heads = [h for (m, h), s in auc.items() if m == model and any(finite(ys) for _, ys in s.values())]
        for head in heads:
            _lines(ax, auc[(model, head)], colors, ls=_HEAD_STYLE.get(head, ":"))
        ax.axhline(0.5, ls=":", color="grey", lw=1)
        if best:
            ax.axvline(best, color="tab:red", lw=1, alpha=0.6)
        title = model if xlabel != "round" or model == "validation" else f"{model} model (test)"
        if xlabel == "round" and model == "validation":
            title = "global model (validation)"
        ax.set(xlabel=xlabel, ylabel="AUC", title=title, ylim=(0, 1.02))
        ax.legend(handles=_legend_handles(ax, heads), fontsize=7, loc="lower right")
    plot.caption = "Solid: classifier head; dashed: memory score δ(F_wsi)."
    if best:
        plot.caption += (f" Red line: the {xlabel} with the best validation AUC ({xlabel} {best}), whose model is "
                         f"kept ({'best_model.pt' if xlabel == 'round' else 'model.pt'}).")
    if any(MEAN_OF_SITES in s for s in auc.values()):
        plot.caption += (" Black: the sites' slide-weighted mean (per-slide outputs never leave a site, so this is "
                         "not a pooled AUC).")
    return _save(fig, plot, out_dir)


def plot_losses(losses: dict[str, dict[str, tuple[list, list]]], xlabel: str, out_dir: Path) -> Plot:
    """One panel per loss term (total first), one line per site: mean per training slide."""
    plot = Plot("losses", f"Loss terms per {xlabel}")
    terms = [t for t, s in losses.items() if any(finite(ys) for _, ys in s.values())]
    terms.sort(key=lambda t: (t != "total", t))
    if not terms:
        plot.reason = f"no loss terms recorded per {xlabel} (no loss_* metrics)"
        return plot
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = new_figure(4.2 * ncols, 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _palette(*losses.values())
    for ax, term in zip(axes, terms):
        _lines(ax, losses[term], colors, marker=".")
        ax.set(xlabel=xlabel, title=term)
        ax.legend(fontsize=7)
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    plot.caption = "Mean per training slide; a NaN (term undefined at that site) leaves a gap."
    return _save(fig, plot, out_dir)


def plot_bytes(sent: dict[str, tuple[list, list]], received: dict[str, tuple[list, list]], out_dir: Path) -> Plot:
    """Megabytes sent and received per round, stacked by site (the bar height is the round's total)."""
    plot = Plot("bytes_per_round", "Communication per round")
    panels = [(t, s) for t, s in (("sent", sent), ("received", received)) if any(finite(ys) for _, ys in s.values())]
    if not panels:
        plot.reason = "no bytes_sent/bytes_received recorded in rounds.jsonl"
        return plot
    colors = _palette(sent, received)
    fig = new_figure(5.0 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels):
        rounds = sorted({x for xs, _ in series.values() for x in xs})
        bottom = np.zeros(len(rounds))  # (R,)
        for where, (xs, ys) in series.items():
            by_round = dict(zip(xs, ys))
            mb = np.array([by_round.get(r, 0.0) / 1e6 for r in rounds])  # (R,) not in a round = nothing sent
            mb = np.nan_to_num(mb)
            ax.bar(rounds, mb, bottom=bottom, label=where, color=colors.get(where, "grey"), width=0.7)
            bottom += mb
        _integer_x(ax)
        ax.set_ylim(0, 1.3 * float(bottom.max()) or 1.0)  # head room for the legend
        ax.set(xlabel="round", ylabel="MB", title={"sent": "server → sites (bytes_sent)",
                                                    "received": "sites → server (bytes_received)"}[title])
        ax.legend(fontsize=8)
    plot.caption = "Stacked by site; a site missing from a round (not sampled) counts as nothing sent."
    return _save(fig, plot, out_dir)


def plot_baselines(cols: dict[str, dict[str, Stat]], out_dir: Path) -> Plot:
    """Grouped bars of test AUC: one group per site (and pooled), one bar per method; error bars = std over seeds."""
    plot = Plot("baselines", "Federated model and baselines (test AUC)")
    if len(cols) < 2:
        plot.reason = "no baselines in summary.json (run simulate with --baselines local,centralized)"
        return plot
    wheres = ordered_wheres(cols)
    x = np.arange(len(wheres))  # (G,)
    width = 0.8 / len(cols)
    fig = new_figure(max(6.0, 1.2 * len(wheres) * max(1, len(cols) / 3)), 4.5)
    ax = fig.subplots()
    for i, (label, m) in enumerate(cols.items()):
        means = np.array([m[w].mean if w in m else np.nan for w in wheres])  # (G,)
        stds = np.array([m[w].std if w in m and m[w].n > 1 else 0.0 for w in wheres])  # (G,)
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=3, label=label)
    ax.axhline(0.5, ls=":", color="grey", lw=1)
    ax.set_xticks(x, wheres)
    ax.set(ylabel="test AUC", ylim=(0, 1.05))
    ax.legend(fontsize=8, ncols=min(3, len(cols)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    plot.caption = "Error bars: standard deviation over seeds (absent for a single seed); a missing bar = not run."
    return _save(fig, plot, out_dir)


def plot_privacy(epsilon: tuple[list, list], out_dir: Path) -> Plot:
    """Cumulative privacy budget epsilon per round."""
    plot = Plot("privacy", "Privacy budget")
    xs, ys = epsilon
    if not finite(ys):
        plot.reason = "no privacy budget (epsilon) recorded: differential privacy was not used in this run"
        return plot
    fig = new_figure(5.5, 3.8)
    ax = fig.subplots()
    ax.plot(xs, ys, marker="o", color="tab:red")
    _integer_x(ax)
    ax.set(xlabel="round", ylabel="ε (cumulative)", title="privacy budget spent", ylim=(0, None))
    return _save(fig, plot, out_dir)


def plot_seconds(seconds: tuple[list, list], xlabel: str, out_dir: Path) -> Plot:
    """Wall seconds per round (or epoch)."""
    plot = Plot(f"seconds_per_{xlabel}", f"Wall time per {xlabel}")
    xs, ys = seconds
    if not finite(ys):
        plot.reason = f"no seconds recorded per {xlabel}"
        return plot
    fig = new_figure(5.5, 3.5)
    ax = fig.subplots()
    ax.bar(xs, ys, color="tab:grey")
    _integer_x(ax)
    ax.set(xlabel=xlabel, ylabel="seconds")
    return _save(fig, plot, out_dir)
