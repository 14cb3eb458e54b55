"""Shared fixtures: a per-session kdray cache folder and tiny MNIST-1D experiment configs."""
from __future__ import annotations

import copy
import os

import pytest

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "mnist1d", "label_fraction": 0.2, "val_fraction": 0.2, "batch_size": 50,
             "params": {"num_samples": 1000}},
    "teacher": {"model": {"name": "mnist1d_cnn", "kwargs": {"channels": 16}},
                "recipe": {"train": {"epochs": 4, "progress": False}}},
    "student": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 4}},
    "distill": {"temperature": 4.0, "ce_weight": 0.5,
                "terms": [{"method": "kd", "weight": 0.5}]},
    "train": {"epochs": 2, "progress": False},
}


@pytest.fixture(scope="session", autouse=True)
def kdray_cache(tmp_path_factory):
    """One cache folder for the whole session (generated data and teachers are reused across tests)."""
    path = tmp_path_factory.mktemp("kdray-cache")
    old = os.environ.get("KDRAY_CACHE_DIR")
    os.environ["KDRAY_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KDRAY_CACHE_DIR", None)
    else:
        os.environ["KDRAY_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """A session-wide SQLite MLflow store, so searches in tests never write ./mlflow.db."""
    path = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
    yield path
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def tiny_raw():
    """A fresh copy of the tiny experiment config as a dict (edit freely)."""
    return copy.deepcopy(TINY)
