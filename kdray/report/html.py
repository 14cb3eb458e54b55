"""``kdray report``: one self-contained HTML file about a search, for people without the MLflow UI at hand.

It holds the counts by status, the best trial, the top trials, every trial, and the plots of
:mod:`kdray.report.plots` (PNG embedded as base64; the interactive parallel-coordinates view inlined with its
JavaScript when plotly is installed). Nothing is fetched when the file is opened.
"""
from __future__ import annotations

import base64
import html
import tempfile
import time
from pathlib import Path

import pandas as pd

from kdray import __version__
from kdray.report.plots import search_plots

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}h1{margin-bottom:0}
.muted{color:#777}img{max-width:100%;border:1px solid #eee;margin:8px 0}.status-pruned{color:#b36b00}
.status-failed{color:#c00}.status-killed{color:#777}iframe{width:100%;height:620px;border:1px solid #eee}"""


def _table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for r in df.itertuples(index=False):
        status = getattr(r, "status", "")
        rows.append(f'<tr class="status-{html.escape(str(status))}">' + "".join(f"<td>{cell(v)}</td>" for v in r)
                    + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render(df: pd.DataFrame, name: str, metric: str = "val_acc", mode: str = "max") -> str:
    """The report of a search's trials table as one HTML document."""
    shown = df.drop(columns=[c for c in ("path",) if c in df.columns])
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    fin = df[df["status"] == "finished"] if "status" in df else df
    best = fin.sort_values(metric, ascending=mode == "min").head(1)
    parts = [f"<h1>kdray search {html.escape(name)}</h1>",
             f'<p class="muted">{len(df)} trials: ' + ", ".join(f"{n} {s}" for s, n in counts.items())
             + f" &middot; written {time.strftime('%Y-%m-%d %H:%M')} by kdray {__version__}</p>"]
    if not best.empty:
        b = best.iloc[0]
        test = f", test_acc {b['test_acc']:.4f}" if "test_acc" in b and pd.notna(b["test_acc"]) else ""
        parts.append(f"<h2>Best trial</h2><p>{html.escape(str(b['trial_id']))}: {metric} {b[metric]:.4f}{test}</p>")
        parts.append(_table(best.drop(columns=[c for c in ("path", "error") if c in best.columns])))
    with tempfile.TemporaryDirectory() as d:
        files = search_plots(df, metric, mode, d) if not df.empty else []
        parts.append("<h2>Plots</h2>")
        for f in files:
            if f.suffix == ".png":
                data = base64.b64encode(f.read_bytes()).decode()
                parts.append(f'<h3>{html.escape(f.stem.replace("_", " "))}</h3><img alt="{f.stem}" '
                             f'src="data:image/png;base64,{data}">')
            elif f.suffix == ".html":  # plotly's page with its JavaScript inlined, in a sandboxed frame
                parts.append("<h3>parallel coordinates (interactive)</h3><iframe sandbox=\"allow-scripts\" srcdoc=\""
                             + html.escape(f.read_text()) + '"></iframe>')
    parts.append(f"<h2>All trials</h2>{_table(shown)}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kdray {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(df: pd.DataFrame, name: str, out: str | Path, metric: str = "val_acc", mode: str = "max") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(df, name, metric, mode), encoding="utf-8")
    return out
