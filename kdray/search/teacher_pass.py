"""The teacher pass on Ray Data: one teacher over a whole split on every worker of the cluster.

With ``teacher_cache.workers`` above 1 (or ``auto`` on a cluster with GPUs), :func:`outputs_fn_for` gives the
teacher-output cache (:mod:`kdray.core.cache`) an ``outputs_fn`` that runs the teacher as a Ray Data
``map_batches`` over the split's inputs with N actor replicas of the teacher (one GPU each when the cluster has
GPUs, else one CPU). Each actor loads the teacher once, from a picklable zero-argument loader (by default the
driver's teacher, put in the object store once), and calls core's :func:`~kdray.core.cache.teacher_outputs` on
each batch. The batches are the same as the single-process pass (one block of ``batch_size`` examples per batch,
order preserved and re-checked by example id), so the arrays, manifest and checksums are the same as well.
Inputs are any tensor per split: MNIST-1D floats, images, or a language-model teacher's token ids.

A worker that dies is restarted by Ray Data and its batch retried; a pass that fails anyway raises, and the
cache removes the entry it was building. The probes are fitted afterwards in the driver, as without Ray.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from kdray.core.cache import CacheRequest, OutputsFn, teacher_outputs
from kdray.core.text import length_batches
from kdray.errors import ConfigError

log = logging.getLogger("kdray")

FIELD = "teacher_cache.workers"
Loader = Callable[[], nn.Module]  # picklable, no arguments: the teacher, built once per actor


# --------------------------------------------------------------------------------------------------
# how many actors, and checking they fit


def _cluster_totals() -> tuple[float, float]:
    """(CPUs, GPUs) of the alive nodes of the connected Ray cluster."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return sum(r.get("CPU", 0.0) for r in nodes), sum(r.get("GPU", 0.0) for r in nodes)


def local_workers(setting: Union[int, str]) -> int:
    """The number of actors before Ray is up: N, or for ``auto`` one per GPU of this machine, else 1."""
    return setting if isinstance(setting, int) else max(1, torch.cuda.device_count())


def check_workers(setting: Union[int, str]) -> tuple[int, bool]:
    """(actors, on GPUs) on the connected cluster: N, or ``auto`` = one per GPU, else 1. N above the
    cluster's capacity (its GPUs when it has any, else its CPUs) is refused before any work."""
    cpus, gpus = _cluster_totals()
    if setting == "auto":
        return max(1, int(gpus)), gpus >= 1
    capacity, unit = (int(gpus), "GPUs") if gpus >= 1 else (int(cpus), "CPUs")
    if setting > capacity:
        raise ConfigError(FIELD, setting, f"at most {capacity} actors, one per {unit[:-1]} of this Ray cluster "
                                          f"({cpus:g} CPUs, {gpus:g} GPUs), or 'auto'")
    return setting, gpus >= 1


# --------------------------------------------------------------------------------------------------
# the teacher in each actor


def _from_object_store(ref: Any) -> nn.Module:
    import ray

    return ray.get(ref)


def object_store_loader(teacher: nn.Module) -> Loader:
    """A loader of ``teacher`` as it is in this process: put in the object store once, fetched once per actor."""
    import ray

    on_cpu = all(p.device.type == "cpu" for p in teacher.parameters())
    return functools.partial(_from_object_store, ray.put(teacher if on_cpu else copy.deepcopy(teacher).cpu()))


class TeacherActor:
    """One replica of the teacher: built once, then core's ``teacher_outputs`` on each batch of examples."""

    def __init__(self, loader: Loader, request: CacheRequest, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = loader().to(self.device).eval()
        self.request = request

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch["x"]))
        out = teacher_outputs(self.model, x, self.request, max(len(x), 1), self.device)
        return {"example_id": batch["example_id"], **out}


# --------------------------------------------------------------------------------------------------
# the pass over one split


def _blocks(x: torch.Tensor, batch_size: int) -> list:
    """One Arrow table (example ids, inputs) per batch of the single-process pass: the same examples in each (token
    ids grouped by length, :func:`~kdray.core.text.length_batches`; the actor cuts each to its longest row)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    a = x.cpu().numpy()
    out = []
    for idx, _ in length_batches(x, batch_size):
        ids = idx.numpy().astype(np.int64)
        part = a[ids]
        out.append(pa.table({"example_id": pa.array(ids),
                             "x": ArrowTensorArray.from_numpy(part) if part.ndim > 1 else pa.array(part)}))
    return out


def _collect(ds: Any, n: int) -> dict[str, np.ndarray]:
    """Every column of the pass's output, in example order (checked by example id)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    ids = out.pop("example_id")
    if not np.array_equal(ids, np.arange(n)):
        order = np.argsort(ids, kind="stable")
        if not np.array_equal(ids[order], np.arange(n)):
            raise RuntimeError(f"the Ray Data teacher pass returned {len(ids)} rows for {n} examples")
        out = {k: v[order] for k, v in out.items()}
    return out


def ray_pass(loader: Loader, x: torch.Tensor, request: CacheRequest, batch_size: int, workers: int,
             use_gpu: bool) -> dict[str, np.ndarray]:
    """The teacher's outputs for all of ``x`` from ``workers`` actors of a Ray Data ``map_batches``."""
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    was = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = ray.data.from_arrow(_blocks(x, batch_size)).map_batches(
            TeacherActor, fn_constructor_args=(loader, request, use_gpu), batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1)
        return _collect(ds, len(x))
    finally:
        ctx.execution_options.preserve_order = was


def ray_outputs_fn(workers: int, use_gpu: bool, loader: Optional[Loader] = None) -> OutputsFn:
    """An ``outputs_fn`` for :func:`kdray.core.cache.get_cache` that runs each split on the actors (an empty
    split in this process: nothing to spread). Without ``loader`` the actors get the teacher that the cache
    passes in, put in the object store at the first split (a cache hit puts nothing)."""
    loaders: list[Loader] = [loader] if loader is not None else []

    def outputs(model: nn.Module, x: torch.Tensor, request: CacheRequest, batch_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
        if len(x) == 0:
            return teacher_outputs(model, x, request, batch_size, device)
        if not loaders:
            loaders.append(object_store_loader(model))
        log.info("teacher pass: %d examples on %d Ray Data actors (%s), batches of %d", len(x), workers,
                 "GPU" if use_gpu else "CPU", batch_size)
        return ray_pass(loaders[0], x, request, batch_size, workers, use_gpu)

    return outputs


def outputs_fn_for(setting: Union[int, str], loader: Optional[Loader] = None) -> Optional[OutputsFn]:
    """The Ray Data pass for ``teacher_cache.workers`` on the connected cluster, or None (no Ray, or one
    worker: the pass runs in this process, as without Ray)."""
    import ray

    if not ray.is_initialized():
        return None
    workers, use_gpu = check_workers(setting)
    return ray_outputs_fn(workers, use_gpu, loader) if workers > 1 else None


@contextlib.contextmanager
def ray_for_teacher_pass(workers: int | str, address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for ``kdray cache build`` when the teacher pass has more than one worker (or ``--address`` names a
    cluster): connected, ``teacher_cache.workers`` checked against the cluster before any work, and shut down
    (or disconnected) at the end. Without it, no Ray: the pass runs in this process."""
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError("--num-cpus", num_cpus, "1 or more (CPUs of the local Ray)")
    if address is None and local_workers(workers) <= 1:
        yield
        return
    import ray

    from kdray.search.ray_cluster import init_ray

    init_ray(address, num_cpus)
    try:
        check_workers(workers)
        yield
    finally:
        ray.shutdown()



__all__ = ["check_workers", "local_workers", "object_store_loader", "outputs_fn_for", "ray_for_teacher_pass",
           "ray_outputs_fn", "ray_pass", "TeacherActor"]
