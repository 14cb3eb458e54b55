"""The end of a tracked search: its best students registered (:mod:`kdray.tracking.registered_models`), then on
the parent run the trials table (Parquet and CSV), the plots (:mod:`kdray.report.plots`), counts by status,
the best trial and the hard-label baseline; the parent run ends. An interrupted search only ends its parent
as KILLED: ``--resume`` continues it."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from kdray.errors import KdrayError
from kdray.redact import mask
from kdray.report.plots import search_plots
from kdray.tracking.client import error_line
from kdray.tracking.parent_run import SearchStore
from kdray.tracking.registered_models import register_trials

log = logging.getLogger("kdray")


def finish_search(tracker: Any, trials: dict, table: pd.DataFrame, *, register_top: int,
                  registered_model: str, input_example: Any, baseline: Optional[dict] = None,
                  expected_trials: int = 0, register_pareto: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """:meth:`kdray.tracking.search_runs.SearchTracker.finish`: register, log the summary, end the parent."""
    unfinished = max(len(tracker.trials.unfinished), expected_trials - len(table))
    if unfinished > 0:
        tracker.end("KILLED", f"interrupted with {unfinished} trial(s) unfinished; continue it with --resume")
        return table, []
    registrations: list[dict] = []
    error: Optional[BaseException] = None
    candidates, top = registration_candidates(table, register_top, register_pareto)
    if top > 0:
        try:
            registrations = register_trials(tracker, trials, candidates, top,
                                            registered_model, input_example)
        except Exception as e:  # noqa: BLE001 - reported below, after the summary is logged
            error = e
    table = with_versions(table, registrations)
    log_summary(tracker.store, tracker.children, table, baseline, registrations)
    if error is not None:
        tracker.end("FAILED", f"registering the best students failed: {error_line(error)}")
        raise KdrayError(f"the search finished, but registering its best students in {mask(tracker.uri)} failed "
                         f"(no model version was left behind): {error_line(error)}") from error
    tracker.end("FINISHED")
    return table, registrations


def registration_candidates(table: pd.DataFrame, register_top: int, register_pareto: bool) -> tuple[pd.DataFrame, int]:
    """(the trials to register from, how many): a multi-objective search registers from its Pareto front, the K
    best of it by the first objective (``--register-top K``) or all of it (``--register-pareto``)."""
    if "pareto" not in table:
        return table, register_top
    front = table[table["pareto"]]
    return front, len(front) if register_pareto else register_top


def with_versions(table: pd.DataFrame, registrations: list[dict]) -> pd.DataFrame:
    """The trials table with a ``model_version`` column when students were registered."""
    if not registrations:
        return table
    versions = {r["trial_id"]: str(r["version"]) for r in registrations}
    table = table.copy()
    table["model_version"] = [versions.get(t) for t in table["trial_id"]]
    return table


def log_summary(store: SearchStore, children: dict[str, str], table: pd.DataFrame, baseline: Optional[dict],
                registrations: list[dict]) -> None:
    """The summary on the parent run: table and plots as artifacts, counts, best trial, baseline metrics."""
    c, rid = store.client, store.parent_run_id
    with tempfile.TemporaryDirectory() as d:
        write_artifacts(store.space, table, Path(d))
        c.log_artifacts(rid, d)
    metrics, best = summary_metrics(store.space, table, baseline)
    c.log_batch(rid, metrics=metrics)
    if best is not None:
        c.set_tag(rid, "kdray.best_trial_id", str(best))
        if best in children:
            c.set_tag(rid, "kdray.best_run_id", children[best])
    if registrations:
        first = registrations[0]
        c.set_tag(rid, "kdray.registered_model", f"{first['name']}/{first['version']}")


def write_artifacts(space: Any, table: pd.DataFrame, folder: Path) -> None:
    """``results/trials.parquet``, ``results/trials.csv`` and ``plots/`` (plots are a nicety: a failure is logged)."""
    res = folder / "results"
    res.mkdir()
    table.to_parquet(res / "trials.parquet")
    table.to_csv(res / "trials.csv", index=False)
    try:
        search_plots(table, space.metric, space.mode, folder / "plots", [(o.metric, o.mode) for o in space.objectives])
    except Exception as e:  # noqa: BLE001 - plots are a nicety; never lose the table for them
        log.warning("search plots failed: %s", error_line(e))


def summary_metrics(space: Any, table: pd.DataFrame, baseline: Optional[dict]) -> tuple[list, Optional[str]]:
    """(MLflow metrics ``trials_<status>``, ``best_<metric>``, ``best_test_acc``, ``baseline_<key>``; the best
    finished trial's id, or None)."""
    from mlflow.entities import Metric

    metric, now = space.metric, int(time.time() * 1000)
    metrics = [Metric(f"trials_{s}", float((table["status"] == s).sum()) if not table.empty else 0.0, now, 0)
               for s in ("finished", "pruned", "failed", "killed")]
    fin = table[table["status"] == "finished"] if not table.empty else table
    best_id = None
    if not fin.empty and fin[metric].notna().any():
        best = fin.loc[fin[metric].idxmax() if space.mode == "max" else fin[metric].idxmin()]
        best_id = best["trial_id"]
        metrics.append(Metric(f"best_{metric}", float(best[metric]), now, 0))
        if pd.notna(best.get("test_acc")):
            metrics.append(Metric("best_test_acc", float(best["test_acc"]), now, 0))
    for k, v in (baseline or {}).items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            metrics.append(Metric(f"baseline_{k}", float(v), now, 0))
    return metrics, best_id
