"""Credentials and a tracking server that goes away, with real parts only: a real ``mlflow server`` on the loopback
(the ``mlflow_server`` fixture of conftest.py), ``kdray`` run as a user runs it (``python -m kdray.cli`` in a
subprocess, a real local Ray for a search).

* a password in the tracking URI or in ``MLFLOW_TRACKING_PASSWORD`` appears nowhere: not in the output, not in
  any file under the results storage (Tune's pickled search state included), the MLflow server's store and
  artifacts, the kdray cache, Ray's session logs; and the runs are still logged;
* the server killed during ``kdray train --track``: the training finishes, the student is saved, exit 0, a
  warning names the URI and what was not logged;
* a deleted experiment: exit 2 naming ``--experiment`` before any work, nothing left behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kdray.tracking.client import resolve_tracking_uri

pytestmark = pytest.mark.slow

PASSWORD = "S3cr3tPassw0rd"
HELPERS = Path(__file__).resolve().parent / "helpers"
SPACE = {"name": "secret-search", "base": "base.yaml",
         "methods": {"kd": [{"method": "kd", "temperature": {"float": [1.0, 8.0], "log": True}}]},
         "search": {"num_trials": 2, "concurrency": 2, "scheduler": "none", "max_epochs": 1, "searcher": "random",
                    "seed": 0}}
CRED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def kdray(args: list[str], log: Path, cwd: Path, timeout_s: float = 240, **env: str) -> subprocess.CompletedProcess:
    """``python -m kdray.cli ARGS`` with tests/helpers importable; stdout and stderr kept apart and in ``log``."""
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    full_env = {k: v for k, v in os.environ.items() if k not in CRED_ENV} | {"PYTHONPATH": path, **env}
    done = subprocess.run([sys.executable, "-m", "kdray.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout_s)
    log.write_text(done.stdout + "\n" + done.stderr)
    return done


def files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes hold ``secret`` (plain, or as UTF-16 as some pickles keep text)."""
    needles = (secret.encode(), secret.encode("utf-16-le"))
    hits = []
    for root in roots:
        for f in [root] if root.is_file() else root.rglob("*"):
            with contextlib.suppress(OSError):
                if f.is_file() and not f.is_symlink() and any(n in f.read_bytes() for n in needles):
                    hits.append(str(f))
    return hits


def experiment_runs(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r}"
    return list(client.search_runs([exp.experiment_id], max_results=100))


@pytest.fixture
def work(tmp_path, tiny_raw):
    """A working folder with the tiny config and a two-trial, one-epoch search space over it."""
    d = tmp_path / "work"
    d.mkdir()
    tiny_raw["train"]["epochs"] = 1
    (d / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    (d / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return d


def test_tracking_uri_credentials_move_to_mlflows_environment(monkeypatch):
    for k in CRED_ENV + ("MLFLOW_TRACKING_URI",):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    from mlflow.utils.credentials import get_default_host_creds

    uri, _ = resolve_tracking_uri(f"http://kdray:{PASSWORD}@127.0.0.1:5000")
    assert uri == "http://127.0.0.1:5000"
    creds = get_default_host_creds(uri)  # what MLflow's REST client authenticates with
    assert (creds.username, creds.password) == ("kdray", PASSWORD)


def test_a_password_appears_nowhere_and_the_runs_are_logged(work, mlflow_server, kdray_cache):
    port = mlflow_server.port
    ray_tmp = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's sockets want a short path
    try:
        t0 = time.perf_counter()
        common = ["--no-progress", "--no-baseline", "--num-cpus", "2"]
        runs = {
            "in-uri": kdray(["search", "space.yaml", "--storage-path", "res-a", "--experiment", "in-uri", *common,
                             "--tracking-uri", f"http://kdray:{PASSWORD}@127.0.0.1:{port}"], work / "a.log", work,
                            RAY_TMPDIR=str(ray_tmp)),
            "in-env": kdray(["search", "space.yaml", "--storage-path", "res-b", "--experiment", "in-env", *common,
                             "--tracking-uri", f"http://127.0.0.1:{port}"], work / "b.log", work,
                            RAY_TMPDIR=str(ray_tmp), MLFLOW_TRACKING_USERNAME="kdray",
                            MLFLOW_TRACKING_PASSWORD=PASSWORD),
            "train": kdray(["train", "base.yaml", "--track", "--experiment", "train", "--output-dir", "out",
                            "--tracking-uri", f"http://kdray:{PASSWORD}@127.0.0.1:{port}"], work / "c.log", work)}
        seconds = time.perf_counter() - t0
        for name, done in runs.items():
            assert done.returncode == 0, (name, done.stderr[-4000:])
            assert PASSWORD not in done.stdout + done.stderr, name
        assert "MLflow: experiment 'train' at http://127.0.0.1:" in runs["train"].stdout
        client = MlflowClient(mlflow_server.url)
        for name in ("in-uri", "in-env"):  # the credentials still reached MLflow: parent + 2 trials, all ended
            logged = experiment_runs(client, name)
            assert len(logged) == 3 and all(r.info.status == "FINISHED" for r in logged), name
            assert any("val_acc" in r.data.metrics for r in logged), name
        (train_run,) = experiment_runs(client, "train")
        assert train_run.info.status == "FINISHED" and "test_acc" in train_run.data.metrics
        assert list((work / "res-a" / "secret-search").rglob("*.pkl")), "no pickled search state to check"
        # the whole test folder: output logs, both results storages (Tune's pickled state, result.json files),
        # the saved student, the server's SQLite store and artifacts; and the kdray cache and Ray's logs
        assert files_holding(PASSWORD, work.parent, kdray_cache, ray_tmp) == []
        print(f"3 runs in {seconds:.0f} s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_tracking_server_lost_mid_train_the_training_finishes_and_says_what_was_not_logged(work, mlflow_server,
                                                                                         tiny_raw):
    tiny_raw["student"] = {"name": "slow_models:slow_mlp", "kwargs": {"delay_s": 0.05}}  # ~0.7 s per epoch
    tiny_raw["train"]["epochs"] = 6
    (work / "slow.yaml").write_text(yaml.safe_dump(tiny_raw))
    uri = f"http://kdray:{PASSWORD}@127.0.0.1:{mlflow_server.port}"
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if k not in CRED_ENV} | {"PYTHONPATH": path}
    log = open(work / "train.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kdray.cli", "train", "slow.yaml", "--track", "--experiment",
                             "lost", "--output-dir", "out", "--tracking-uri", uri], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client, deadline = MlflowClient(mlflow_server.url), time.time() + 150
        while not _first_epoch_logged(client):
            assert proc.poll() is None and time.time() < deadline, "no epoch was logged before the training ended"
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # the server and its workers: one process group
            os.killpg(mlflow_server.proc.pid, signal.SIGTERM)
        mlflow_server.proc.wait(timeout=30)
        proc.wait(timeout=60)  # 5 epochs of ~0.7 s left, and one failed write: no stall
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    out = (work / "train.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert (work / "out" / "student.pt").is_file()
    assert f"MLflow (http://127.0.0.1:{mlflow_server.port}): some writes failed" in out, out[-4000:]
    assert "not logged" in out and "epoch metrics" in out and "student is saved in" in out, out[-4000:]
    assert "Traceback" not in out and PASSWORD not in out, out[-4000:]


def _first_epoch_logged(client: MlflowClient) -> bool:
    exp = client.get_experiment_by_name("lost")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return any("val_acc" in r.data.metrics for r in runs)


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_deleted_experiment_is_refused_before_any_work(work, mlflow_server, command):
    client = MlflowClient(mlflow_server.url)
    client.delete_experiment(client.create_experiment("gone"))
    args = (["train", "base.yaml", "--track", "--output-dir", "out"] if command == "train" else
            ["search", "space.yaml", "--storage-path", "res", "--no-progress", "--no-baseline"])
    done = kdray([*args, "--experiment", "gone", "--tracking-uri", mlflow_server.url], work / "gone.log", work,
                 timeout_s=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "kdray: error: --experiment: got 'gone'" in done.stderr and "mlflow experiments restore" in done.stderr
    assert "Traceback" not in done.stderr
    exp = client.get_experiment_by_name("gone")
    assert exp.lifecycle_stage == "deleted"
    assert client.search_runs([exp.experiment_id], run_view_type=3) == []  # ViewType.ALL: no run, not even deleted
    assert not (work / "out").exists() and not (work / "res").exists()
