"""Plots of a search's trials table (the :func:`kdray.search.driver.results_frame` DataFrame), and of born-again
generations.

Pure functions: a DataFrame in, one file out (PNG with matplotlib's object API, no pyplot global state;
interactive HTML with plotly when it is installed). Searched dimensions are the ``param.*`` columns;
``status`` tells finished trials from pruned, failed and killed ones. Used for the summary artifacts
of a tracked search and reusable by a report command.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from kdray.core.cache_probes import probe_l2

STATUS_COLORS = {"finished": "tab:blue", "pruned": "tab:orange", "failed": "tab:red", "killed": "tab:gray"}


def param_columns(df: pd.DataFrame) -> list[str]:
    """The searched dimensions that took at least one value."""
    return [c for c in df.columns if c.startswith("param.") and df[c].notna().any()]


def chronological(df: pd.DataFrame) -> pd.DataFrame:
    """Trials in the order Tune created them (the counter in their folder names)."""
    if df.empty or "trial_id" not in df:
        return df.reset_index(drop=True)

    def index(i: int) -> float:  # Tune's trial folders are named <trainable>_<trial id>_<counter>_<values>...
        tid = str(df["trial_id"].iloc[i])
        name = Path(str(df["path"].iloc[i])).name if "path" in df and pd.notna(df["path"].iloc[i]) else ""
        m = re.search(rf"_{re.escape(tid)}_(\d+)(?:_|$)", name) or re.search(r"_(\d+)$", tid)
        return float(m.group(1)) if m else math.inf

    order = sorted(range(len(df)), key=lambda i: (index(i), i))
    return df.iloc[order].reset_index(drop=True)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _is_numeric(s: pd.Series) -> bool:
    v = s.dropna()
    return len(v) > 0 and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                              for x in v)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def best_over_trials(df: pd.DataFrame, metric: str, mode: str, path: str | Path) -> Path:
    """Each trial's metric (by status) and the running best, against the trial index."""
    d = chronological(df)
    fig = _figure(7, 4)
    ax = fig.subplots()
    values = pd.to_numeric(d.get(metric, pd.Series(dtype=float)), errors="coerce")
    x = np.arange(1, len(d) + 1)
    for status, color in STATUS_COLORS.items():
        sel = (d.get("status") == status).to_numpy() if "status" in d else np.ones(len(d), bool)
        if sel.any():
            ax.scatter(x[sel], values[sel], color=color, label=status, s=25, zorder=3)
    finished = values.where(d["status"] == "finished") if "status" in d else values
    best = finished.cummax() if mode == "max" else finished.cummin()
    if best.notna().any():
        ax.step(x, best.ffill(), where="post", color="black", label=f"best finished {metric}", zorder=2)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over trials")
    if len(d):
        ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def metric_by_params(df: pd.DataFrame, metric: str, path: str | Path, params: Optional[list[str]] = None) -> Path:
    """One panel per searched dimension (method, probe layer, temperature ...): the metric of every trial
    against that dimension's value; categorical dimensions as jittered strips, numeric ones as scatter."""
    params = params if params is not None else param_columns(df)
    n = max(len(params), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    values = pd.to_numeric(df.get(metric, pd.Series(dtype=float)), errors="coerce")
    rng = np.random.default_rng(0)
    for ax, p in zip(axes, params):
        col = df[p]
        has = col.notna()
        if _is_numeric(col):
            xs = col[has].astype(float)
            for status, color in STATUS_COLORS.items():
                sel = has & (df["status"] == status)
                if sel.any():
                    ax.scatter(col[sel].astype(float), values[sel], color=color, s=22, label=status)
            if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in col[has]})
            pos = {c: i for i, c in enumerate(cats)}
            for status, color in STATUS_COLORS.items():
                sel = has & (df["status"] == status)
                if sel.any():
                    xs = np.array([pos[str(v)] for v in col[sel]], float) + rng.uniform(-0.15, 0.15, int(sel.sum()))
                    ax.scatter(xs, values[sel], color=color, s=22, label=status)
            ax.set_xticks(range(len(cats)), [c if len(c) <= 18 else c[:17] + "…" for c in cats],
                          rotation=20 if len(cats) > 3 else 0, fontsize="small")
        ax.set_title(p.removeprefix("param."), fontsize="medium")
        ax.set_ylabel(metric)
    for ax in axes[len(params):]:
        ax.set_axis_off()
    if not params:
        axes[0].text(0.5, 0.5, "no searched dimensions", ha="center", va="center")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
    return _save(fig, path)


def _encoded(df: pd.DataFrame, dims: list[str]) -> list[tuple[str, np.ndarray, Optional[list[str]], bool]]:
    """(name, values in plot units, category labels or None, log scale) per dimension; missing -> NaN."""
    out = []
    for c in dims:
        col = df[c]
        if _is_numeric(col):
            v = pd.to_numeric(col, errors="coerce").to_numpy(float)
            fin = v[np.isfinite(v)]
            log = bool(len(fin) and fin.min() > 0 and fin.max() / fin.min() >= 20)
            out.append((c, np.log10(v) if log else v, None, log))
        else:
            cats = sorted({str(x) for x in col.dropna()})
            pos = {k: i for i, k in enumerate(cats)}
            out.append((c, np.array([pos[str(x)] if pd.notna(x) else np.nan for x in col], float), cats, False))
    return out


def parallel_coordinates_png(df: pd.DataFrame, metric: str, path: str | Path,
                             params: Optional[list[str]] = None) -> Path:
    """Every trial as a line through its searched values and the metric, colored by the metric."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    dims = [*(params if params is not None else param_columns(df)), metric]
    dims = [d for d in dims if d in df.columns]
    enc = _encoded(df, dims)
    fig = _figure(max(6.0, 1.8 * len(dims)), 4.5)
    ax = fig.subplots()
    values = pd.to_numeric(df.get(metric, pd.Series(dtype=float)), errors="coerce").to_numpy(float)
    fin = values[np.isfinite(values)]
    norm = Normalize(fin.min() if len(fin) else 0, fin.max() if len(fin) and fin.max() > fin.min() else
                     (fin.min() + 1 if len(fin) else 1))
    cmap = colormaps["viridis"]
    scaled = []
    for name, v, cats, _ in enc:
        f = v[np.isfinite(v)]
        lo, hi = (f.min(), f.max()) if len(f) else (0.0, 1.0)
        scaled.append((v - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(v), 0.5, np.nan))
    xs = np.arange(len(enc))
    for i in range(len(df)):
        ys = np.array([s[i] for s in scaled])
        color = cmap(norm(values[i])) if np.isfinite(values[i]) else "lightgray"
        style = "-" if "status" not in df or df["status"].iloc[i] == "finished" else "--"
        ax.plot(xs[np.isfinite(ys)], ys[np.isfinite(ys)], style, color=color, alpha=0.8, marker="o", ms=3)
    for k, (name, v, cats, log) in enumerate(enc):
        ax.axvline(k, color="black", lw=0.8)
        f = v[np.isfinite(v)]
        if cats:
            for j, c in enumerate(cats):
                y = j / (len(cats) - 1) if len(cats) > 1 else 0.5
                ax.text(k + 0.03, y, c[:16], fontsize="x-small", va="center")
        elif len(f):
            lo, hi = f.min(), f.max()
            fmt = (lambda t: f"{10 ** t:.3g}") if log else (lambda t: f"{t:.3g}")
            ax.text(k + 0.03, 0, fmt(lo), fontsize="x-small", va="bottom")
            ax.text(k + 0.03, 1, fmt(hi), fontsize="x-small", va="top")
    ax.set_xticks(xs, [n.removeprefix("param.") for n, *_ in enc], rotation=15, fontsize="small")
    ax.set_yticks([])
    ax.set_xlim(-0.2, max(len(enc) - 0.6, 0.8))
    ax.set_title(f"searched dimensions and {metric} (dashed: not finished)")
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    return _save(fig, path)


def parallel_coordinates_html(df: pd.DataFrame, metric: str, path: str | Path,
                              params: Optional[list[str]] = None) -> Optional[Path]:
    """Interactive parallel coordinates (plotly, self-contained HTML); None when plotly is missing."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    dims = [*(params if params is not None else param_columns(df)), metric]
    dims = [d for d in dims if d in df.columns]
    pdims = []
    for name, v, cats, log in _encoded(df, dims):
        label = name.removeprefix("param.") + (" (log10)" if log else "")
        filled = np.where(np.isfinite(v), v, np.nan)
        d: dict[str, Any] = {"label": label, "values": filled.tolist()}
        if cats:
            d.update(tickvals=list(range(len(cats))), ticktext=cats)
        pdims.append(d)
    values = pd.to_numeric(df.get(metric, pd.Series(dtype=float)), errors="coerce").fillna(np.nan).tolist()
    fig = go.Figure(go.Parcoords(line={"color": values, "colorscale": "Viridis", "showscale": True},
                                 dimensions=pdims))
    fig.update_layout(title=f"searched dimensions and {metric} ({len(df)} trials)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def pareto_front(df: pd.DataFrame, metrics: list[str], modes: list[str], path: str | Path) -> Path:
    """The first two objectives of every finished trial, the Pareto-optimal ones joined by a line."""
    (mx, my), fin = metrics[:2], df[df["status"] == "finished"] if "status" in df else df
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    x, y = pd.to_numeric(fin[my], errors="coerce"), pd.to_numeric(fin[mx], errors="coerce")
    on = fin["pareto"].fillna(False).astype(bool) if "pareto" in fin else pd.Series(False, index=fin.index)
    ax.scatter(x[~on], y[~on], color="tab:gray", s=25, label="finished", zorder=2)
    front = fin[on].sort_values(my)
    ax.plot(pd.to_numeric(front[my]), pd.to_numeric(front[mx]), "o-", color="tab:red", label="Pareto front", zorder=3)
    for _, r in front.iterrows():
        ax.annotate(str(r.get("trial_id", "")), (float(r[my]), float(r[mx])), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{my} ({modes[1]})")
    ax.set_ylabel(f"{mx} ({modes[0]})")
    if pd.to_numeric(fin[my], errors="coerce").gt(0).all() and my.endswith(("params", "bytes")):
        ax.set_xscale("log")
    ax.set_title(f"{mx} vs {my}: {int(on.sum())} Pareto-optimal of {len(fin)} finished trials")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def generations_plot(test_accs: list[float], path: str | Path) -> Path:
    """Born-again generations: test accuracy by generation (0 = taught by the original teacher)."""
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot()
    gens = list(range(len(test_accs)))
    ax.plot(gens, test_accs, marker="o", color="tab:blue")
    for g, a in zip(gens, test_accs):
        ax.annotate(f"{a:.3f}", (g, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(gens)
    ax.set_xlabel("generation (each taught by the one before; 0 by the teacher)")
    ax.set_ylabel("student test accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_labels(layers: list[str]) -> tuple[list[str], str]:
    """Layer names without the dotted prefix they all share (``model.model.layers.7`` -> ``7``), and that prefix."""
    parts = [layer.split(".") for layer in layers]
    shared = 0
    while parts and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    prefix = ".".join(parts[0][:shared]) + "." if shared else ""
    return [".".join(p[shared:]) for p in parts], prefix


def probe_layers_plot(probes: list[dict], teacher_acc: Optional[float], path: str | Path, title: str = "") -> Path:
    """Where the answer lives (:func:`probe_layers_figure`), saved to ``path``."""
    return _save(probe_layers_figure(probes, teacher_acc, title), path)


def probe_layers_figure(probes: list[dict], teacher_acc: Optional[float], title: str = ""):
    """Each probe's validation accuracy by teacher layer, in the order of the teacher's forward (the records'
    ``depth``, else as given), named, with the teacher's own (answer-token) accuracy on the same examples as a
    line."""
    if probes and all("depth" in p for p in probes):
        probes = sorted(probes, key=lambda p: p["depth"])
    fig = _figure(max(5.5, 0.28 * len(probes) + 2), 3.8)
    ax = fig.add_subplot()
    xs = list(range(len(probes)))
    ax.plot(xs, [p["val_acc"] for p in probes], marker="o", color="tab:blue", label="probe val acc")
    if any("train_acc" in p for p in probes):
        ax.plot(xs, [p.get("train_acc", np.nan) for p in probes], marker=".", ls=":", color="tab:gray",
                label="probe train acc")
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="tab:red", ls="--", label=f"teacher's own output ({teacher_acc:.3f})")
    ticks, prefix = layer_labels([p["layer"] for p in probes])
    long = len(xs) > 12 or max((len(t) for t in ticks), default=0) > 6
    ax.set_xticks(xs, ticks, rotation=90 if long else 0, fontsize=7)
    ax.set_xlabel(f"teacher layer{f' ({prefix}*)' if prefix else ''}, in forward order")
    ax.set_ylabel("validation accuracy")
    pooling = "/".join(dict.fromkeys(p["pooling"] for p in probes))
    ax.set_title(title or f"probe accuracy by layer ({pooling} pooling)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    l2 = [probe_l2(p) for p in probes]
    if len({v for v in l2 if v is not None}) > 1:
        right = ax.twinx()
        right.plot(xs, [np.nan if v is None else v for v in l2], ls="none", marker="_", ms=9, mew=2,
                   color="tab:green", alpha=0.6, label="probe l2 (right)")
        right.set_yscale("log")
        right.set_ylabel("probe l2", color="tab:green", fontsize=8)
        right.tick_params(axis="y", labelsize=7, colors="tab:green")
        handles = [a + b for a, b in zip(handles, right.get_legend_handles_labels())]
    ax.legend(*handles, loc="best", fontsize="small")
    return fig


def search_plots(df: pd.DataFrame, metric: str, mode: str, out_dir: str | Path,
                 objectives: Optional[list[tuple[str, str]]] = None) -> list[Path]:
    """All summary plots of a search into ``out_dir`` (with ``objectives`` [(metric, mode), ...] beyond the
    first, also the Pareto front); returns the files written."""
    out = Path(out_dir)
    files = [best_over_trials(df, metric, mode, out / "best_over_trials.png"),
             metric_by_params(df, metric, out / f"{metric}_by_param.png"),
             parallel_coordinates_png(df, metric, out / "parallel_coordinates.png")]
    if objectives and all(m in df for m, _ in objectives):
        files.append(pareto_front(df, [metric] + [m for m, _ in objectives], [mode] + [d for _, d in objectives],
                                  out / "pareto_front.png"))
    html = parallel_coordinates_html(df, metric, out / "parallel_coordinates.html")
    return files + ([html] if html else [])
