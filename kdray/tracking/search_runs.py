"""MLflow tracking of a search: one parent run per search, one child run per trial, written by the driver.

:class:`SearchTracker` is the one object the search driver and the Tune callback
(:mod:`kdray.tracking.tune_callback`) talk to; it composes the pieces that do the work:

* :class:`~kdray.tracking.parent_run.SearchStore`: where the runs live (URI, experiment, parent run id) and
  what they describe (space, base config, teacher);
* :class:`~kdray.tracking.parent_run.ParentRun`: the parent run found again on ``--resume`` or created, and
  ended once;
* :class:`~kdray.tracking.trial_runs.TrialRuns`: a child run per trial (started, each epoch's result,
  completed, errored, recovered);
* :func:`~kdray.tracking.search_summary.finish_search`: the best students registered, the trials table, plots
  and baseline on the parent run;
* :class:`~kdray.tracking.client.PausedWrites` (``writes``): the one bounded-pause policy for MLflow writes that
  must never stop the trials they record.

:func:`search_tracker` checks, before any work, that the tracking URI answers and the experiment is not
deleted. Only :class:`mlflow.MlflowClient` calls with explicit run ids (no fluent active-run state), so the
writes are safe from the Tune driver's callback thread. Workers never talk to MLflow; the plain-PyTorch core
(run, train) knows nothing of this module.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from kdray.tracking.client import PausedWrites, active_experiment, connect, error_line, resolve_tracking_uri
from kdray.tracking.parent_run import END_STATUS, ParentRun, SearchStore
from kdray.tracking.search_summary import finish_search
from kdray.tracking.trial_runs import TrialRuns

log = logging.getLogger("kdray")


class SearchTracker:
    """The MLflow runs of one search: the parent, and a child per trial (keyed by Tune trial id)."""

    def __init__(self, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path):
        self.store = SearchStore(uri, experiment, space, base_raw, base_dir)
        self.parent = ParentRun(self.store)
        self.trials = TrialRuns(self.store)
        self.writes = PausedWrites(uri, "the search goes on; trials keep training", "trials")

    @classmethod
    def attach(cls, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path, parent_run_id: str,
               num_classes: int, teacher: str = "") -> "SearchTracker":
        """A tracker for the runs of an earlier search (e.g. to register more of its students)."""
        t = cls(uri, experiment, space, base_raw, base_dir)
        t.store.num_classes, t.store.teacher = num_classes, teacher
        t.parent.attach(parent_run_id)
        t.trials.load()
        return t

    # ---- what registration (kdray.tracking.registered_models) and the driver read

    uri = property(lambda self: self.store.uri)
    experiment = property(lambda self: self.store.experiment)
    space = property(lambda self: self.store.space)
    base_raw = property(lambda self: self.store.base_raw)
    base_dir = property(lambda self: self.store.base_dir)
    client = property(lambda self: self.store.client)
    parent_run_id = property(lambda self: self.store.parent_run_id)
    num_classes = property(lambda self: self.store.num_classes)
    teacher = property(lambda self: self.store.teacher)
    children = property(lambda self: self.trials.children, doc="trial id -> child run id")

    def trial_run_id(self, trial_id: str) -> Optional[str]:
        """The child run of ``trial_id`` (looked up by tag when not known yet), or None."""
        return self.trials.run_of(trial_id)

    def _load_children(self) -> None:
        self.trials.load()

    # ---- the parent run

    def start(self, exp_path: str, *, resume: bool, settings: dict, space_path: str | Path,
              ray_address: Optional[str], teacher_info: dict, num_classes: int, probes: list[dict] = (),
              teacher_val_acc: Optional[float] = None) -> str:
        """Find or create the experiment and the parent run (reused on resume); returns its id.

        ``probes`` (the probes fitted up-front on the candidate layers) go on the parent run as metrics
        ``probe_val_acc.<layer>.<pooling>``, with ``teacher_val_acc`` (the teacher's own accuracy on the same
        examples) and the plot of both by layer."""
        self.store.num_classes = num_classes
        self.store.teacher = self.store.teacher_label(teacher_info)
        run_id, reopened = self.parent.start(exp_path, resume=resume, settings=settings, space_path=space_path,
                                             ray_address=ray_address, probes=probes, teacher_val_acc=teacher_val_acc)
        if reopened:
            self.trials.load()
        return run_id

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the parent run (and any child still open) — FINISHED, FAILED or KILLED."""
        self.trials.end_open(END_STATUS[status], f"the search ended before this trial did: {error}" if error else None)
        self.parent.end(status, error)

    def close_after_error(self, e: BaseException) -> None:
        """The search raised or was interrupted: end every open run (KILLED for an interruption, else FAILED)."""
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.end(status, f"{type(e).__name__}: {error_line(e)}")
        except Exception as e2:  # noqa: BLE001 - never hide the original error
            log.warning("could not end the MLflow runs of the search: %s", error_line(e2))

    # ---- child runs (called from the Tune callback, on the driver)

    def trial_started(self, trial_id: str, config: dict) -> str:
        return self.trials.started(trial_id, config)

    def trial_result(self, trial_id: str, result: dict) -> None:
        self.trials.result(trial_id, result)

    def trial_completed(self, trial_id: str, last: Optional[dict]) -> None:
        self.trials.completed(trial_id, last)

    def trial_errored(self, trial_id: str, error: str) -> None:
        self.trials.errored(trial_id, error)

    def trial_recovered(self, trial_id: str, error: str) -> None:
        self.trials.recovered(trial_id, error)

    def experiment_ended(self, unfinished: list[str]) -> None:
        """Tune's loop is over; trials it did not finish (interrupted) are killed."""
        self.trials.experiment_ended(unfinished)

    # ---- the end of the search

    def finish(self, trials: dict, table: pd.DataFrame, *, register_top: int, registered_model: str,
               input_example: Any, baseline: Optional[dict] = None, expected_trials: int = 0,
               register_pareto: bool = False) -> tuple[pd.DataFrame, list[dict]]:
        """Register the top students (of a multi-objective search: the top of its Pareto front, or with
        ``register_pareto`` every Pareto-optimal one), log the summary on the parent run and end it.

        Returns the table with a ``model_version`` column and the registrations. An interrupted search
        (trials left unfinished) only ends the parent as KILLED: ``--resume`` continues it.
        """
        return finish_search(self, trials, table, register_top=register_top, registered_model=registered_model,
                             input_example=input_example, baseline=baseline, expected_trials=expected_trials,
                             register_pareto=register_pareto)


def search_tracker(uri: Optional[str], experiment: str, space: Any, base_raw: dict,
                   base_dir: str | Path) -> SearchTracker:
    """The tracker of a search, after the checks that come before any work: the tracking URI answers
    (:func:`connect`) and the experiment is not deleted (:func:`active_experiment`)."""
    active_experiment(connect(uri), experiment)
    return SearchTracker(resolve_tracking_uri(uri)[0], experiment, space, base_raw, base_dir)
