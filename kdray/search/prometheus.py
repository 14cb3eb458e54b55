"""kdray's own Prometheus metrics, exported through Ray (``ray.util.metrics``) from the search driver.

Ray prefixes every name with ``ray_``; ``dashboards/grafana/kdray.json`` plots them beside Ray's own:

* ``kdray_trials{search, state}``: trials running / finished / pruned / errored (gauge);
* ``kdray_epoch_seconds{search}``: time of each trial epoch (histogram);
* ``kdray_samples_per_second{search, trial}``: training throughput of the last epoch of each trial (gauge);
* ``kdray_best_val_acc{search}``: best value of the search metric so far (gauge; named for the default metric);
* ``kdray_cache_hits`` / ``kdray_cache_misses{search}``: teacher-cache lookups of the search (counters).

:class:`SearchMetrics` is a Tune callback, so the numbers come from the driver, like the MLflow writes.
"""
from __future__ import annotations

import math
from typing import Optional

from ray.tune import Callback

from kdray.experiment.status import trial_status

EPOCH_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
STATES = ("running", "finished", "pruned", "errored")


class SearchMetrics(Callback):
    """Counts trials by state and records epoch times, throughput and the best value so far."""

    def __init__(self, search: str, metric: str, mode: str):
        self.search, self.metric, self.mode = search, metric, mode
        self.counts = dict.fromkeys(STATES, 0)
        self.best: Optional[float] = None
        self.unfinished: list[str] = []  # trials Tune did not finish (an interrupted search)
        self._m = None

    def _metrics(self):
        if self._m is None:
            from ray.util.metrics import Counter, Gauge, Histogram

            self._m = {
                "trials": Gauge("kdray_trials", "Trials of a kdray search by state.", ("search", "state")),
                "epoch": Histogram("kdray_epoch_seconds", "Time of one trial epoch (s).", EPOCH_BUCKETS, ("search",)),
                "sps": Gauge("kdray_samples_per_second", "Training samples per second of a trial's last epoch.",
                             ("search", "trial")),
                "best": Gauge("kdray_best_val_acc", "Best value of the search metric so far.", ("search",)),
                "hits": Counter("kdray_cache_hits", "Teacher-cache hits of a search.", ("search",)),
                "misses": Counter("kdray_cache_misses", "Teacher-cache misses (entries built) of a search.",
                                  ("search",)),
            }
        return self._m

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its state; Ray metric objects stay behind
        return {**self.__dict__, "_m": None}

    def cache_lookup(self, hit: bool) -> None:
        self._metrics()["hits" if hit else "misses"].inc(1, {"search": self.search})

    def _publish(self) -> None:
        g = self._metrics()["trials"]
        for state, n in self.counts.items():
            g.set(n, {"search": self.search, "state": state})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.counts["running"] += 1
        self._publish()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        m = self._metrics()
        if isinstance(result.get("epoch_time_s"), (int, float)):
            m["epoch"].observe(float(result["epoch_time_s"]), {"search": self.search})
        if isinstance(result.get("samples_per_s"), (int, float)):
            m["sps"].set(float(result["samples_per_s"]), {"search": self.search, "trial": trial.trial_id})
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and (
                self.best is None or (v > self.best if self.mode == "max" else v < self.best)):
            self.best = float(v)
            m["best"].set(self.best, {"search": self.search})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        self.counts["running"] = max(0, self.counts["running"] - 1)
        self.counts["pruned" if trial_status(last) == "pruned" else "finished"] += 1
        self._publish()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.counts["running"] = max(0, self.counts["running"] - 1)
        self.counts["errored"] += 1
        self._publish()

    def on_experiment_end(self, trials, **info) -> None:
        self.unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
