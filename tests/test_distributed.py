"""The Ray Train path on a real local Ray (2 CPUs): a Tune trial that trains one student on two DDP
workers, reports every epoch to Tune, checkpoints from rank 0 and resumes from its checkpoint."""
from __future__ import annotations

import copy
import math
import os
import pickle
from pathlib import Path

import pytest
import ray
import torch
from ray import tune

from kdray.errors import ConfigError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import prepare
from kdray.models import build_model
from kdray.search.distributed import DRIVER_RESOURCES, STATE_FILE, run_torchtrainer_trial, tune_resources_for

POLL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRIAL_NAME = "kd-trial"  # the inner Train run's name; the search derives it from the Tune trial id


def _raw():
    from tests.conftest import TINY

    return copy.deepcopy(TINY)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with 2 CPUs, the tiny experiment prepared once and put in the object store."""
    # Train's controller polls its workers every 2 s by default, which adds seconds to the end of each
    # run; polling faster keeps this module quick. Ray processes inherit the variable from ray.init.
    old = os.environ.get(POLL_VAR)
    os.environ[POLL_VAR] = "0.2"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prep = prepare(parse_config(_raw()))
        yield {"prep": prep, "ref": ray.put(prep), "storage": str(tmp_path_factory.mktemp("ray-storage"))}
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(POLL_VAR, None)
        else:
            os.environ[POLL_VAR] = old


def _search(cluster, experiment: str, max_epochs: int):
    """A Tune search of one trial whose function trainable drives a 2-worker TorchTrainer."""
    raw, ref, storage = _raw(), cluster["ref"], cluster["storage"]

    def trainable(config):
        run_torchtrainer_trial(raw, ref, num_workers=2, cpus_per_worker=1, gpus_per_worker=0, name=TRIAL_NAME,
                               storage_path=storage, max_epochs=config["max_epochs"])

    tuner = tune.Tuner(tune.with_resources(trainable, tune_resources_for(2, 1, 0)),
                       param_space={"max_epochs": max_epochs},
                       run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=0))
    grid = tuner.fit()
    assert grid.num_errors == 0, grid.errors
    result = grid[0]
    rows = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}  # absent metrics
            for r in result.metrics_dataframe.to_dict("records")]
    return result, rows


@pytest.fixture(scope="module")
def first_run(cluster):
    return _search(cluster, "first", max_epochs=2)


def _load_state(path: str) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def test_two_workers_report_every_epoch_to_tune(first_run, cluster):
    result, rows = first_run
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["val_acc"] <= 1
        assert {"loss", "loss_ce", "loss_kd", "val_loss"} <= set(r)
        assert r["checkpoint_path"]  # each epoch checkpointed (by rank 0)
    assert "test_acc" not in rows[0] and 0 <= rows[-1]["test_acc"] <= 1

    # Both workers took part. Only rank 0's metrics reach Tune, so rank 0 reports what needed rank 1:
    # `world_size` is the Train context's, and `replica_param_spread` is max - min over the ranks of a
    # checksum of the DDP-wrapped distiller's parameters, computed with an all-reduce over the process
    # group (it could not complete without rank 1). Rank 1 trained on a different shard of the data, so
    # its parameters match rank 0's bit for bit only because DDP averaged the gradients of both ranks.
    assert all(r["world_size"] == 2 for r in rows)
    assert all(r["replica_param_spread"] == 0.0 for r in rows)

    # The checkpoint is the model rank 0 reported: its student reproduces the reported test accuracy.
    state = _load_state(result.metrics["checkpoint_path"])
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    prep = cluster["prep"]
    student = build_model(parse_config(_raw()).student, prep.bundle.num_classes)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["distiller"].items()
                             if k.startswith("student.")})
    with torch.no_grad():
        acc = (student.eval()(prep.bundle.x_test).argmax(1) == prep.bundle.y_test).float().mean().item()
    assert acc == pytest.approx(rows[-1]["test_acc"])


def test_a_trial_with_a_checkpoint_resumes_from_it(first_run, cluster):
    # A new trial driving a Train run of the same name and storage (what a restarted Tune trial does)
    # continues after the last checkpointed epoch: it trains and reports only epoch 3.
    _, first_rows = first_run
    result, rows = _search(cluster, "resumed", max_epochs=3)
    assert [r["epoch"] for r in rows] == [3]
    assert rows[0]["world_size"] == 2 and rows[0]["replica_param_spread"] == 0.0 and "test_acc" in rows[0]
    state = _load_state(result.metrics["checkpoint_path"])
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert [h["val_acc"] for h in state["history"][:2]] == [r["val_acc"] for r in first_rows]


def test_resources_of_the_tune_trial():
    # A driver of several workers holds no CPU or GPU (the workers reserve their own), so 2 x 1-CPU workers
    # fit on a 2-CPU machine; a single-worker trial trains in the trial itself and reserves the worker.
    assert tune_resources_for(2, 1, 0) == DRIVER_RESOURCES
    assert DRIVER_RESOURCES["cpu"] == 0 and DRIVER_RESOURCES["gpu"] == 0
    assert tune_resources_for(4, 2, 0.5) == DRIVER_RESOURCES
    assert tune_resources_for(1, 2, 0.5) == {"cpu": 2.0, "gpu": 0.5}
    with pytest.raises(ConfigError):
        tune_resources_for(0, 1, 0)


def test_a_workers_kdray_error_reaches_the_driver_as_itself():
    # kdray's errors pickle with their fields (Ray sends them between processes); the driver raises the
    # original class with its message and fields.
    from ray.train import WorkerGroupError

    from kdray.errors import DivergedError
    from kdray.search.distributed import DistributedTrialError, _trial_error

    sent = pickle.loads(pickle.dumps(DivergedError(3, "kd", float("inf"))))
    err = _trial_error("t", 2, WorkerGroupError("worker failed", {1: sent}))
    assert isinstance(err, DivergedError) and (err.epoch, err.term) == (3, "kd") and "'kd'" in str(err)
    cfg = pickle.loads(pickle.dumps(ConfigError("student_layers", "nope", "a module path")))
    assert isinstance(_trial_error("t", 2, WorkerGroupError("x", {0: cfg})), ConfigError) and cfg.value == "nope"
    other = _trial_error("t", 2, WorkerGroupError("x", {0: RuntimeError("boom")}))
    assert isinstance(other, DistributedTrialError) and "'t'" in str(other)


def test_online_scheme_is_refused_on_several_workers():
    raw = _raw()
    raw["distill"]["scheme"] = "online"
    with pytest.raises(ConfigError, match="distill.scheme"):
        run_torchtrainer_trial(raw, None, num_workers=2, cpus_per_worker=1, gpus_per_worker=0, name="x",
                               storage_path="/nonexistent", max_epochs=1)
