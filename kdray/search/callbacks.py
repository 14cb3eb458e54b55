"""Driver-side Tune callbacks of a search: the progress bar, and :class:`SearchCallbacks`, the one callback
Tune is given, which hands every event to the callbacks of the search running in this process.

Why one forwarding callback: Tune pickles the ``RunConfig`` (callbacks included) into the experiment folder
when the Tuner is built, and ``Tuner.restore(path, trainable, ...)`` takes its callbacks from that pickle; no
public argument replaces them. A resumed search must report to *this* run's progress bar, Prometheus gauges
and MLflow tracker (a new connection, maybe another URI), not to copies unpickled from the interrupted run.
So the pickled callback is a name: at run time it looks up the callbacks this process registered under that
name (:func:`this_run`), and falls back on the ones pickled with it only where none are registered (a
Ray Client driver, where Tune runs in another process).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

from ray.tune import Callback

from kdray.experiment.status import trial_status

_THIS_RUN: dict[str, list[Callback]] = {}  # search name -> the callbacks of the search running in this process


class SearchCallbacks(Callback):
    """Forwards every Tune callback hook to the callbacks registered for ``name`` in this process."""

    def __init__(self, name: str, callbacks: list[Callback]):
        self.name = name
        self.callbacks = list(callbacks)

    def live(self) -> list[Callback]:
        return _THIS_RUN.get(self.name, self.callbacks)


def _forward(hook: str):
    def call(self: SearchCallbacks, **info) -> None:
        for cb in self.live():
            getattr(cb, hook)(**info)

    call.__name__ = call.__qualname__ = hook
    return call


for _hook in [n for n in vars(Callback) if n.startswith("on_") or n == "setup"]:  # every hook Tune may call
    setattr(SearchCallbacks, _hook, _forward(_hook))


@contextlib.contextmanager
def this_run(name: str, callbacks: list[Callback]) -> Iterator[SearchCallbacks]:
    """Register ``callbacks`` as the ones of search ``name`` while it runs here (fresh or resumed)."""
    _THIS_RUN[name] = list(callbacks)
    try:
        yield SearchCallbacks(name, callbacks)
    finally:
        _THIS_RUN.pop(name, None)


class Progress(Callback):
    """One bar over trials: done / running / pruned / errored and the best value so far."""

    def __init__(self, total: int, metric: str, mode: str, enabled: bool):
        from tqdm.auto import tqdm

        self.metric, self.mode = metric, mode
        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)
        self.running: set[str] = set()
        self.pruned = self.errored = 0
        self.best: Optional[float] = None

    def _show(self) -> None:
        self.bar.set_postfix(running=len(self.running), pruned=self.pruned, errored=self.errored,
                             best=f"{self.best:.4f}" if self.best is not None else "-")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                self.best = v
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        if trial_status(trial.last_result) == "pruned":
            self.pruned += 1
        self.bar.update(1)
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.errored += 1
        self.bar.update(1)
        self._show()

    def on_experiment_end(self, trials, **info) -> None:
        self.bar.close()
