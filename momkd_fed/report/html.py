"""One self-contained HTML page: inline CSS, plots as base64 PNG data URIs, no scripts, no external assets."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone

from .comparison import Stat, ordered_wheres
from .plots import Plot

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; } pre { background: #f7f7f7; padding: 0.8em; overflow: auto; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _e(v)
    if isinstance(v, int):
        return str(v)
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def auc_table(cols: dict[str, dict[str, Stat]], table_id: str = "auc-table", corner: str = "test AUC") -> str:
    """The test-AUC table: rows = pooled and sites, columns = the federated model and each baseline."""
    wheres = ordered_wheres(cols)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for w in wheres:
        cells = "".join(f'<td class="num">{_e(cols[c][w].text()) if w in cols[c] else "—"}</td>' for c in cols)
        rows.append(f"<tr><th>{_e(w)}</th>{cells}</tr>")
    return f'<table id="{_e(table_id)}"><tr><th>{_e(corner)}</th>{head}</tr>{"".join(rows)}</table>'


def metrics_table(test_metrics: dict[str, dict]) -> str:
    """Train runs: test metrics (rows) per head (columns: classifier, memory)."""
    heads = list(test_metrics)
    keys = list(dict.fromkeys(k for h in heads for k, v in test_metrics[h].items() if not isinstance(v, (dict, list))))
    keys.sort(key=lambda k: (k != "auc",))  # AUC first
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    rows = "".join(
        f"<tr><th>{_e(k)}</th>"
        + "".join(f'<td class="num">{_num(test_metrics[h].get(k, "—"))}</td>' for h in heads)
        + "</tr>"
        for k in keys
    )
    return f'<table id="auc-table"><tr><th>test metric</th>{head}</tr>{rows}</table>'


def facts_table(facts: dict[str, object]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_num(v)}</td></tr>" for k, v in facts.items())
    return f'<table id="run-facts">{rows}</table>'


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    caption = f" {_e(plot.caption)}" if plot.caption else ""
    return (f'<figure id="fig-{_e(plot.name)}"><img src="data:image/png;base64,{data}" alt="{_e(plot.title)}" '
            f'data-file="{_e(plot.path.name)}"><figcaption>{_e(plot.title)}.{caption}</figcaption></figure>')


def dropouts_table(dropouts: list[dict]) -> str:
    rows = "".join(f"<tr><td>{_e(d['round'])}</td><td>{_e(d['site'])}</td><td>{_e(d['phase'])}</td>"
                   f"<td>{_e(d['reason'])}</td></tr>" for d in dropouts)
    return f'<table id="dropouts"><tr><th>round</th><th>site</th><th>phase</th><th>reason</th></tr>{rows}</table>'


def render_page(title: str, facts: dict[str, object], table_html: str, plots: list[Plot], config_text: str,
                dropouts: list[dict] = ()) -> str:
    """The whole page as a string (UTF-8), every plot embedded; skipped plots are listed with their reason."""
    drawn = [p for p in plots if p.path is not None]
    skipped = [p for p in plots if p.path is None]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Generated {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} by momkd-fed report.</p>',
        "<h2>Summary</h2>",
        facts_table(facts),
        table_html or '<p class="note">No test metrics recorded in this run folder.</p>',
        "<h2>Plots</h2>",
        *(_figure(p) for p in drawn),
    ]
    if dropouts:
        parts += ["<h2>Dropouts</h2>", dropouts_table(list(dropouts))]
    if skipped:
        items = "".join(f"<li><b>{_e(p.title)}</b>: {_e(p.reason)}</li>" for p in skipped)
        parts.append(f'<h2>Not drawn</h2><ul id="skipped">{items}</ul>')
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{_e(config_text)}</pre>" if config_text else '<p class="note">No config.yaml in the run '
                 "folder.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
