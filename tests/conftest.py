"""Shared fixtures: a per-session kdray cache folder, tiny MNIST-1D experiment configs and a real
``mlflow server``."""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port (SQLite backend, artifacts under tmp_path)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 150
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, store=tmp_path / "server.db", artifacts=tmp_path / "server-artifacts",
                              proc=proc)  # proc: to stop it early
    finally:  # the server and its workers are one process group: end that group only
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is when it writes (what Ray's handler means to do)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def ray_console_log_follows_this_tests_stderr():
    """Ray's console log handler keeps the ``sys.stderr`` it first saw; under pytest that is an earlier test's
    capture, closed by now, so a later ``ray.init`` in-process would print a logging traceback. Give Ray's stream
    handlers a stream that follows the current ``sys.stderr``."""
    import logging

    if "ray" in sys.modules:
        for handler in logging.getLogger("ray").handlers:
            if type(handler).__module__.startswith("ray.") and isinstance(handler, logging.StreamHandler) \
                    and not isinstance(handler.stream, _CurrentStderr):
                handler.stream = _CurrentStderr()
    yield
