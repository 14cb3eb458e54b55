"""The Tune experiment of a search: the trainable (trial function, shared inputs, resources), the early
stopper, and the Tuner, built fresh or restored for ``--resume``; and SIGTERM while it runs.

``--resume`` uses ``Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)`` and nothing
private: the searcher comes back from its own saved state (:class:`~kdray.search.searcher.StudySearcher`
``save``/``restore``), the callbacks are this run's through :class:`~kdray.search.callbacks.SearchCallbacks`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any, Optional

from kdray.experiment.space import SearchSettings, SearchSpace
from kdray.search.callbacks import SearchCallbacks
from kdray.search.searcher import StudySearcher, make_searcher
from kdray.search.trial import CheckpointPlan, trial

log = logging.getLogger("kdray")


def make_trainable(space: SearchSpace, s: SearchSettings, *, prep_ref: Any, base_raw: dict, base_dir: Path,
                   max_epochs: int, storage: str):
    """The trial function with its fixed arguments (the prepared data and teacher by reference) and the
    resources of one trial: a CPU/GPU bundle, or a placement group for a Ray Train run of several workers."""
    from ray import tune

    trainable = tune.with_parameters(
        trial, shared=[prep_ref], space_raw=space.model_dump(mode="json", by_alias=True), base_raw=base_raw,
        base_dir=str(base_dir), max_epochs=max_epochs, workers=s.workers_per_trial,
        cpus_per_worker=s.cpus_per_worker, gpus_per_worker=s.gpus_per_worker, storage_path=storage,
        checkpoints=CheckpointPlan(tuple(asha_rungs(space, s, max_epochs)), s.checkpoint_every_s))
    if s.workers_per_trial == 1:
        resources: Any = {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker}
    else:
        from kdray.search.distributed import tune_resources_for  # lazy: Ray Train only for DDP trials

        resources = tune_resources_for(s.workers_per_trial, s.cpus_per_worker, s.gpus_per_worker)
    return tune.with_resources(trainable, resources)


def uses_asha(space: SearchSpace, s: SearchSettings) -> bool:
    """ASHA stops trials early unless the settings say no scheduler or the search has several objectives."""
    return s.scheduler == "asha" and not space.objectives


def make_early_stopper(space: SearchSpace, s: SearchSettings, max_epochs: int):
    """The Tune trial scheduler: ASHA on the validation metric, or none (FIFO) when the settings say so or the
    search has several objectives."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not uses_asha(space, s):
        if space.objectives and s.scheduler == "asha":
            log.info("multi-objective search (%s): no ASHA early stopping, every trial runs %d epochs",
                     ", ".join(f"{m} {d}" for m, d in zip(space.metrics, space.modes)), max_epochs)
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=max_epochs,
                         grace_period=min(s.grace_period, max_epochs), reduction_factor=s.reduction_factor)


def asha_rungs(space: SearchSpace, s: SearchSettings, max_epochs: int) -> list[int]:
    """The epochs at which ASHA (as :func:`make_early_stopper` sets it up) decides whether a trial goes on: the
    milestones ``grace_period * reduction_factor**k`` of Ray's single bracket (its own count of them), rounded up
    to a whole epoch, at most ``max_epochs``; none without ASHA."""
    if not uses_asha(space, s):
        return []
    grace = min(s.grace_period, max_epochs)
    count = int(math.log(max_epochs / grace) / math.log(s.reduction_factor) + 1)  # as ray's _Bracket counts
    return sorted({min(max_epochs, math.ceil(grace * s.reduction_factor ** k)) for k in range(count)})


def make_tuner(trainable: Any, space: SearchSpace, s: SearchSettings, *, exp_path: str, storage: str,
               max_epochs: int, callbacks: SearchCallbacks, resume: bool) -> tuple[Any, Optional[StudySearcher]]:
    """(the Tuner, the searcher whose study it drives); the searcher is None on ``--resume``, where Tune
    restores its own copy from the experiment folder."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    if resume:
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True), None
    searcher = make_searcher(space, s)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.concurrency),
                                    scheduler=make_early_stopper(space, s, max_epochs), num_samples=s.num_trials,
                                    reuse_actors=s.reuse_actors and s.workers_per_trial == 1),
        run_config=tune.RunConfig(name=space.name, storage_path=storage, verbose=0, callbacks=[callbacks],
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    return tuner, searcher


@contextlib.contextmanager
def sigterm_stops_tune():
    """SIGTERM during ``Tuner.fit`` stops Tune as Ctrl-C does (through Tune's SIGUSR1 handler), so trials
    end, state is saved and the runs are closed; outside it SIGTERM raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    in_fit = {"on": False}

    def on_sigterm(signum, frame):
        usr1 = signal.getsignal(signal.SIGUSR1)
        if in_fit["on"] and callable(usr1):
            log.warning("SIGTERM: stopping the search as for Ctrl-C (continue it with --resume)")
            usr1(signal.SIGUSR1, frame)
        else:
            raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_sigterm)
    in_fit["on"] = True
    try:
        yield
    finally:
        in_fit["on"] = False
        signal.signal(signal.SIGTERM, old)
