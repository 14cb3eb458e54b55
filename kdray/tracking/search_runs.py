"""MLflow tracking of a search: one parent run per search, one child run per trial, written by the driver.

* :func:`resolve_tracking_uri` and :func:`connect` pick the tracking URI (``--tracking-uri``, else
  ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory) and check that it
  answers before anything else starts (a short timeout and no retries for HTTP servers). Credentials in an
  HTTP(S) URI move to the environment (:mod:`kdray.redact`); every URI kdray shows is masked.
* :func:`active_experiment` refuses a deleted experiment (exit 2) before any work;
  :func:`search_tracker` runs both checks for a search.
* :class:`PausedWrites` is the one bounded-pause policy for MLflow writes that must never stop the work they
  record (a search's trials here, ``kdray train --track`` in :mod:`kdray.train_tracking`).
* :class:`SearchTracker` owns the runs. It only calls :class:`mlflow.MlflowClient` with explicit run ids
  (no fluent active-run state), so its writes are safe from the Tune driver's callback thread.
* :class:`MlflowSearchCallback` is a driver-side ``ray.tune.Callback``: it opens a trial's child run when
  the trial starts, logs each epoch's metrics as they arrive (step = epoch), and ends the run with a
  status that tells finished, pruned (ASHA), failed (with the error) and killed apart
  (tag ``kdray.status``; MLflow status FINISHED, FINISHED, FAILED, KILLED).
* At the end :meth:`SearchTracker.finish` registers the best students (:mod:`kdray.tracking.registered_models`),
  logs the trials table and plots (:mod:`kdray.report.plots`) on the parent run and ends it.

On ``--resume`` the parent run id is read back from ``<storage>/<name>/mlflow_parent_run_id`` (or found by
tag) and each trial's child run is found by its ``kdray.trial_id`` tag, so every trial keeps one run.
Workers never talk to MLflow. The plain-PyTorch core (run, train) knows nothing of this module.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from kdray import __version__
from kdray.core.checkpoint import model_checkpoint
from kdray.errors import KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.space import _scalar, trial_raw
from kdray.experiment.status import trial_status
from kdray.models import build_model, count_parameters
from kdray.redact import mask
from kdray.report.plots import search_plots
from kdray.tracking.client import (_KEY_OK, ERROR_TAG, NOT_METRICS, PARENT_ID_FILE, PARENT_TAG, ROLE_TAG, RUN_STATUS,
                                   SEARCH_PATH_TAG, STATUS_TAG, TRIAL_TAG, PausedWrites, _chunks, _first_line,
                                   _local_sqlite_dir, _metrics, _params, _read_text, _write_text, active_experiment,
                                   connect, flatten, git_commit, resolve_tracking_uri)
from kdray.tracking.registered_models import register_trials

log = logging.getLogger("kdray")


# --------------------------------------------------------------------------------------------------
# the tracking URI


# --------------------------------------------------------------------------------------------------
# small helpers


# --------------------------------------------------------------------------------------------------
# writes that never stop the work they record


# --------------------------------------------------------------------------------------------------
# the runs of one search


class SearchTracker:
    """The MLflow runs of one search: the parent, and a child per trial (keyed by Tune trial id)."""
    def __init__(self, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path):
        self.uri, self.experiment = uri, experiment
        self.space, self.base_raw, self.base_dir = space, base_raw, str(base_dir)
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.children: dict[str, str] = {}  # trial id -> child run id
        self.open: set[str] = set()  # trial ids whose child run is RUNNING
        self.logged_epoch: dict[str, int] = {}
        self.statuses: dict[str, str] = {}  # trial id -> kdray status
        self.unfinished: list[str] = []  # trials Tune left neither TERMINATED nor ERROR (interrupted)
        self.num_classes: Optional[int] = None
        self.teacher: str = ""
        self.ended = False
        self._client = None
        self._student_cache: dict[str, tuple[int, int]] = {}
        self.writes = PausedWrites(uri, "the search goes on; trials keep training", "trials")

    @classmethod
    def attach(cls, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path, parent_run_id: str,
               num_classes: int, teacher: str = "") -> "SearchTracker":
        """A tracker for the runs of an earlier search (e.g. to register more of its students)."""
        t = cls(uri, experiment, space, base_raw, base_dir)
        run = t.client.get_run(parent_run_id)
        t.experiment_id, t.parent_run_id, t.num_classes = run.info.experiment_id, parent_run_id, num_classes
        t.teacher = teacher or run.data.tags.get("kdray.teacher", "")
        t.ended = run.info.status != "RUNNING"
        t._load_children()
        return t

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "uri": mask(self.uri)}  # (a database URI keeps its password)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ---- the parent run

    def start(self, exp_path: str, *, resume: bool, settings: dict, space_path: str | Path,
              ray_address: Optional[str], teacher_info: dict, num_classes: int, probes: list[dict] = ()) -> str:
        """Find or create the experiment and the parent run (reused on resume); returns its id.

        ``probes`` (the probes fitted up-front on the candidate layers) go on the parent run as metrics
        ``probe_val_acc.<layer>.<pooling>``."""
        c = self.client
        self.num_classes = num_classes
        self.teacher = self._teacher_label(teacher_info)
        exp = active_experiment(c, self.experiment)
        if exp is None:
            local = _local_sqlite_dir(self.uri)
            try:
                self.experiment_id = c.create_experiment(
                    self.experiment, artifact_location=(local / "mlruns").as_uri() if local else None)
            except Exception:  # noqa: BLE001 - created meanwhile by another search
                exp = c.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        id_file = exp_path.rstrip("/") + "/" + PARENT_ID_FILE
        parent = self._find_parent(id_file, exp_path) if resume else None
        if parent is not None:
            self.parent_run_id = parent
            c.update_run(parent, status="RUNNING")
            resumes = int(c.get_run(parent).data.tags.get("kdray.resumes", "0")) + 1
            c.set_tag(parent, "kdray.resumes", str(resumes))
            c.set_tag(parent, STATUS_TAG, "running")
            self._load_children()
            log.info("MLflow: resuming parent run %s in experiment %r (%s)", parent, self.experiment, mask(self.uri))
        else:
            if resume:
                log.warning("MLflow: no parent run of %s found in %s; starting a new one", mask(exp_path),
                            mask(self.uri))
            self.parent_run_id = self._create_parent(exp_path, settings, space_path, ray_address)
            log.info("MLflow: parent run %s in experiment %r (%s)", self.parent_run_id, self.experiment,
                     mask(self.uri))
        _write_text(id_file, self.parent_run_id + "\n")
        if probes:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            c.log_batch(self.parent_run_id, metrics=[
                Metric(_KEY_OK.sub("_", f"probe_val_acc.{p['layer']}.{p['pooling']}"), float(p["val_acc"]), now, 0)
                for p in probes if math.isfinite(p["val_acc"])])
        return self.parent_run_id

    def _teacher_label(self, info: dict) -> str:
        t = self.base_raw.get("teacher") or {}
        name = (t.get("model") or {}).get("name", "") if isinstance(t, dict) else ""
        return f"{name} ({info.get('source')})" if name and info.get("source") else name or "none"

    def _find_parent(self, id_file: str, exp_path: str) -> Optional[str]:
        text = _read_text(id_file)
        if text and text.strip():
            try:
                run = self.client.get_run(text.strip())
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except Exception:  # noqa: BLE001 - not in this tracking store
                pass
        runs = self.client.search_runs([self.experiment_id], f"tags.{ROLE_TAG} = 'search' and "
                                                             f"tags.`{SEARCH_PATH_TAG}` = '{_quote(mask(exp_path))}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _create_parent(self, exp_path: str, settings: dict, space_path: str | Path, ray_address: Optional[str]) -> str:
        c = self.client
        tags = {ROLE_TAG: "search", SEARCH_PATH_TAG: mask(exp_path), STATUS_TAG: "running",
                "kdray.version": __version__, "kdray.ray_address": mask(ray_address) or "local",
                "kdray.teacher": self.teacher,
                "kdray.space_file": str(Path(space_path).resolve()), "kdray.metric": self.space.metric,
                "kdray.mode": self.space.mode, "mlflow.source.name": "kdray search"}
        commit = git_commit(Path(space_path).resolve().parent) or git_commit(Path.cwd())
        if commit:
            tags["kdray.git_commit"] = tags["mlflow.source.git.commit"] = commit
        run = c.create_run(self.experiment_id, run_name=self.space.name, tags=tags)
        rid = run.info.run_id
        space_raw = self.space.model_dump(mode="json", by_alias=True, exclude={"search"})
        params = {**{f"space.{k}": v for k, v in flatten(space_raw).items()},
                  **{f"search.{k}": v for k, v in flatten(settings).items()},
                  **{f"base.{k}": v for k, v in flatten(self.base_raw).items()}}
        for chunk in _chunks(_params(params), 100):
            c.log_batch(rid, params=chunk)
        try:
            space_text = Path(space_path).read_text()
        except OSError:
            space_text = yaml.safe_dump(self.space.model_dump(mode="json", by_alias=True), sort_keys=False)
        c.log_text(rid, space_text, "config/space.yaml")
        c.log_text(rid, yaml.safe_dump(self.base_raw, sort_keys=False), "config/base.yaml")
        c.log_text(rid, yaml.safe_dump(settings, sort_keys=False), "config/search_settings.yaml")
        return rid

    def _load_children(self) -> None:
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            for r in page:
                tid = r.data.tags.get(TRIAL_TAG)
                if tid:
                    self.children.setdefault(tid, r.info.run_id)
            token = page.token
            if not token:
                break

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the parent run (and any child still open) — FINISHED, FAILED or KILLED."""
        kdray_status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}[status]
        for tid in list(self.open):
            self._end_child(tid, kdray_status, f"the search ended before this trial did: {error}" if error else None)
        if self.parent_run_id is None or self.ended:
            return
        c = self.client
        c.set_tag(self.parent_run_id, STATUS_TAG, kdray_status)
        if error:
            c.set_tag(self.parent_run_id, ERROR_TAG, error[:5000])
        c.set_terminated(self.parent_run_id, status)
        self.ended = True

    def close_after_error(self, e: BaseException) -> None:
        """The search raised or was interrupted: end every open run (KILLED for an interruption, else FAILED)."""
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.end(status, f"{type(e).__name__}: {_first_line(e)}")
        except Exception as e2:  # noqa: BLE001 - never hide the original error
            log.warning("could not end the MLflow runs of the search: %s", _first_line(e2))

    # ---- child runs (called from the Tune callback, on the driver)

    def _child_for(self, trial_id: str) -> Optional[str]:
        if trial_id not in self.children:
            runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and "
                                                                 f"tags.`{TRIAL_TAG}` = '{_quote(trial_id)}'",
                                           max_results=1)
            if runs:
                self.children[trial_id] = runs[0].info.run_id
        return self.children.get(trial_id)

    def trial_started(self, trial_id: str, config: dict) -> str:
        c = self.client
        run_id = self._child_for(trial_id)
        if run_id is not None:  # a retried or resumed trial keeps its run
            c.update_run(run_id, status="RUNNING")
            c.set_tag(run_id, STATUS_TAG, "running")
            with contextlib.suppress(Exception):
                c.delete_tag(run_id, ERROR_TAG)
            if trial_id not in self.logged_epoch:
                hist = c.get_metric_history(run_id, self.space.metric)
                self.logged_epoch[trial_id] = max((m.step for m in hist), default=0)
        else:

            values = {k: _scalar(v) for k, v in (config or {}).items()}
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, STATUS_TAG: "running",
                    ROLE_TAG: "trial", "kdray.search": self.space.name, "kdray.teacher": self.teacher}
            if "method" in values:
                tags["kdray.method"] = str(values["method"])
            run_id = c.create_run(self.experiment_id, run_name=trial_id, tags=tags).info.run_id
            self.children[trial_id] = run_id
            self.logged_epoch[trial_id] = 0
            params = _params(values)
            for chunk in _chunks(params, 100):
                c.log_batch(run_id, params=chunk)
            size = self.student_size(config or {})
            if size is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                c.log_batch(run_id, metrics=[Metric("student_params", size[0], now, 0),
                                             Metric("student_size_bytes", size[1], now, 0)])
        self.open.add(trial_id)
        return run_id

    def student_size(self, values: dict) -> Optional[tuple[int, int]]:
        """(parameter count, bytes of its kdray model file) of the student of a trial's (Tune) config."""
        if self.num_classes is None:
            return None
        try:
            import torch


            cfg = parse_config(trial_raw(self.space, self.base_raw, values), self.base_dir)
            key = json.dumps(cfg.student.model_dump(mode="json"), sort_keys=True)
            if key not in self._student_cache:
                model = build_model(cfg.student, self.num_classes)
                buf = io.BytesIO()
                torch.save(model_checkpoint(model, cfg.student, self.num_classes), buf)
                self._student_cache[key] = (count_parameters(model), len(buf.getvalue()))
            return self._student_cache[key]
        except Exception as e:  # noqa: BLE001 - informative only
            log.debug("student size of %s: %s", values, e)
            return None

    def trial_result(self, trial_id: str, result: dict) -> None:
        run_id = self.children.get(trial_id) or self.trial_started(trial_id, result.get("config") or {})
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        if epoch and epoch <= self.logged_epoch.get(trial_id, 0):
            return  # already logged (a trial restored from an earlier checkpoint)
        for chunk in _chunks(_metrics(result, epoch, skip=NOT_METRICS), 1000):
            self.client.log_batch(run_id, metrics=chunk)
        self.logged_epoch[trial_id] = epoch

    def trial_completed(self, trial_id: str, last: Optional[dict]) -> None:
        last = last or {}
        status = trial_status(last)
        self._end_child(trial_id, status)

    def trial_errored(self, trial_id: str, error: str) -> None:
        self._end_child(trial_id, "failed", error)

    def experiment_ended(self, unfinished: list[str]) -> None:
        """Tune's loop is over; trials it did not finish (interrupted) are killed."""
        self.unfinished = list(unfinished)
        for tid in list(self.open):
            self._end_child(tid, "killed")

    def _end_child(self, trial_id: str, status: str, error: Optional[str] = None) -> None:
        run_id = self.children.get(trial_id) or self._child_for(trial_id)
        if run_id is None:
            return
        c = self.client
        c.set_tag(run_id, STATUS_TAG, status)
        if error:
            c.set_tag(run_id, ERROR_TAG, error[:5000])
        c.set_terminated(run_id, RUN_STATUS[status])
        self.statuses[trial_id] = status
        self.open.discard(trial_id)

    def trial_recovered(self, trial_id: str, error: str) -> None:
        """Tune restarts a failed trial from its last checkpoint: same child run, the retry on record."""
        run_id = self.children.get(trial_id) or self._child_for(trial_id)
        if run_id is None:
            return
        c = self.client
        n = int(c.get_run(run_id).data.tags.get("kdray.retries", "0")) + 1
        c.set_tag(run_id, "kdray.retries", str(n))
        c.set_tag(run_id, f"kdray.retry_{n}_error", error[:5000])
        c.set_tag(run_id, STATUS_TAG, "retrying")

    # ---- the end of the search

    def finish(self, trials: dict, table: pd.DataFrame, *, register_top: int, registered_model: Optional[str],
               input_example: Any, baseline: Optional[dict] = None, expected_trials: int = 0,
               register_pareto: bool = False) -> tuple[pd.DataFrame, list[dict]]:
        """Register the top students (of a multi-objective search: the top of its Pareto front, or with
        ``register_pareto`` every Pareto-optimal one), log the summary on the parent run and end it.

        Returns the table with a ``model_version`` column and the registrations. An interrupted search
        (trials left unfinished) only ends the parent as KILLED: ``--resume`` continues it.
        """

        if self.unfinished or len(table) < expected_trials:
            self.end("KILLED", f"interrupted with {max(len(self.unfinished), expected_trials - len(table))} trial(s) "
                               f"unfinished; continue it with --resume")
            return table, []
        registrations: list[dict] = []
        error: Optional[BaseException] = None
        # a multi-objective search registers from its Pareto front: the K best of it by the first objective
        # (--register-top K), or all of it (--register-pareto)
        candidates = table[table["pareto"]] if "pareto" in table else table
        top = len(candidates) if register_pareto and "pareto" in table else register_top
        if top > 0:
            try:
                registrations = register_trials(self, trials, candidates, top,
                                                registered_model or f"{self.experiment}-student", input_example)
            except Exception as e:  # noqa: BLE001 - reported below, after the summary is logged
                error = e
        if registrations:
            versions = {r["trial_id"]: str(r["version"]) for r in registrations}
            table = table.copy()
            table["model_version"] = [versions.get(t) for t in table["trial_id"]]
        self.log_summary(table, baseline, registrations)
        if error is not None:
            self.end("FAILED", f"registering the best students failed: {_first_line(error)}")
            raise KdrayError(f"the search finished, but registering its best students in {mask(self.uri)} failed "
                             f"(no model version was left behind): {_first_line(error)}") from error
        self.end("FINISHED")
        return table, registrations

    def log_summary(self, table: pd.DataFrame, baseline: Optional[dict], registrations: list[dict]) -> None:
        from mlflow.entities import Metric


        c, rid, metric = self.client, self.parent_run_id, self.space.metric
        with tempfile.TemporaryDirectory() as d:
            res = Path(d, "results")
            res.mkdir()
            table.to_parquet(res / "trials.parquet")
            table.to_csv(res / "trials.csv", index=False)
            try:
                search_plots(table, metric, self.space.mode, Path(d, "plots"),
                             [(o.metric, o.mode) for o in self.space.objectives])
            except Exception as e:  # noqa: BLE001 - plots are a nicety; never lose the table for them
                log.warning("search plots failed: %s", _first_line(e))
            c.log_artifacts(rid, d)
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{s}", float((table["status"] == s).sum()) if not table.empty else 0.0, now, 0)
                   for s in ("finished", "pruned", "failed", "killed")]
        fin = table[table["status"] == "finished"] if not table.empty else table
        if not fin.empty and fin[metric].notna().any():
            best = fin.loc[fin[metric].idxmax() if self.space.mode == "max" else fin[metric].idxmin()]
            metrics.append(Metric(f"best_{metric}", float(best[metric]), now, 0))
            if pd.notna(best.get("test_acc")):
                metrics.append(Metric("best_test_acc", float(best["test_acc"]), now, 0))
            c.set_tag(rid, "kdray.best_trial_id", str(best["trial_id"]))
            if best["trial_id"] in self.children:
                c.set_tag(rid, "kdray.best_run_id", self.children[best["trial_id"]])
        for k, v in (baseline or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics.append(Metric(f"baseline_{k}", float(v), now, 0))
        c.log_batch(rid, metrics=metrics)
        if registrations:
            best = registrations[0]
            c.set_tag(rid, "kdray.registered_model", f"{best['name']}/{best['version']}")


def search_tracker(uri: Optional[str], experiment: str, space: Any, base_raw: dict,
                   base_dir: str | Path) -> SearchTracker:
    """The tracker of a search, after the checks that come before any work: the tracking URI answers
    (:func:`connect`) and the experiment is not deleted (:func:`active_experiment`)."""
    active_experiment(connect(uri), experiment)
    return SearchTracker(resolve_tracking_uri(uri)[0], experiment, space, base_raw, base_dir)


def _quote(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace("'", "\\'")


