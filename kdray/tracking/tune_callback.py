"""The only MLflow module that imports Ray: a Tune callback that hands every trial event to the
:class:`~kdray.tracking.search_runs.SearchTracker` (which knows nothing of Ray)."""
from __future__ import annotations

from ray.tune import Callback

from kdray.tracking.client import error_text
from kdray.tracking.search_runs import SearchTracker


class MlflowSearchCallback(Callback):
    """Driver-side Tune callback: every MLflow write of a search's trials goes through here.

    MLflow errors never stop the search: they go through the tracker's :class:`PausedWrites`.
    """

    def __init__(self, tracker: SearchTracker):
        self.tracker = tracker

    def _safe(self, what: str, fn, *args) -> None:
        trial_id = args[0] if args and isinstance(args[0], str) else None
        self.tracker.writes(what, fn, *args, item=trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_start", self.tracker.trial_started, trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._safe("on_trial_result", self.tracker.trial_result, trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_complete", self.tracker.trial_completed, trial.trial_id, trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_recover", self.tracker.trial_recovered, trial.trial_id, error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_error", self.tracker.trial_errored, trial.trial_id, error_text(trial))

    def on_experiment_end(self, trials, **info) -> None:
        unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
        self._safe("on_experiment_end", self.tracker.experiment_ended, unfinished)
