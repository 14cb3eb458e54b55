"""The Tune searcher: a small ``ray.tune.search.Searcher`` that owns an Optuna study and drives it through
Optuna's public ask/tell interface, and the ASHA early stopper beside it.

Ray's own ``OptunaSearch`` tells Optuna that a trial ASHA stopped is COMPLETE with its last, truncated score,
so TPE would learn from partial results as if final; fixing that from outside meant reaching into its private
state. Here the searcher asks the study for a trial, lets the space's define-by-run function draw its values,
reports per-epoch values as intermediate values (step = epoch), and tells the study how the trial ended:
PRUNED when it stopped before ``max_epochs`` (TPE then ranks it by its last intermediate value among pruned
trials, as Optuna's own pruners do), FAIL when it raised or its final value is NaN (Optuna's ``tell`` rejects
NaN), else COMPLETE. Multi-objective studies take no intermediate values: COMPLETE with every value, or FAIL.

Tune saves the searcher with the experiment (``save``/``restore``: the study, in Optuna's in-memory storage,
is pickled with the trials still running, whose Optuna trials refer to it), so ``--resume`` continues the
same study.
"""
from __future__ import annotations

import math
import pickle
from typing import Any, Callable, Optional, Union

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from kdray.experiment.space import DefineByRun, SearchSettings, SearchSpace, initial_points
from kdray.experiment.status import trial_status

Metric = Union[str, list[str]]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StudySearcher(Searcher):
    """Proposes Tune trials from an Optuna study it owns (``self.study``), through ``ask``/``tell`` only.

    ``define_by_run(trial)`` draws a trial's values with ``trial.suggest_*``; it returns the config, or None
    for "the drawn parameters". ``points_to_evaluate`` are enqueued: the first trials asked take them.
    """

    def __init__(self, define_by_run: Callable[[Any], Optional[dict]], metric: Metric, mode: Metric,
                 sampler: Optional[optuna.samplers.BaseSampler] = None,
                 points_to_evaluate: Optional[list[dict]] = None):
        super().__init__(metric=metric, mode=mode)
        self.define_by_run = define_by_run
        modes = mode if isinstance(mode, list) else [mode]
        self.study = optuna.create_study(directions=["minimize" if m == "min" else "maximize" for m in modes],
                                         sampler=sampler, pruner=optuna.pruners.NopPruner())
        for point in points_to_evaluate or []:
            self.study.enqueue_trial(point)
        self._running: dict[str, optuna.Trial] = {}  # Tune trial id -> the Optuna trial asked for it
        self._reported: dict[str, set[int]] = {}  # Tune trial id -> the steps already reported

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def suggest(self, trial_id: str) -> Optional[dict]:
        if trial_id not in self._running:
            self._running[trial_id] = self.study.ask()
        trial = self._running[trial_id]
        config = self.define_by_run(trial)
        return dict(config) if config is not None else dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.multi_objective or trial_id not in self._running or self.metric not in result:
            return
        value, step = result[self.metric], int(result.get("epoch", result.get("training_iteration")))
        seen = self._reported.setdefault(trial_id, set())
        if _finite(value) and step not in seen:  # Tune may hand the same result twice
            seen.add(step)
            self._running[trial_id].report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id not in self._running:
            return
        if result and not error:
            self.on_trial_result(trial_id, result)  # Tune hands the last result only to this method
        trial = self._running.pop(trial_id)
        self._reported.pop(trial_id, None)
        values, state = self._outcome(result or {}, error)
        self.study.tell(trial, values, state=state)

    def _outcome(self, result: dict, error: bool) -> tuple[Any, TrialState]:
        """What to tell Optuna of a finished trial: (value or values, state)."""
        if self.multi_objective:
            values = [result.get(m) for m in self.metric]
            ok = not error and all(_finite(v) for v in values)
            return ([float(v) for v in values], TrialState.COMPLETE) if ok else (None, TrialState.FAIL)
        value = result.get(self.metric)
        if error:
            return None, TrialState.FAIL
        if value is None:  # it never reported the metric
            return None, TrialState.PRUNED
        if not _finite(value):
            return None, TrialState.FAIL
        if trial_status(result) == "pruned":
            return None, TrialState.PRUNED
        return float(value), TrialState.COMPLETE

    def save(self, checkpoint_path: str) -> None:
        """The study (trials, sampler state) and the trials still running; the define-by-run function, metric
        and mode are the constructor's."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"study": self.study, "running": self._running, "reported": self._reported}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.study, self._running, self._reported = state["study"], state["running"], state["reported"]


def make_searcher(space: SearchSpace, s: SearchSettings) -> StudySearcher:
    """TPE (seeded, ``tpe_startup_trials`` random trials first) or random search over the space, starting with
    its ``points_to_evaluate``."""
    sampler = (optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.tpe_startup_trials) if s.searcher == "tpe"
               else optuna.samplers.RandomSampler(seed=s.seed))
    multi = bool(space.objectives)
    return StudySearcher(DefineByRun(space), metric=space.metrics if multi else space.metric,
                         mode=space.modes if multi else space.mode, sampler=sampler,
                         points_to_evaluate=initial_points(space))
