"""The Ray Train path: one trial on several DDP workers.

A Tune *function trainable* (the trial driver) calls :func:`run_torchtrainer_trial`, which starts a
``ray.train.torch.TorchTrainer`` running :func:`worker_loop` on every worker. The workers train one
student together with ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU: TorchTrainer's default
``TorchConfig`` backend) and report each epoch with ``ray.train.report``; the Train run forwards
rank 0's metrics (and the checkpoint path, as ``checkpoint_path``) to Tune through
``ray.tune.integration.ray_train.TuneReportCallback``.

What each rank does:

* takes its shard of the training indices (``kdray.core.train.fit`` gives every rank the same number of
  examples, so every rank runs the same number of steps and DDP's all-reduces line up);
* wraps only the :class:`~kdray.core.train.Distiller` (student + adapters) in DDP; the frozen teacher, its
  precomputed outputs and the probes are the same on every rank and stay unwrapped;
* calls ``ray.train.report`` once per epoch (a barrier: every rank, the same number of times), with a
  checkpoint (``state.pt``) from rank 0 only;
* resumes from ``ray.train.get_checkpoint()`` when the Train run already has one. Train finds it when the
  run's ``(storage_path, name)`` is reused, so name the run after the Tune trial id: a restarted trial
  then continues from its last epoch instead of starting over.

Each report also carries ``world_size`` and ``replica_param_spread``: the largest difference, over ranks,
of a checksum of the distiller's parameters. DDP keeps the replicas identical, so it is 0.0 on CPU; a
non-zero value means the ranks trained different models.

The online scheme is refused on several workers: its teacher is trained outside the Distiller and would
drift apart on each rank.

The fixed cost of a TorchTrainer (placement group, worker actors, process group) is seconds to tens of
seconds, so a one-worker trial should run in the Tune function itself; :func:`tune_resources_for` says
what the Tune trial reserves in either case.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Optional

import torch

from kdray.config import ExperimentConfig
from kdray.core.checkpoint import STATE_FILE, load_state, save_state
from kdray.errors import ConfigError, KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import run

log = logging.getLogger("kdray")

# What a Tune trial that only drives a TorchTrainer reserves for itself. It does no computing (it waits
# on the Train controller), so it must not hold a CPU the workers need: with a CPU reservation, even a
# tiny one, a trial whose workers need every CPU of the cluster could never start (0.01 + 2 x 1 > 2 CPUs).
# Ray cannot schedule an empty reservation, so the driver takes a sliver of the head node's built-in
# resource: zero CPU, and drivers land on the head node, the "safe node" Ray's Train+Tune guide recommends
# for them (a driver lost with a preempted worker node would take the run's bookkeeping with it).
# 0.001 of it allows 1000 concurrent drivers; limit concurrency with TuneConfig(max_concurrent_trials).
HEAD_NODE_RESOURCE = "node:__internal_head__"
DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "gpu": 0, HEAD_NODE_RESOURCE: 0.001}


class DistributedTrialError(KdrayError):
    """A Ray Train run of a trial failed (after Train's own retries)."""


def tune_resources_for(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    """What the Tune trial itself reserves (a dict for ``tune.with_resources``).

    * ``num_workers > 1``: the trial only drives a TorchTrainer, whose workers reserve their own CPUs and
      GPUs in a placement group of the Train run; the trial takes :data:`DRIVER_RESOURCES` (no CPU, no GPU,
      0.001 of the head node's built-in ``node:__internal_head__`` resource), so a search on a 2-CPU
      machine can still give 2 x 1 CPU to the workers. Ray's guide uses the same shape with a custom
      driver resource of 0.01; and since Train waits for all its workers at once, cap the trials in
      flight with ``TuneConfig(max_concurrent_trials=cluster CPUs (or GPUs) // per-trial need)``.
    * ``num_workers <= 1``: the trial trains in its own process (no TorchTrainer: its fixed cost is not
      worth it), so it reserves one worker's resources: ``{"cpu": cpus_per_worker, "gpu": gpus_per_worker}``.
    """
    _check_resources(num_workers, cpus_per_worker, gpus_per_worker)
    if num_workers > 1:
        return dict(DRIVER_RESOURCES)
    return {"cpu": float(cpus_per_worker), "gpu": float(gpus_per_worker)}


def _check_resources(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    if int(num_workers) != num_workers or num_workers < 1:
        raise ConfigError("num_workers", num_workers, "an integer >= 1")
    if cpus_per_worker < 0 or gpus_per_worker < 0 or (cpus_per_worker == 0 and gpus_per_worker == 0):
        raise ConfigError("cpus_per_worker/gpus_per_worker", (cpus_per_worker, gpus_per_worker),
                          "numbers >= 0, not both 0")


def _check_distributable(cfg: ExperimentConfig, world_size: int) -> None:
    if world_size > 1 and cfg.distill.scheme == "online":
        raise ConfigError("distill.scheme", "online",
                          "offline when a trial runs on several Ray Train workers (the online teacher is "
                          "trained outside the DDP-wrapped distiller and would differ on every rank)")


def _trial_config(raw: dict, max_epochs: Optional[int]) -> ExperimentConfig:
    cfg = parse_config(raw)
    if max_epochs is not None:
        cfg.train.epochs = int(max_epochs)
    cfg.train.progress = False
    return cfg


# --------------------------------------------------------------------------------------------------
# on every worker


def _param_checksum(module: torch.nn.Module) -> float:
    """One float64 number that changes with any parameter value (sum and sum of squares)."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            q = p.detach().to(torch.float64)
            total += (q.sum() + q.square().sum()).cpu()
    return float(total)


def _replica_spread(module: torch.nn.Module, device: torch.device) -> float:
    """max - min over ranks of :func:`_param_checksum` (a collective: every rank must call it)."""
    import torch.distributed as dist

    c = _param_checksum(module)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    t = torch.tensor([c, -c], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0] + t[1])


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank (a collective: every rank must call it)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _load_start_state() -> Optional[dict[str, Any]]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        path = os.path.join(d, STATE_FILE)
        if not os.path.isfile(path):
            raise DistributedTrialError(f"checkpoint {ckpt.path} has no {STATE_FILE}")
        return load_state(d)


def worker_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: train, report and checkpoint one trial on this rank.

    ``config``: ``raw`` (the trial's experiment config dict), ``prep`` (a :class:`kdray.experiment.run.Prepared`, or
    an ObjectRef to one so it crosses the object store once) and ``max_epochs`` (overrides
    ``train.epochs`` when not None).
    """
    import ray
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel


    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = _trial_config(config["raw"], config.get("max_epochs"))
    _check_distributable(cfg, world)
    device = ray.train.torch.get_device()
    cfg.train.device = str(device)
    prep = config["prep"]
    if isinstance(prep, ray.ObjectRef):
        prep = ray.get(prep)
    start_state = _load_start_state()
    if start_state is not None:
        log.info("rank %d resumes after epoch %s", rank, start_state.get("epoch"))

    wrapped: dict[str, torch.nn.Module] = {}
    node_ids = _gather_node_ids(world)  # which Ray nodes the ranks run on (reported as num_nodes)

    def wrap(distiller: torch.nn.Module) -> torch.nn.Module:
        wrapped["distiller"] = distiller
        if world == 1:
            return distiller
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(distiller, device_ids=ids)

    def report(metrics: dict, state_fn) -> None:
        out = dict(metrics)
        out["world_size"] = world
        out["replica_param_spread"] = _replica_spread(wrapped["distiller"], device)
        out["num_nodes"] = len(set(node_ids))
        if rank != 0:
            ray.train.report(out, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="kdray-ckpt-") as d:
            save_state(d, state_fn())
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))

    run(cfg, prep, callbacks=(report,), start_state=start_state, rank=rank, world_size=world, wrap=wrap)


# --------------------------------------------------------------------------------------------------
# in the Tune trial (the Train driver)


def run_torchtrainer_trial(raw: dict, prep_ref: Any, *, num_workers: int, cpus_per_worker: float,
                           gpus_per_worker: float, name: str, storage_path: str, max_epochs: Optional[int],
                           max_failures: int = 0) -> None:
    """Run one trial as a TorchTrainer of ``num_workers`` DDP workers; call from a Tune function trainable.

    Every epoch reaches Tune (rank 0's metrics, plus ``checkpoint_path``) through ``TuneReportCallback``.
    ``name`` names the Train run under ``storage_path``: derive it from the Tune trial id (no timestamp) so
    that a restarted trial resumes from the run's last checkpoint. ``storage_path`` must be shared storage
    (NFS, s3://, gs://) on a multi-node cluster. ``prep_ref`` is an ObjectRef to a
    :class:`kdray.experiment.run.Prepared` (a Prepared is put in the object store here). ``max_epochs`` overrides
    ``train.epochs`` when not None.

    Worker failures are retried ``max_failures`` times from the last checkpoint (default 0: kdray's own
    errors are deterministic, node preemptions are retried by Train separately, and a Tune-level
    ``FailureConfig`` restarts the whole trial, which resumes through ``name``). Then the worker's kdray
    error (ConfigError, DivergedError ...) is raised as itself, any other failure as a
    :class:`DistributedTrialError`.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    _check_resources(num_workers, cpus_per_worker, gpus_per_worker)
    _check_distributable(_trial_config(raw, max_epochs), num_workers)  # fail here, not on every worker
    if not isinstance(prep_ref, ray.ObjectRef):
        prep_ref = ray.put(prep_ref)
    resources = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker > 0:
        resources["GPU"] = float(gpus_per_worker)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"raw": raw, "prep": prep_ref, "max_epochs": max_epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=int(num_workers), use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _trial_error(name, num_workers, e) from e
    if result.error is not None:
        raise _trial_error(name, num_workers, result.error) from result.error


def _trial_error(name: str, num_workers: int, error: BaseException) -> Exception:
    """The kdray error a worker raised (config problem, divergence) if any, else a DistributedTrialError."""
    for _, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        for e in (failure, getattr(failure, "cause", None), getattr(failure, "__cause__", None)):
            if isinstance(e, KdrayError):
                return e
    return DistributedTrialError(f"Ray Train run {name!r} ({num_workers} workers) failed: "
                                 f"{type(error).__name__}: {error}")
