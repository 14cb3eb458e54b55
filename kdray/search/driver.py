"""``kdray search``: a Ray Tune search where every trial is a distillation run.

Optuna TPE (owned by :class:`~kdray.search.searcher.StudySearcher`, capped by a ``ConcurrencyLimiter``) proposes
trials from the space's define-by-run function; ASHA stops weak ones early on the validation metric. Trials that
ASHA stops are told to Optuna as PRUNED (with their per-epoch values), not as complete with a truncated score.
One worker per trial runs the core loop in a plain function trainable (:mod:`kdray.search.trial`); more workers
launch a Ray Train ``TorchTrainer`` (:mod:`kdray.search.distributed`). Data and teacher are prepared once, put
in the object store once, and every trial gets a reference.

:func:`run_search` reads as its steps: :func:`plan_search` (every check before any work), :func:`start_ray`,
:func:`prepare_shared`, :func:`run_tune` (:mod:`kdray.search.tuner`), the results table, the hard-label
baseline, and :func:`finish_tracking` (MLflow summary and registered students).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from kdray import paths
from kdray.config import config_error_from
from kdray.core.cache import get_cache
from kdray.core.cache_probes import probe_l2
from kdray.core.probes import describe_l2
from kdray.core.train import resolve_device
from kdray.errors import ConfigError, KdrayError
from kdray.experiment.run import cache_info, cache_request, prepare
from kdray.experiment.space import SearchSettings, SearchSpace, check_space, choice_combinations, load_space
from kdray.paths import check_cache_dir
from kdray.search.callbacks import Progress, this_run
from kdray.search.prometheus import SearchMetrics
from kdray.search.ray_cluster import alive_nodes, check_cluster_fits, init_ray
from kdray.search.results import RESULTS_FILE, default_storage, read_results, results_frame, top_table, write_results
from kdray.search.teacher_pass import check_workers, outputs_fn_for
from kdray.search.trial import finished_trials, hard_label_baseline
from kdray.search.tuner import make_trainable, make_tuner, sigterm_stops_tune

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


@dataclass
class SearchOutcome:
    table: pd.DataFrame
    experiment_path: str
    baseline: Optional[dict] = None  # the hard-label student of the same base config
    seconds: float = 0.0
    study: Any = None  # the searcher's Optuna study (None after --resume: Tune restores its own searcher)
    registered: list = field(default_factory=list)  # [{name, version, trial_id, run_id, rank, alias}]
    mlflow_run_id: Optional[str] = None  # the search's parent run
    tune_seconds: float = 0.0  # of ``seconds``, the Tune experiment's (the trials', scheduling included)


@dataclass
class SearchPlan:
    """A search checked before any work: the space and settings, where it goes, and the configs at the corners
    of the space (every value, layer, device and data split was tried on them)."""
    space_path: str
    space: SearchSpace
    base_raw: dict
    base_dir: Path
    settings: SearchSettings
    storage: str
    exp_path: str
    replace_earlier: bool  # an earlier search's folder to remove (--overwrite) once Ray is up
    corners: list
    max_epochs: int
    tracker: Any = None  # kdray.tracking.search_runs.SearchTracker, or None without tracking


def run_search(space_path: str, opts: SearchOptions) -> SearchOutcome:
    """Validate the space, prepare data and teacher once, run the Tune experiment, save the results."""
    t0 = time.perf_counter()
    plan = plan_search(space_path, opts)
    start_ray(plan, opts)
    prep = prepare_shared(plan)
    s, tracker = plan.settings, plan.tracker
    metrics = SearchMetrics(plan.space.name, plan.space.metric, plan.space.mode)
    if prep.cache is not None:
        metrics.cache_lookup(prep.cache.hit)
    callbacks = [Progress(s.num_trials, plan.space.metric, plan.space.mode, opts.progress), metrics]
    registered: list = []
    try:
        if tracker is not None:
            callbacks.append(start_tracking(plan, opts, prep))
        t_tune = time.perf_counter()
        grid, searcher = run_tune(plan, opts, prep, callbacks)
        tune_seconds = time.perf_counter() - t_tune
        table = results_frame(grid, plan.space)
        out = paths.join(plan.exp_path, RESULTS_FILE)
        write_results(table, out)
        unfinished = len(metrics.unfinished) + max(0, s.num_trials - len(table))
        baseline = (hard_label_baseline(plan.space, plan.base_raw, plan.base_dir, prep, plan.max_epochs)
                    if opts.baseline and not unfinished else None)
        if tracker is not None:
            table, registered = finish_tracking(plan, opts, grid, table, prep, baseline, out)
        if unfinished:
            raise KeyboardInterrupt(f"search interrupted with {unfinished} trial(s) unfinished; results so far in "
                                    f"{out}; continue it with --resume")
    except BaseException as e:
        if tracker is not None:
            tracker.close_after_error(e)
        raise
    return SearchOutcome(table, plan.exp_path, baseline, time.perf_counter() - t0,
                         searcher.study if searcher is not None else None, registered,
                         tracker.parent_run_id if tracker is not None else None, tune_seconds)


def plan_search(space_path: str, opts: SearchOptions) -> SearchPlan:
    """Every check that needs no Ray: the space and its values, the options, the storage and the experiment
    folder, the cache folder, and (with tracking) that the MLflow tracking URI answers."""
    space, base_raw, base_dir = load_space(space_path)
    s = settings_with(space, opts.overrides)
    if opts.num_cpus is not None and opts.num_cpus < 1:
        raise ConfigError("--num-cpus", opts.num_cpus, "1 or more (CPUs of the local Ray)")
    storage = paths.check_storage(opts.storage_path or default_storage(), "--storage-path")
    exp_path = paths.join(storage, space.name)
    replace_earlier = check_experiment_folder(exp_path, opts)
    corners = check_space(space, base_raw, base_dir, trial_gpus=s.gpus_per_worker)
    check_cache_dir(corners[0].cache_dir)
    space.model_name(opts.experiment)  # the registered model, checked before any work
    tracker = None
    if opts.tracking:  # the tracking URI must answer before any trial (or teacher training) starts
        from kdray.tracking.search_runs import search_tracker  # lazy: MLflow loads only when tracking is on

        tracker = search_tracker(opts.tracking_uri, opts.experiment or space.name, space, base_raw, base_dir)
    return SearchPlan(space_path, space, base_raw, base_dir, s, storage, exp_path, replace_earlier, corners,
                      s.max_epochs or corners[0].train.epochs, tracker)


def start_ray(plan: SearchPlan, opts: SearchOptions) -> None:
    """Connect to (or start) Ray, check the trial resources fit the cluster, then remove an earlier search
    that ``--overwrite`` replaces."""
    import ray

    init_ray(opts.address, opts.num_cpus)
    try:
        check_cluster_fits(plan.settings)
        check_workers(plan.corners[0].teacher_cache.workers)
    except ConfigError:
        ray.shutdown()
        raise
    if plan.replace_earlier:
        paths.remove_tree(plan.exp_path)
        log.info("--overwrite: removed the earlier search at %s", plan.exp_path)


def prepare_shared(plan: SearchPlan) -> Any:
    """Data and teacher prepared once for every trial, with the teacher-output cache covering the space."""
    prep = prepare(plan.corners[0])
    prep.cache = search_cache(plan.corners + choice_combinations(plan.space, plan.base_raw, plan.base_dir), prep)
    log.info("teacher%s and data prepared once (%s); sharing them through the object store",
             " outputs" if prep.cache is not None else "", prep.teacher_info.get("source", "no teacher"))
    if prep.cache is not None:
        prep.cache = share_cache(prep.cache)
    return prep


def share_cache(cache: Any) -> Any:
    """How trials get the teacher-output entry: on a multi-node cluster with the entry on shared storage (a
    URI), a reference that each trial reads from there (checksums verified); else the arrays themselves,
    through the object store. Says which."""
    if isinstance(cache.path, str) and alive_nodes() > 1:
        log.info("teacher cache: trials read entry %s from shared storage %s (not through the driver)", cache.key,
                 cache.path)
        return cache.reference()
    log.info("teacher cache: entry %s goes to the trials through the object store (%.1f MB)%s", cache.key,
             cache.manifest["bytes"] / 1e6, "" if isinstance(cache.path, str) else
             "; a cache_dir on shared storage (s3://, gs://, file://) lets the nodes of a cluster read it there")
    return cache


def start_tracking(plan: SearchPlan, opts: SearchOptions, prep: Any) -> Any:
    """Open (or, on --resume, reopen) the search's MLflow parent run; the Tune callback of its trials."""
    from kdray.tracking.tune_callback import MlflowSearchCallback  # lazy: MLflow only when tracking

    plan.tracker.start(plan.exp_path, resume=opts.resume, settings=plan.settings.model_dump(mode="json"),
                       space_path=plan.space_path, ray_address=opts.address, teacher_info=prep.teacher_info,
                       num_classes=prep.bundle.num_classes,
                       probes=prep.cache.manifest.get("probes", []) if prep.cache is not None else [],
                       teacher_val_acc=(prep.cache.manifest.get("teacher_accuracy", {}).get("val")
                                        if prep.cache is not None else None))
    return MlflowSearchCallback(plan.tracker)


def run_tune(plan: SearchPlan, opts: SearchOptions, prep: Any, callbacks: list) -> tuple[Any, Any]:
    """Run (or resume) the Tune experiment with this run's callbacks: (the result grid, the searcher or None)."""
    import ray

    trainable = make_trainable(plan.space, plan.settings, prep_ref=ray.put(prep), base_raw=plan.base_raw,
                               base_dir=plan.base_dir, max_epochs=plan.max_epochs, storage=plan.storage)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with this_run(plan.space.name, callbacks) as forward:
        tuner, searcher = make_tuner(trainable, plan.space, plan.settings, exp_path=plan.exp_path,
                                     storage=plan.storage, max_epochs=plan.max_epochs, callbacks=forward,
                                     resume=opts.resume)
        with sigterm_stops_tune():
            return tuner.fit(), searcher


def finish_tracking(plan: SearchPlan, opts: SearchOptions, grid: Any, table: pd.DataFrame, prep: Any,
                    baseline: Optional[dict], out: str) -> tuple[pd.DataFrame, list]:
    """The end of the search in MLflow: summary, registered students, runs closed. A tracking server that went
    away is reported, not raised: the trials are safe on disk. (table with model versions, registered)."""
    from kdray.tracking.client import _env  # lazy: MLflow only when tracking

    tracker, registered = plan.tracker, []
    example = prep.bundle.x_test[:2].numpy()  # batch > 1: the exported model keeps a dynamic batch
    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_TIMEOUT="30"):
            table, registered = tracker.finish(finished_trials(grid), table, register_top=opts.register_top,
                                               input_example=example, register_pareto=opts.register_pareto,
                                               registered_model=plan.space.model_name(opts.experiment),
                                               baseline=baseline, expected_trials=plan.settings.num_trials)
    except KdrayError:
        raise
    except Exception as e:  # noqa: BLE001 - the tracking server went away: the trials are safe on disk
        tracker.writes.failed("the end of the search (summary, registration, closing the runs)", e)
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
            tracker.close_after_error(e)
    if registered:
        write_results(table, out)
    tracker.writes.warn_end(f"Every trial's metrics are in {out} and its result.json files.")
    return table, registered


def search_cache(corners: list, prep: Any) -> Any:
    """The teacher-output cache entry covering every corner of the space (built now when missing), or None
    when the search has no teacher, augments its inputs, or turned the cache off."""

    cfg = corners[0]
    if prep.teacher is None or prep.bundle.augment is not None or not cfg.teacher_cache.enabled:
        if prep.bundle.augment is not None:
            log.info("teacher signal: live in every trial (inputs are augmented, so cached outputs would not match)")
        return None
    b = prep.bundle
    req = cache_request(corners, prep, b.teacher_x("train")[: cfg.data.batch_size])
    if req is None:
        return None
    cache = get_cache(prep.teacher, b, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                      batch_size=cfg.data.eval_batch_size, device=resolve_device("auto"),
                      outputs_fn=outputs_fn_for(cfg.teacher_cache.workers))
    for r in cache.manifest.get("probes", []):
        log.info("probe on %s (%s pooling, l2 %s): val acc %.3f", r["layer"], r["pooling"],
                 describe_l2(probe_l2(r), r["l2"]), r["val_acc"])
    if "test" in cache.manifest.get("teacher_accuracy", {}):  # measured by the one teacher pass
        prep.teacher_info.setdefault("teacher_test_acc", cache.manifest["teacher_accuracy"]["test"])
    return cache


def check_experiment_folder(exp_path: str, opts: SearchOptions) -> bool:
    """``--resume`` needs the folder of an earlier search; without it, an earlier search's folder is refused
    (it would be overwritten) unless ``--overwrite`` says to replace it. True: remove it once every check
    has passed."""
    exists = paths.exists(exp_path)
    if opts.resume and not exists:
        raise ConfigError("--resume", exp_path, "the folder of an earlier search with the same name and storage")
    if exists and not opts.resume:
        if not opts.overwrite:
            raise ConfigError("name", exp_path, "a search name not used yet under this --storage-path (this folder "
                                                "holds an earlier search: --resume continues it, --overwrite replaces "
                                                "it, or choose another name or --storage-path)")
        return True
    return False


__all__ = ["SearchOptions", "SearchOutcome", "run_search", "read_results", "top_table", "KdrayError"]
