"""Plain-text tables for the terminal: run summaries and layer listings."""
from __future__ import annotations

import json
from typing import Any, Iterable

from kdray.core.cache_probes import probe_l2
from kdray.core.methods import describe_methods
from kdray.core.probes import AUTO, describe_l2


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4f}"
    return "-" if v is None else str(v)


def summary_table(s: Any) -> str:
    """The summary of one run (a :class:`kdray.experiment.run.RunSummary`)."""
    rows = [["student test acc", fmt(s.test_acc)], ["student best val acc", fmt(s.best_val_acc)],
            ["student final val acc", fmt(s.final_val_acc)], ["student params", s.student_params],
            ["epochs", f"{s.epochs}{' (stopped early)' if s.stopped_early else ''}"]]
    if s.teacher:
        rows += [["teacher test acc", fmt(s.teacher.get("teacher_test_acc"))],
                 ["teacher params", fmt(s.teacher.get("teacher_params"))],
                 ["teacher source", s.teacher.get("source", "-")],
                 ["test agreement with teacher", fmt(s.test_teacher_agreement)]]
    for p in s.probes:
        l2 = f" (l2 {describe_l2(p['l2'])})" if p.get("l2") is not None else ""
        rows.append([f"probe val acc [{p['layer']}]", fmt(p["val_acc"]) + l2])
    last = s.history[-1] if s.history else {}
    rows += [[f"last epoch {k}", fmt(v)] for k, v in last.items() if k.startswith("loss")]
    for variant, m in getattr(s, "export", {}).items():
        rows.append([f"{variant} student", f"test acc {fmt(m['test_acc'])}, {m['size_bytes']} bytes, "
                                           f"{m['latency_ms']:.3f} ms/batch, {100 * m['sparsity']:.0f}% zeros"])
    rows += [["seconds", f"{s.seconds:.1f}"], ["saved to", s.output_dir or "-"]]
    return table(rows, [s.name, "value"])


def layers_table(infos: Iterable[Any], probe_acc: dict[str, float] | None = None) -> str:
    """Module paths with output shapes; with ``probe_acc`` (teacher path -> probe validation accuracy) a
    column saying how well a probe on that layer does the task."""
    rows = [[i.model, i.path, i.type, "x".join(map(str, i.shape)) if i.shape else "-", i.params] for i in infos]
    head = ["model", "path", "type", "output shape", "params"]
    if probe_acc is not None:
        rows = [r + [fmt(probe_acc[r[1]]) if r[0] == "teacher" and r[1] in probe_acc else "-"] for r in rows]
        head.append("probe val acc")
    return table(rows, head)


def probe_layers_table(found: Any) -> str:
    """A probe per teacher layer in depth order (:class:`kdray.experiment.run.ProbeLayers`): its dimension,
    accuracies and L2 strength (cross-validated for ``l2: auto``), the teacher's own validation accuracy beside each,
    and the best layer marked."""
    best = found.best["layer"] if found.best else None
    teacher = fmt(found.teacher_val_acc) if found.teacher_val_acc is not None else "-"
    rows = [[i, p["layer"], p["dim"], fmt(p["train_acc"]), fmt(p["val_acc"]), describe_l2(probe_l2(p)), teacher,
             "best" if p["layer"] == best else ""] for i, p in enumerate(found.probes)]
    auto = any(p["l2"] == AUTO for p in found.probes)
    head = ["depth", "teacher layer", "dim", "probe train acc", f"probe val acc ({found.pooling})",
            "l2 (cross-validated)" if auto else "l2", "teacher's own val acc", ""]
    return table(rows, head)



METHOD_COLUMNS = ["method", "kind", "reads", "layers", "reference weight", "T", "paper", "notes"]


def methods_text(format: str) -> str:
    """The registered methods as a terminal table, a Markdown table (the README's) or JSON, from the classes'
    metadata (:func:`kdray.core.methods.describe_methods`)."""
    rows = describe_methods()
    if format == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)
    md = format == "markdown"
    cells = [[f"`{r['method']}`" if md else r["method"], r["kind"], r["reads"], r["layers"], f"{r['weight']:g}",
              "yes" if r["temperature"] else "—",
              f"[{r['paper']}]({r['url']})" if md and r["url"] else r["paper"], r["notes"]] for r in rows]
    if md:
        lines = [METHOD_COLUMNS, ["---"] * len(METHOD_COLUMNS), *cells]
        return "\n".join("| " + " | ".join(c) + " |" for c in lines)
    return table([c[:-1] for c in cells], METHOD_COLUMNS[:-1])  # the notes are the markdown's and the JSON's


def render(df, format: str, hide: tuple[str, ...] = ()) -> str:
    """A DataFrame as a terminal table, CSV or JSON records."""
    if format == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if format == "json":
        return df.to_json(orient="records")
    cols = [c for c in df.columns if c not in hide]
    return table([[fmt(v) for v in r] for r in df[cols].itertuples(index=False)], cols)
