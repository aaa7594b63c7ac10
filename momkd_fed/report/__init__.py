"""What a user sees of a run: PNG plots and one self-contained HTML page (``momkd-fed report RUN_DIR``).

``build_report(run_dir)`` reads the run folder (:mod:`.run_folder`), draws every plot whose data is present into
``run_dir/report/`` (:mod:`.plots`) and writes ``run_dir/report/index.html`` (:mod:`.html`). Attention heat maps
for ``momkd-fed predict --heatmaps`` are :func:`render_heatmap` (:mod:`.heatmap`).
"""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

from .comparison import auc_columns, to_stat
from .heatmap import render_heatmap
from .html import auc_table, metrics_table, render_page
from .plots import (Plot, plot_auc_rounds, plot_baselines, plot_bytes, plot_losses, plot_privacy, plot_roc,
                    plot_seconds)
from .run_folder import RunData, as_dict, load_run

__all__ = ["build_report", "render_heatmap", "REPORT_DIR"]

log = logging.getLogger(__name__)

REPORT_DIR = "report"  # sub-folder of the run folder holding the PNGs and index.html
_TABLE_NOTES = ("test_auc_model", "test_auc_personal_model", "test_auc_pooled_method")  # summary.json texts shown
# under the AUC table


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _federated_plots(run: RunData, out: Path) -> list[Plot]:
    best = as_dict(as_dict(run.summary.get("models")).get("best_model.pt")).get("label")
    return [
        plot_roc(run.predictions, out, best if isinstance(best, str) else ""),
        plot_auc_rounds(run.auc, "round", out, best=_int(as_dict(run.summary.get("best")).get("round"))),
        plot_losses(run.losses, "round", out),
        plot_bytes(run.bytes_sent, run.bytes_received, out),
        plot_baselines(auc_columns(run.summary, every_head=False), out),
        plot_privacy(run.epsilon, out),
        plot_seconds(run.seconds, "round", out),
    ]


def _train_plots(run: RunData, out: Path) -> list[Plot]:
    return [
        plot_roc(run.predictions, out, "model.pt"),
        plot_auc_rounds(run.auc, "epoch", out, best=_int(run.summary.get("best_epoch"))),
        plot_losses(run.losses, "epoch", out),
        plot_seconds(run.seconds, "epoch", out),
    ]


def _facts(run: RunData) -> dict[str, object]:
    """Run facts: the scalar entries of summary.json / metrics.json, total seconds, dropouts, final epsilon."""
    facts: dict[str, object] = {"run folder": str(run.run_dir.resolve()), "kind": run.kind}
    for key, value in run.summary.items():
        if isinstance(value, (str, int, float, bool)) and key not in _TABLE_NOTES:
            facts[key.replace("_", " ")] = value
    seconds = run.summary.get("seconds")
    if isinstance(seconds, dict) and isinstance(seconds.get("total"), (int, float)):
        facts["seconds"] = seconds["total"]
    facts[f"{'rounds' if run.kind == 'federated' else 'epochs'} logged"] = len(
        {x for s in (*run.auc.values(), *run.losses.values()) for xs, _ in s.values() for x in xs} | set(run.seconds[0]))
    if run.kind == "federated":
        facts["dropouts logged"] = len(run.dropouts)
    if run.epsilon[1]:
        facts["final ε"] = run.epsilon[1][-1]
    return facts


def _tables(run: RunData) -> str:
    """Federated: test AUC per site of the federated model and every baseline. Train: test metrics per head, and
    test AUC per site when several sites were pooled."""
    if run.kind == "federated":
        cols = auc_columns(run.summary)
        notes = [run.summary.get(k) for k in _TABLE_NOTES]
        return (auc_table(cols) if cols else "") + "".join(
            f'<p class="note">{escape(n)}</p>' for n in notes if isinstance(n, str))
    test = {h: m for h, m in as_dict(run.summary.get("test")).items() if isinstance(m, dict)}
    html = metrics_table(test) if test else ""
    per_site = as_dict(run.summary.get("test_per_site"))
    if per_site:
        cols = {}
        for head in test:
            cells = {"pooled": to_stat(test[head].get("auc"))}
            cells.update({site: to_stat(as_dict(as_dict(heads).get(head)).get("auc")) for site, heads in per_site.items()})
            cols[head] = {w: c for w, c in cells.items() if c is not None}
        html += auc_table(cols, table_id="auc-per-site", corner="test AUC per site")
    return html


def build_report(run_dir: Path) -> Path:
    """Draw the plots of ``run_dir`` into ``run_dir/report/`` and write ``run_dir/report/index.html``.

    Parameters
    ----------
    run_dir : Path
        A run folder of ``simulate``, ``server`` (``rounds.jsonl``, ``summary.json``) or ``train``
        (``epochs.jsonl``, ``metrics.json``); ``predictions/test_<site>.csv`` add ROC curves.

    Returns
    -------
    Path
        The HTML page (self-contained: every PNG embedded as a data URI, no scripts, no external assets).

    Raises
    ------
    MomkdError
        If ``run_dir`` is missing or holds none of the run files, or a run file is malformed (named).
    """
    run = load_run(Path(run_dir))
    out = run.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots = _federated_plots(run, out) if run.kind == "federated" else _train_plots(run, out)
    for p in plots:
        if p.path is None:
            log.info("report: %s not drawn: %s", p.title, p.reason)
    title = f"momkd-fed {run.kind} run: {run.run_dir.resolve().name}"
    page = out / "index.html"
    page.write_text(render_page(title, _facts(run), _tables(run), plots, run.config_text, run.dropouts),
                    encoding="utf-8")
    log.info("report: %d plot(s) drawn, %d skipped; wrote %s", sum(p.path is not None for p in plots),
             sum(p.path is None for p in plots), page)
    return page
