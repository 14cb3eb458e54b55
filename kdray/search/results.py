"""The trials table of a search: built from the trials' results, saved as ``results.parquet`` beside them, read
back by ``kdray results`` and ``kdray report`` (without importing Ray or Optuna), and shown in the terminal."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pandas as pd

from kdray.errors import ConfigError, first_line
from kdray.experiment.space import SearchSpace, _scalar, dimensions
from kdray.experiment.status import trial_status
from kdray.paths import is_remote
from kdray.report.tables import fmt, table

RESULTS_FILE = "results.parquet"


def default_storage() -> str:
    return str(Path("kdray_results").resolve())


def results_frame(result_grid, space: SearchSpace) -> pd.DataFrame:
    """One row per trial: status, the searched values, final and best metrics, epochs, error."""
    rows = []
    dims = dimensions(space)
    for r in result_grid:
        last = dict(r.metrics or {})
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        cfg = r.config or {}
        epochs = int(last.get("epoch", 0) or 0)
        max_epochs = int(last.get("max_epochs", 0) or 0)
        row = {"trial_id": last.get("trial_id") or Path(r.path).name, "status": trial_status(last, r.error is not None),
               **{f"param.{k}": _scalar(cfg.get(k)) for k in dims},
               "epochs": epochs, "max_epochs": max_epochs,
               space.metric: last.get(space.metric),
               f"best_{space.metric}": (hist[space.metric].max() if space.mode == "max" else hist[space.metric].min())
               if space.metric in hist else None,
               "test_acc": last.get("test_acc"), "teacher_agreement": last.get("teacher_agreement"),
               "probe_val_acc": last.get("probe_val_acc"),
               **({"teacher_test_acc": last["teacher_test_acc"]} if "teacher_test_acc" in last else {}),  # ensembles
               **{o.metric: last.get(o.metric) for o in space.objectives if o.metric != space.metric},
               "epoch_time_s": hist["epoch_time_s"].mean() if "epoch_time_s" in hist else None,
               "error": str(r.error).strip().splitlines()[-1][:300] if r.error is not None else None,
               "path": r.path}
        rows.append(row)
    df = pd.DataFrame(rows)
    if space.objectives and not df.empty:
        df["pareto"] = pareto_mask(df, space.metrics, space.modes)
    if not df.empty:
        df = df.sort_values(space.metric, ascending=space.mode == "min", na_position="last").reset_index(drop=True)
    return df


def pareto_mask(df: pd.DataFrame, metrics: list[str], modes: list[str]) -> list[bool]:
    """True for finished trials no other finished trial beats on every objective (and strictly on one)."""
    fin = (df["status"] == "finished") & df[metrics].notna().all(axis=1)
    signs = [1.0 if m == "max" else -1.0 for m in modes]  # compare as "higher is better"
    pts = {i: [s * float(df.at[i, c]) for s, c in zip(signs, metrics)] for i in df.index[fin]}
    front = {i for i, p in pts.items()
             if not any(all(q[k] >= p[k] for k in range(len(p))) and q != p for j, q in pts.items() if j != i)}
    return [i in front for i in df.index]


def write_results(df: pd.DataFrame, path: str) -> None:
    """Save the table as Parquet (a local file is written whole or not at all, with a CSV copy beside it), on
    local storage or a storage URI."""
    if is_remote(path):
        df.to_parquet(path)
        return
    local = Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(".tmp")
    df.to_parquet(tmp)
    os.replace(tmp, local)
    df.to_csv(local.with_suffix(".csv"), index=False)


def read_results(experiment: str, storage_path: Optional[str] = None) -> pd.DataFrame:
    """The results table of a finished search, by experiment folder or by name under the storage path; a file
    that is not such a table is refused naming it."""
    path = results_path(experiment, storage_path)
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ConfigError("EXPERIMENT", str(path), f"a readable {RESULTS_FILE} written by kdray search (reading it "
                                                   f"failed: {first_line(e)})") from None
    missing = [c for c in ("trial_id", "status") if c not in df.columns]
    if missing:
        raise ConfigError("EXPERIMENT", str(path), f"a {RESULTS_FILE} written by kdray search (it lacks the columns "
                                                   f"{', '.join(missing)})")
    return df


def results_path(experiment: str, storage_path: Optional[str] = None) -> Path:
    p = Path(experiment)
    candidates = [p / RESULTS_FILE, p, Path(storage_path or default_storage()) / experiment / RESULTS_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError("EXPERIMENT", experiment, f"a search folder holding {RESULTS_FILE} or a search name under "
                                                f"{storage_path or default_storage()}")


def top_table(df: pd.DataFrame, metric: str, n: int = 10) -> str:

    cols = ["trial_id", "status", *[c for c in df.columns if c.startswith("param.")], metric, f"best_{metric}",
            "test_acc", "epochs", "model_version"]
    cols = [c for c in cols if c in df.columns]
    rows = [[fmt(v) for v in r] for r in df[cols].head(n).itertuples(index=False)]
    return table(rows, [c.removeprefix("param.") for c in cols])


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    return {k: int(v) for k, v in df["status"].value_counts().items()} if not df.empty else {}
