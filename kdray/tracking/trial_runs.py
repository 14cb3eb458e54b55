"""The child MLflow runs of a search, one per trial (keyed by Tune trial id, tag ``kdray.trial_id``).

A trial's run opens when it starts (reopened when a retried or resumed trial starts again: one run per
trial), logs each epoch's metrics as they arrive (step = epoch; an epoch already logged is skipped) and
ends with a status that tells finished, pruned (ASHA), failed (with the error) and killed apart (tag
``kdray.status``; MLflow status FINISHED, FINISHED, FAILED, KILLED). The student's size comes from what
the trial reports (``student_params``): no model is built here.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from kdray.experiment.space import _scalar
from kdray.experiment.status import trial_status
from kdray.tracking.client import (ERROR_TAG, NOT_METRICS, PARENT_TAG, ROLE_TAG, RUN_STATUS, STATUS_TAG, TRIAL_TAG,
                                   _chunks, _metrics, _params, quote)
from kdray.tracking.parent_run import SearchStore

FLOAT32_BYTES = 4


def student_size(result: dict) -> dict[str, float]:
    """``student_size_bytes`` of a trial's report: the bytes of its student's float32 parameters, from the
    ``student_params`` the trial counted (empty when it reported none)."""
    n = result.get("student_params")
    return {"student_size_bytes": FLOAT32_BYTES * float(n)} if isinstance(n, (int, float)) and n > 0 else {}


class TrialRuns:
    """The child run of each trial of a search, under the store's parent run."""

    def __init__(self, store: SearchStore):
        self.store = store
        self.children: dict[str, str] = {}  # trial id -> child run id
        self.open: set[str] = set()  # trial ids whose child run is RUNNING
        self.logged_epoch: dict[str, int] = {}
        self.statuses: dict[str, str] = {}  # trial id -> kdray status
        self.unfinished: list[str] = []  # trials Tune left neither TERMINATED nor ERROR (interrupted)

    def load(self) -> None:
        """Every child run of the parent, by trial id (a resumed search keeps one run per trial)."""
        s, token = self.store, None
        while True:
            page = s.client.search_runs([s.experiment_id], f"tags.`{PARENT_TAG}` = '{s.parent_run_id}'",
                                        max_results=1000, page_token=token)
            for r in page:
                tid = r.data.tags.get(TRIAL_TAG)
                if tid:
                    self.children.setdefault(tid, r.info.run_id)
            token = page.token
            if not token:
                break

    def run_of(self, trial_id: str) -> Optional[str]:
        """The child run of ``trial_id``: known, else looked up by its tag; None when it has none."""
        if trial_id not in self.children:
            s = self.store
            runs = s.client.search_runs([s.experiment_id], f"tags.`{PARENT_TAG}` = '{s.parent_run_id}' and "
                                                           f"tags.`{TRIAL_TAG}` = '{quote(trial_id)}'", max_results=1)
            if runs:
                self.children[trial_id] = runs[0].info.run_id
        return self.children.get(trial_id)

    def started(self, trial_id: str, config: dict) -> str:
        """The trial's run, RUNNING: reopened (a retried or resumed trial keeps its run) or created."""
        run_id = self.run_of(trial_id)
        if run_id is not None:
            self._reopen(trial_id, run_id)
        else:
            run_id = self._create(trial_id, config or {})
        self.open.add(trial_id)
        return run_id

    def _reopen(self, trial_id: str, run_id: str) -> None:
        c = self.store.client
        c.update_run(run_id, status="RUNNING")
        c.set_tag(run_id, STATUS_TAG, "running")
        with contextlib.suppress(Exception):
            c.delete_tag(run_id, ERROR_TAG)
        if trial_id not in self.logged_epoch:
            hist = c.get_metric_history(run_id, self.store.space.metric)
            self.logged_epoch[trial_id] = max((m.step for m in hist), default=0)

    def _create(self, trial_id: str, config: dict) -> str:
        s, c = self.store, self.store.client
        values = {k: _scalar(v) for k, v in config.items()}
        tags = {PARENT_TAG: s.parent_run_id, TRIAL_TAG: trial_id, STATUS_TAG: "running",
                ROLE_TAG: "trial", "kdray.search": s.space.name, "kdray.teacher": s.teacher}
        if "method" in values:
            tags["kdray.method"] = str(values["method"])
        run_id = c.create_run(s.experiment_id, run_name=trial_id, tags=tags).info.run_id
        self.children[trial_id] = run_id
        self.logged_epoch[trial_id] = 0
        for chunk in _chunks(_params(values), 100):
            c.log_batch(run_id, params=chunk)
        return run_id

    def result(self, trial_id: str, result: dict) -> None:
        """One epoch's report of the trial as metrics at step = epoch (skipped when already logged)."""
        run_id = self.children.get(trial_id) or self.started(trial_id, result.get("config") or {})
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        if epoch and epoch <= self.logged_epoch.get(trial_id, 0):
            return  # already logged (a trial restored from an earlier checkpoint)
        for chunk in _chunks(_metrics({**result, **student_size(result)}, epoch, skip=NOT_METRICS), 1000):
            self.store.client.log_batch(run_id, metrics=chunk)
        self.logged_epoch[trial_id] = epoch

    def completed(self, trial_id: str, last: Optional[dict]) -> None:
        self.end(trial_id, trial_status(last or {}))

    def errored(self, trial_id: str, error: str) -> None:
        self.end(trial_id, "failed", error)

    def recovered(self, trial_id: str, error: str) -> None:
        """Tune restarts a failed trial from its last checkpoint: same child run, the retry on record."""
        run_id = self.run_of(trial_id)
        if run_id is None:
            return
        c = self.store.client
        n = int(c.get_run(run_id).data.tags.get("kdray.retries", "0")) + 1
        c.set_tag(run_id, "kdray.retries", str(n))
        c.set_tag(run_id, f"kdray.retry_{n}_error", error[:5000])
        c.set_tag(run_id, STATUS_TAG, "retrying")

    def experiment_ended(self, unfinished: list[str]) -> None:
        """Tune's loop is over; trials it did not finish (interrupted) are killed."""
        self.unfinished = list(unfinished)
        self.end_open("killed")

    def end_open(self, status: str, error: Optional[str] = None) -> None:
        """End every run still open with ``status`` (and ``error``)."""
        for tid in list(self.open):
            self.end(tid, status, error)

    def end(self, trial_id: str, status: str, error: Optional[str] = None) -> None:
        """End the trial's run with kdray status ``status`` (and ``error`` as tag ``kdray.error``)."""
        run_id = self.run_of(trial_id)
        if run_id is None:
            return
        c = self.store.client
        c.set_tag(run_id, STATUS_TAG, status)
        if error:
            c.set_tag(run_id, ERROR_TAG, error[:5000])
        c.set_terminated(run_id, RUN_STATUS[status])
        self.statuses[trial_id] = status
        self.open.discard(trial_id)
