"""One trial of a search, as Ray Tune runs it: the function trainable (a distillation run that reports every
epoch and checkpoints when it matters, or a Ray Train run of several workers), reading a finished trial's
checkpoint back, and the hard-label baseline the trials are compared with.

A trial's fixed cost is kept small: Tune reuses trial processes (``search.reuse_actors``), a process fetches the
search's prepared data and teacher once (:func:`shared_value`), and a trial checkpoints at ASHA's rungs, at its
last epoch and at most about every ``search.checkpoint_every_s`` seconds (:class:`CheckpointPlan`)."""
from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from kdray.core.checkpoint import load_state, save_state
from kdray.errors import KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import run
from kdray.experiment.space import SearchSpace, trial_raw


def for_search(space: SearchSpace, raw: dict, max_epochs: int) -> dict:
    """A trial's (or the baseline's) experiment config as a search runs it: ``max_epochs`` epochs, no batch
    progress bar, and latency measured when it is an objective."""
    raw.setdefault("train", {}).update({"epochs": max_epochs, "progress": False})
    if "latency_ms" in space.metrics:
        raw.setdefault("export", {})["measure_latency"] = True
    return raw


@dataclass(frozen=True)
class CheckpointPlan:
    """When a trial attaches its training state to an epoch's report: at ``epochs`` (ASHA's rungs, where the
    scheduler may stop it) and at its last epoch, where a trial ends with the student a registration reads; and
    after any epoch that ends ``every_s`` seconds or more after its previous checkpoint (0: after every epoch), so a
    killed trial loses at most about that much work and one epoch, while a trial of very short epochs does not
    spend them on saving."""
    epochs: tuple[int, ...] = ()
    every_s: float = 0.0

    def due(self, epoch: int, max_epochs: int, seconds_since_last: float) -> bool:
        return epoch >= max_epochs or epoch in self.epochs or seconds_since_last >= self.every_s


_SHARED: dict[str, Any] = {}  # in a trial process: ObjectRef hex id -> its value (one search's inputs at a time)


def shared_value(ref: Any) -> Any:
    """``ray.get(ref)``, once per trial process: a process that Tune reuses for trial after trial keeps the
    prepared data and teacher of its search instead of fetching and unpickling them for every trial."""
    import ray

    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # another search's inputs: let them go
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]


def trial(config: dict, *, shared: list, space_raw: dict, base_raw: dict, base_dir: str, max_epochs: int,
          workers: int, cpus_per_worker: float, gpus_per_worker: float, storage_path: str,
          checkpoints: CheckpointPlan = CheckpointPlan()) -> None:
    """The Tune function trainable: one distillation run, reporting every epoch and checkpointing when
    ``checkpoints`` says (a Ray Train trial of several workers checkpoints every epoch)."""
    from ray import tune

    space = SearchSpace.model_validate(space_raw)
    raw = for_search(space, trial_raw(space, base_raw, config), max_epochs)
    prep_ref = shared[0]
    if workers > 1:
        from kdray.search.distributed import run_torchtrainer_trial  # lazy: Ray Train only for DDP trials

        run_torchtrainer_trial(raw, prep_ref, num_workers=workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, name=f"train-{tune.get_context().get_trial_id()}",
                               storage_path=storage_path, max_epochs=max_epochs)
        return
    cfg = parse_config(raw, base_dir)
    prep = shared_value(prep_ref)
    start = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_state(d)
    run(cfg, prep, callbacks=(epoch_reporter(checkpoints, max_epochs, start),), start_state=start)


def epoch_reporter(checkpoints: CheckpointPlan, max_epochs: int, start: Optional[dict]):
    """The trial's epoch callback: every epoch's metrics to Tune (with the facts the driver and the tests read:
    ``max_epochs``, the epoch it resumed from, its node), the training state attached when ``checkpoints`` says."""
    import ray
    from ray import tune

    facts = {"max_epochs": max_epochs, "resumed_from": start["epoch"] if start else 0,
             "node_id": ray.get_runtime_context().get_node_id()}
    last = [time.perf_counter()]  # when the previous checkpoint was taken (the trial's start at first)

    def report(metrics: dict, state_fn) -> None:
        now = time.perf_counter()
        if not checkpoints.due(metrics["epoch"], max_epochs, now - last[0]):
            tune.report({**metrics, **facts})
            return
        last[0] = now
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state_fn())
            tune.report({**metrics, **facts}, checkpoint=tune.Checkpoint.from_directory(d))

    return report


def hard_label_baseline(space: SearchSpace, base_raw: dict, base_dir: Path, prep, max_epochs: int) -> dict:
    """The student of the base config trained on the labels alone, for comparison with the trials."""
    raw = trial_raw(space.model_copy(update={"methods": {}, "params": {}}), base_raw, {})
    raw.setdefault("distill", {}).update({"terms": [], "ce_weight": 1.0, "scheme": "offline"})
    s = run(parse_config(for_search(space, raw, max_epochs), base_dir), prep)
    return {"test_acc": s.test_acc, "best_val_acc": s.best_val_acc, "final_val_acc": s.final_val_acc}


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
    from kdray.tracking.registered_models import FinishedTrial  # lazy: trial workers never load MLflow

    return {str((r.metrics or {}).get("trial_id") or Path(r.path).name):
            FinishedTrial(dict(r.config or {}), dict(r.metrics or {}), functools.partial(trial_checkpoint, r))
            for r in grid}
