"""``kdray search``: a Ray Tune search where every trial is a distillation run.

Optuna TPE (through Ray's ``OptunaSearch``, capped by a ``ConcurrencyLimiter``) proposes trials from the
space's define-by-run function; ASHA stops weak ones early on the validation metric. Trials that ASHA
stops are told to Optuna as PRUNED (with their per-epoch values), not as complete with a truncated
score. One worker per trial runs the core loop in a plain function trainable; more workers launch a
Ray Train ``TorchTrainer`` (see :mod:`kdray.search.distributed`). Data and teacher are prepared once, put in
the object store once, and every trial gets a reference.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from kdray.config import config_error_from
from kdray.core.cache import get_cache
from kdray.core.checkpoint import load_state, save_state
from kdray.errors import ConfigError, KdrayError, first_line
from kdray.experiment.configs import parse_config
from kdray.experiment.run import cache_info, cache_request, prepare, run
from kdray.experiment.space import (DefineByRun, SearchSettings, SearchSpace, check_space, choice_combinations,
                                    initial_points, load_space, trial_raw)
from kdray.experiment.status import trial_status
from kdray.paths import check_cache_dir, check_writable_dir
from kdray.redact import mask
from kdray.search.prometheus import SearchMetrics
from kdray.search.results import RESULTS_FILE, default_storage, read_results, results_frame, top_table

log = logging.getLogger("kdray")


@dataclass
class SearchOptions:
    """Command-line options; None means "the space file's ``search`` settings"."""
    address: Optional[str] = None  # None: a local Ray; "auto"; "ray://host:10001"; "host:port"
    storage_path: Optional[str] = None  # local folder, s3://, gs://, or an NFS path
    resume: bool = False
    overwrite: bool = False  # replace an earlier search of the same name (default: refuse)
    overrides: dict[str, Any] = field(default_factory=dict)  # SearchSettings fields
    num_cpus: Optional[int] = None  # for a local Ray
    progress: bool = True
    baseline: bool = True  # also train the hard-label student of the base config, for comparison
    tracking: bool = True  # MLflow: a parent run per search, a child run per trial, registered students
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: Optional[str] = None  # MLflow experiment (default: the space's name)
    register_top: int = 1  # register the students of the K best finished trials (0: none)
    register_pareto: bool = False  # multi-objective: register every Pareto-optimal finished trial instead


def settings_with(space: SearchSpace, overrides: dict[str, Any]) -> SearchSettings:
    from pydantic import ValidationError


    merged = space.search.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    try:
        return SearchSettings.model_validate(merged)
    except ValidationError as e:
        err = config_error_from(e, root=SearchSettings)
        raise ConfigError(f"--{err.field.replace('_', '-')}", err.value, err.allowed) from None


# --------------------------------------------------------------------------------------------------
# Ray


def init_ray(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    """Connect to a cluster (``address``, else ``$RAY_ADDRESS``), or start a local Ray bound to 127.0.0.1
    with token auth. An address where no Ray answers is refused within seconds (``--address``)."""
    import ray

    if ray.is_initialized():
        return
    field = "--address"
    if address is None and os.environ.get("RAY_ADDRESS"):  # e.g. inside `ray job submit`, or a sourced env.sh
        address, field = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        log.info("Ray: connecting to RAY_ADDRESS=%s", mask(address))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": {"KDRAY_CACHE_DIR": os.environ.get("KDRAY_CACHE_DIR", "")}}}
    if address is None:
        # A local Ray (2.60+) turns token auth on by itself (RAY_AUTH_MODE=token, a generated token);
        # the dashboard is off and the node binds to the loopback address.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        if os.environ.get("RAY_AUTH_MODE") != "token":
            log.warning("local Ray started without token authentication (RAY_AUTH_MODE=%s)",
                        os.environ.get("RAY_AUTH_MODE"))
        return
    # Ray replaces a node address of 127.0.0.1 by this machine's outward IP, so a cluster kept on
    # loopback runs its nodes on another 127.x.y.z address; the driver then has to say it is there too.
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host.startswith("127.") and host != "127.0.0.1":
        kwargs["_node_ip_address"] = host
    check_ray_answers(address, field)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        ray.shutdown()
        raise ConfigError(field, address, f"the address of a running Ray cluster ({first_line(e)}); omit "
                                          "--address for a local Ray") from None


def check_ray_answers(address: str, field: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` or ``ray://host:port`` address where nothing accepts a connection (ray.init
    would wait minutes there). ``auto`` is left to Ray, which answers at once."""
    import socket

    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    if not port.isdigit():
        raise ConfigError(field, address, "auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(field, address, f"the address of a running Ray cluster (nothing answers at {host}:{port}: "
                                          f"{e.strerror or e}); start one with `ray start --head`, or omit --address "
                                          "for a local Ray") from None


def check_cluster_fits(s: SearchSettings, field_cpus: str = "--cpus-per-worker") -> None:
    """Refuse trial resources that no node of the cluster has (Tune would wait for them forever). An
    autoscaling cluster whose nodes are not up yet: set KDRAY_WAIT_FOR_RESOURCES=1."""
    import ray

    if os.environ.get("KDRAY_WAIT_FOR_RESOURCES") == "1":
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    if s.cpus_per_worker > cpus:
        raise ConfigError(field_cpus, s.cpus_per_worker, f"at most {cpus:g} CPUs per worker (the largest node of this "
                                                         "Ray cluster; KDRAY_WAIT_FOR_RESOURCES=1 waits for an "
                                                         "autoscaler)")
    if s.gpus_per_worker > gpus:
        raise ConfigError("--gpus-per-worker", s.gpus_per_worker, f"at most {gpus:g} GPUs per worker (the largest node "
                                                                  "of this Ray cluster; KDRAY_WAIT_FOR_RESOURCES=1 "
                                                                  "waits for an autoscaler)")
    total_cpus = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpus = sum(r.get("GPU", 0.0) for r in nodes)
    fit = min(total_cpus // s.cpus_per_worker, total_gpus // s.gpus_per_worker if s.gpus_per_worker else math.inf)
    if s.workers_per_trial > fit:
        raise ConfigError("--workers-per-trial", s.workers_per_trial,
                          f"at most {fit:g} workers of {s.cpus_per_worker:g} CPUs and {s.gpus_per_worker:g} GPUs (this "
                          f"Ray cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs; a trial's workers start "
                          "together)")


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped before ``max_epochs`` is PRUNED.

    Ray's OptunaSearch tells a trial ASHA stopped as COMPLETE with its last, truncated score, so
    TPE would learn from partial results as if final. Here per-epoch values are reported as
    intermediate values (step = epoch) and a truncated trial is told PRUNED: TPE then ranks it by
    its last intermediate value among pruned trials, as Optuna's own pruners do. A NaN final value
    (which Optuna's ``tell`` rejects) is told as FAIL.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._reported_steps: dict[str, set[int]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):  # multi-objective: Optuna takes no intermediate values
            return
        if trial_id in self._completed_trials or self.metric not in result:
            return
        value, step = result[self.metric], int(result.get("epoch", result.get("training_iteration")))
        seen = self._reported_steps.setdefault(trial_id, set())
        if isinstance(value, float) and math.isfinite(value) and step not in seen:  # Tune may pass a result twice
            seen.add(step)
            self._ot_trials[trial_id].report(value, step)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if result and not error:
            self.on_trial_result(trial_id, result)  # Tune hands the last result only to this method
        if isinstance(self.metric, list):  # multi-objective: a list of values, or FAIL
            values = [(result or {}).get(m) for m in self.metric]
            ok = not error and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            self._ot_study.tell(ot_trial, [float(v) for v in values] if ok else None,
                                state=TrialState.COMPLETE if ok else TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        value = (result or {}).get(self.metric)
        if error or value is None or not math.isfinite(float(value)):
            state, value = (TrialState.FAIL, None) if error or value is not None else (TrialState.PRUNED, None)
        elif trial_status(result) == "pruned":
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)


def make_searcher(space: SearchSpace, s: SearchSettings):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    sampler = (optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.tpe_startup_trials) if s.searcher == "tpe"
               else optuna.samplers.RandomSampler(seed=s.seed))
    multi = bool(space.objectives)
    searcher = PruningAwareOptunaSearch(space=DefineByRun(space), metric=space.metrics if multi else space.metric,
                                        mode=space.modes if multi else space.mode,
                                        sampler=sampler, points_to_evaluate=initial_points(space) or None)
    return ConcurrencyLimiter(searcher, max_concurrent=s.concurrency)


def make_scheduler(space: SearchSpace, s: SearchSettings, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if s.scheduler == "none":
        return FIFOScheduler()
    if space.objectives:
        log.info("multi-objective search (%s): no ASHA early stopping, every trial runs %d epochs",
                 ", ".join(f"{m} {d}" for m, d in zip(space.metrics, space.modes)), max_epochs)
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=max_epochs,
                         grace_period=min(s.grace_period, max_epochs), reduction_factor=s.reduction_factor)


# --------------------------------------------------------------------------------------------------
# the trial


def trial(config: dict, *, shared: list, space_raw: dict, base_raw: dict, base_dir: str, max_epochs: int,
          workers: int, cpus_per_worker: float, gpus_per_worker: float, storage_path: str) -> None:
    """The Tune function trainable: one distillation run, reporting and checkpointing every epoch."""
    import ray
    from ray import tune


    space = SearchSpace.model_validate(space_raw)
    raw = trial_raw(space, base_raw, config)
    raw.setdefault("train", {}).update({"epochs": max_epochs, "progress": False})
    if "latency_ms" in space.metrics:
        raw.setdefault("export", {})["measure_latency"] = True
    prep_ref = shared[0]
    if workers > 1:
        from kdray.search.distributed import run_torchtrainer_trial

        run_torchtrainer_trial(raw, prep_ref, num_workers=workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, name=f"train-{tune.get_context().get_trial_id()}",
                               storage_path=storage_path, max_epochs=max_epochs)
        return
    cfg = parse_config(raw, base_dir)
    prep = ray.get(prep_ref)
    start = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_state(d)

    def report(metrics: dict, state_fn) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state_fn())
            tune.report({**metrics, "max_epochs": max_epochs, "resumed_from": start["epoch"] if start else 0,
                         "node_id": ray.get_runtime_context().get_node_id()},
                        checkpoint=tune.Checkpoint.from_directory(d))

    run(cfg, prep, callbacks=(report,), start_state=start)


# --------------------------------------------------------------------------------------------------
# progress and results


def _progress_callback(total: int, metric: str, mode: str, enabled: bool):
    from ray.tune import Callback
    from tqdm.auto import tqdm

    class Progress(Callback):
        """One bar over trials: done / running / pruned / errored and the best value so far."""
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)
            self.running, self.pruned, self.errored = set(), 0, 0
            self.best: Optional[float] = None

        def _show(self) -> None:
            self.bar.set_postfix(running=len(self.running), pruned=self.pruned, errored=self.errored,
                                 best=f"{self.best:.4f}" if self.best is not None else "-")

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.running.add(trial.trial_id)
            self._show()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            v = result.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.best is None or (v > self.best if mode == "max" else v < self.best):
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

    return Progress()


# --------------------------------------------------------------------------------------------------
# the driver


@dataclass
class SearchOutcome:
    table: pd.DataFrame
    experiment_path: str
    baseline: Optional[dict] = None  # the hard-label student of the same base config
    seconds: float = 0.0
    study: Any = None  # the Optuna study (None after --resume: Ray restores the searcher internally)
    registered: list = field(default_factory=list)  # [{name, version, trial_id, run_id, rank, alias}]
    mlflow_run_id: Optional[str] = None  # the search's parent run


def hard_label_baseline(space: SearchSpace, base_raw: dict, base_dir: Path, prep, max_epochs: int) -> dict:
    """The student of the base config trained on the labels alone, for comparison with the trials."""
    raw = trial_raw(space.model_copy(update={"methods": {}, "params": {}}), base_raw, {})
    raw.setdefault("distill", {}).update({"terms": [], "ce_weight": 1.0, "scheme": "offline"})
    raw.setdefault("train", {}).update({"epochs": max_epochs, "progress": False})
    if "latency_ms" in space.metrics:
        raw.setdefault("export", {})["measure_latency"] = True
    s = run(parse_config(raw, base_dir), prep)
    return {"test_acc": s.test_acc, "best_val_acc": s.best_val_acc, "final_val_acc": s.final_val_acc}


def run_search(space_path: str, opts: SearchOptions) -> SearchOutcome:
    """Validate the space, prepare data and teacher once, run the Tune experiment, save the results."""
    t0 = time.perf_counter()
    space, base_raw, base_dir = load_space(space_path)
    s = settings_with(space, opts.overrides)
    if opts.num_cpus is not None and opts.num_cpus < 1:
        raise ConfigError("--num-cpus", opts.num_cpus, "1 or more (CPUs of the local Ray)")
    storage = checked_storage(opts.storage_path or default_storage())
    exp_path = _join(storage, space.name)
    replace_earlier = check_experiment_folder(exp_path, opts)
    # every value, layer, device and data split, before any trial or teacher
    corners = check_space(space, base_raw, base_dir, trial_gpus=s.gpus_per_worker)
    first = corners[0]
    check_cache_dir(first.cache_dir)
    max_epochs = s.max_epochs or first.train.epochs
    tracker = None
    if opts.tracking:  # the tracking URI must answer before any trial (or teacher training) starts
        from kdray.tracking.search_runs import search_tracker

        tracker = search_tracker(opts.tracking_uri, opts.experiment or space.name, space, base_raw, base_dir)

    import ray
    from ray import tune


    init_ray(opts.address, opts.num_cpus)
    try:
        check_cluster_fits(s)
    except ConfigError:
        ray.shutdown()
        raise
    if replace_earlier:
        _remove(exp_path)
        log.info("--overwrite: removed the earlier search at %s", exp_path)
    prep = prepare(first)
    prep.cache = search_cache(corners + choice_combinations(space, base_raw, base_dir), prep)
    log.info("teacher%s and data prepared once (%s); sharing them through the object store",
             " outputs" if prep.cache is not None else "", prep.teacher_info.get("source", "no teacher"))
    shared = [ray.put(prep)]
    trainable = tune.with_parameters(
        trial, shared=shared, space_raw=space.model_dump(mode="json", by_alias=True), base_raw=base_raw,
        base_dir=str(base_dir), max_epochs=max_epochs, workers=s.workers_per_trial,
        cpus_per_worker=s.cpus_per_worker, gpus_per_worker=s.gpus_per_worker, storage_path=storage)
    if s.workers_per_trial == 1:
        resources: Any = {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker}
    else:
        from kdray.search.distributed import tune_resources_for

        resources = tune_resources_for(s.workers_per_trial, s.cpus_per_worker, s.gpus_per_worker)
    trainable = tune.with_resources(trainable, resources)

    metrics = SearchMetrics(space.name, space.metric, space.mode)
    if prep.cache is not None:
        metrics.cache_lookup(prep.cache.hit)
    callbacks = [_progress_callback(s.num_trials, space.metric, space.mode, opts.progress), metrics]
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    searcher = None
    registered: list = []
    try:
        if tracker is not None:
            from kdray.tracking.tune_callback import MlflowSearchCallback

            tracker.start(exp_path, resume=opts.resume, settings=s.model_dump(mode="json"), space_path=space_path,
                          ray_address=opts.address, teacher_info=prep.teacher_info,
                          num_classes=prep.bundle.num_classes,
                          probes=prep.cache.manifest.get("probes", []) if prep.cache is not None else [])
            callbacks.append(MlflowSearchCallback(tracker))
        if opts.resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
            if getattr(tuner, "_local_tuner", None) is not None:  # this run's callbacks, not the pickled ones
                tuner._local_tuner.get_run_config().callbacks = callbacks
        else:
            searcher = make_searcher(space, s)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(space, s, max_epochs),
                                            num_samples=s.num_trials),
                run_config=tune.RunConfig(
                    name=space.name, storage_path=storage, verbose=0, callbacks=callbacks,
                    failure_config=tune.FailureConfig(max_failures=s.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        with sigterm_stops_tune():
            grid = tuner.fit()
        table = results_frame(grid, space)
        out = _join(exp_path, RESULTS_FILE)
        table.to_parquet(out) if "://" in out else _write_parquet(table, Path(out))
        unfinished = len(metrics.unfinished) + max(0, s.num_trials - len(table))
        baseline = (hard_label_baseline(space, base_raw, base_dir, prep, max_epochs)
                    if opts.baseline and not unfinished else None)
        if tracker is not None:
            example = prep.bundle.x_test[:2].numpy()  # batch > 1: the exported model keeps a dynamic batch
            from kdray.tracking.client import _env

            try:
                with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_TIMEOUT="30"):
                    table, registered = tracker.finish(finished_trials(grid), table, register_top=opts.register_top,
                                                       input_example=example, register_pareto=opts.register_pareto,
                                                       registered_model=space.registered_model, baseline=baseline,
                                                       expected_trials=s.num_trials)
            except KdrayError:
                raise
            except Exception as e:  # noqa: BLE001 - the tracking server went away: the trials are safe on disk
                tracker.writes.failed("the end of the search (summary, registration, closing the runs)", e)
                with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
                    tracker.close_after_error(e)
            if registered:
                table.to_parquet(out) if "://" in out else _write_parquet(table, Path(out))
            tracker.writes.warn_end(f"Every trial's metrics are in {out} and its result.json files.")
        if unfinished:
            raise KeyboardInterrupt(f"search interrupted with {unfinished} trial(s) unfinished; results so far in "
                                    f"{out}; continue it with --resume")
    except BaseException as e:
        if tracker is not None:
            tracker.close_after_error(e)
        raise
    study = searcher.searcher._ot_study if searcher is not None else None
    return SearchOutcome(table, exp_path, baseline, time.perf_counter() - t0, study, registered,
                         tracker.parent_run_id if tracker is not None else None)


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


def search_cache(corners: list, prep: Any) -> Any:
    """The teacher-output cache entry covering every corner of the space (built now when missing), or None
    when the search has no teacher, augments its inputs, or turned the cache off."""

    cfg = corners[0]
    if prep.teacher is None or prep.bundle.augment is not None or not cfg.teacher_cache.enabled:
        if prep.bundle.augment is not None:
            log.info("teacher signal: live in every trial (inputs are augmented, so cached outputs would not match)")
        return None
    b = prep.bundle
    req = cache_request(corners, prep, b.x_train[: cfg.data.batch_size])
    if req is None:
        return None
    cache = get_cache(prep.teacher, b, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                      batch_size=cfg.data.eval_batch_size)
    for r in cache.manifest.get("probes", []):
        log.info("probe on %s (%s pooling): val acc %.3f", r["layer"], r["pooling"], r["val_acc"])
    return cache


def checked_storage(storage: str) -> str:
    """The results storage as Tune takes it (a local folder as an absolute path), checked before any work: a
    local folder kdray can write to, or a URI of a file system pyarrow knows."""
    if "://" not in storage:
        return str(check_writable_dir(storage, "--storage-path").resolve())
    scheme = storage.split("://", 1)[0]
    if scheme not in ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file"):
        raise ConfigError("--storage-path", storage, "a local folder, or a URI of s3://, gs://, hdfs://, abfs:// "
                                                     "or file://")
    return storage


def check_experiment_folder(exp_path: str, opts: SearchOptions) -> bool:
    """``--resume`` needs the folder of an earlier search; without it, an earlier search's folder is refused
    (it would be overwritten) unless ``--overwrite`` says to replace it. True: remove it once every check
    has passed."""
    exists = _exists(exp_path)
    if opts.resume and not exists:
        raise ConfigError("--resume", exp_path, "the folder of an earlier search with the same name and storage")
    if exists and not opts.resume:
        if not opts.overwrite:
            raise ConfigError("name", exp_path, "a search name not used yet under this --storage-path (this folder "
                                                "holds an earlier search: --resume continues it, --overwrite replaces "
                                                "it, or choose another name or --storage-path)")
        return True
    return False


def _remove(path: str) -> None:
    if "://" not in path:
        import shutil

        shutil.rmtree(path)
        return
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    fs.delete_dir(p)


@contextlib.contextmanager
def trial_checkpoint(result: Any) -> Iterator[Path]:
    """A local folder holding a Tune result's last checkpoint (downloaded when on remote storage)."""
    from ray.tune import Checkpoint

    ckpt = result.checkpoint
    if ckpt is None and (result.metrics or {}).get("checkpoint_path"):  # a Ray Train (multi-worker) trial
        ckpt = Checkpoint(result.metrics["checkpoint_path"])
    if ckpt is None:
        raise KdrayError(f"trial {result.path} has no checkpoint")
    with ckpt.as_directory() as d:
        yield Path(d)


def finished_trials(grid: Any) -> dict:
    """Tune's results as the plain records MLflow registration reads (it knows nothing of Tune)."""
    from kdray.tracking.registered_models import FinishedTrial

    return {str((r.metrics or {}).get("trial_id") or Path(r.path).name):
            FinishedTrial(dict(r.config or {}), dict(r.metrics or {}), functools.partial(trial_checkpoint, r))
            for r in grid}


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp)
    os.replace(tmp, path)
    df.to_csv(path.with_suffix(".csv"), index=False)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def _exists(path: str) -> bool:
    if "://" not in path:
        return Path(path).exists()
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


__all__ = ["SearchOptions", "run_search", "read_results", "top_table", "KdrayError"]
