"""infra/local end to end: start.sh brings up a Ray head, a Ray worker node (token auth, loopback only) and an
MLflow server; a search submitted with `ray job submit` and one run with `--address` both complete and log
to that server; stop.sh stops everything start.sh started."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num-trials", "2", "--max-epochs", "2", "--no-baseline", "--no-progress"]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def read_env(path: Path, env: dict) -> dict[str, str]:
    """The environment after sourcing env.sh (as a user would)."""
    out = subprocess.run(["bash", "-c", f". {shlex.quote(str(path))} && env -0"], env=env, capture_output=True,
                         check=True).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("aiohttp", reason="ray job submit needs ray[default] (the dev extra installs it)")
    state = tmp_path_factory.mktemp("local-cluster")
    env = {**os.environ, "KDRAY_LOCAL_DIR": str(state), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(["bash", str(ROOT / "infra/local/start.sh"), "--free-ports"], env=env,
                             capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield read_env(state / "env.sh", env), state
    finally:
        stopped = subprocess.run(["bash", str(ROOT / "infra/local/stop.sh")], env=env, capture_output=True,
                                 text=True, timeout=180)
        left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        assert left.stdout.strip() == "", f"processes left running: {left.stdout}"


def test_job_submit_and_address_searches_log_to_the_local_mlflow_server(cluster, tmp_path):
    from mlflow import MlflowClient

    env, state = cluster
    ray_address, mlflow_uri = env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"]
    assert ray_address.startswith("127.") and mlflow_uri.startswith("http://127.0.0.1:")
    space = str(ROOT / "search_spaces/quickstart.yaml")
    dashboard = env["RAY_API_SERVER_ADDRESS"]
    assert dashboard.startswith("http://127.0.0.1:")
    job = subprocess.run(
        [_bin("ray"), "job", "submit", "--address", dashboard, "--", _bin("kdray"), "search", space, "--address",
         "auto", "--storage-path", str(tmp_path / "job"), "--tracking-uri", mlflow_uri, "--experiment", "via-job",
         *QUICK], env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-3000:]
    rows = [json.loads(line) for f in (tmp_path / "job").rglob("result.json")
            for line in f.read_text().splitlines() if line.strip()]
    assert len({r["node_id"] for r in rows}) == 2, "the job's trials did not use both nodes"
    direct = subprocess.run(
        [_bin("kdray"), "search", space, "--address", ray_address, "--storage-path", str(tmp_path / "direct"),
         "--experiment", "via-address", *QUICK], env=env, capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
    c = MlflowClient(mlflow_uri)
    for name in ("via-job", "via-address"):
        exp = c.get_experiment_by_name(name)
        runs = c.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("kdray.role") == "search"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and len(children) == 2, name
        assert all(r.info.status == "FINISHED" for r in runs), name
        assert parents[0].data.tags["kdray.ray_address"] in ("auto", ray_address)
        assert c.get_model_version_by_alias(f"{name}-student", "challenger").run_id in {r.info.run_id for r in children}


def test_a_two_node_teacher_pass_and_a_search_read_the_cache_on_shared_storage(cluster, tmp_path, tiny_raw):
    """`kdray cache build --address` with teacher_cache.workers 2 runs one teacher actor on each node and writes
    the entry the single-process pass writes to a `file://` cache (a folder every node mounts); a search on the
    two nodes then has its trials read the entry there instead of through the driver."""
    from helpers.searches import write_space

    env, _ = cluster
    env = {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}  # the teacher (trained once) and data, for every run
    entries = {}
    for name, workers, address in (("single", 1, []), ("spread", 2, ["--address", env["RAY_ADDRESS"]])):
        tiny_raw["teacher_cache"] = {"workers": workers}
        (tmp_path / name).mkdir()
        space = write_space(tmp_path / name, tiny_raw, search={"num_trials": 2, "concurrency": 2, "max_epochs": 1,
                                                               "scheduler": "none"})
        uri = f"file://{tmp_path}/{name}-cache"
        built = subprocess.run([_bin("kdray"), "cache", "build", str(space), "--cache-dir", uri, *address], env=env,
                               capture_output=True, text=True, timeout=600)
        assert built.returncode == 0 and "\nbuilt " in "\n" + built.stdout, built.stdout[-3000:] + built.stderr[-3000:]
        [key] = [p for p in (tmp_path / f"{name}-cache/teacher_outputs").iterdir()]
        entries[name] = json.loads((key / "manifest.json").read_text())
        if workers == 2:
            assert "on 2 Ray Data actors (CPU)" in built.stderr, built.stderr[-3000:]
    assert entries["spread"]["key"] == entries["single"]["key"]
    assert entries["spread"]["files"] == entries["single"]["files"]  # same bytes: the same checksums
    search = subprocess.run(
        [_bin("kdray"), "search", str(tmp_path / "spread/space.yaml"), "--address", env["RAY_ADDRESS"],
         "--storage-path", str(tmp_path / "results"), "--no-tracking", "--no-baseline", "--no-progress"],
        env={**env, "KDRAY_CACHE_DIR": f"file://{tmp_path}/spread-cache"}, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    assert "teacher cache: hit" in search.stderr
    assert f"trials read entry {entries['spread']['key']} from shared storage file://" in search.stderr
