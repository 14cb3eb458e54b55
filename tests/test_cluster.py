"""A search on a real two-node Ray cluster on loopback: a head and a worker node started as separate
``ray start`` processes with token auth, 2-worker Ray Train trials, and evidence that the trials used both
nodes. Everything started here is stopped here; only loopback addresses are used: the nodes run on
127.0.0.2 because ``ray start`` replaces 127.0.0.1 by the machine's outward address."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers.processes import HOST, free_port, stop_processes
from helpers.searches import SPACE


@pytest.fixture
def two_node_cluster():
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = Path(tempfile.mkdtemp(prefix="kdr-"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    common = ["--num-cpus", "1", "--node-ip-address", HOST, "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", str(temp), *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", "--address", f"{HOST}:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        yield f"{HOST}:{port}", env
    finally:
        stop_processes([str(temp), f"{HOST}:{port}"])  # only this cluster's processes
        shutil.rmtree(temp, ignore_errors=True)


def test_two_node_search_with_two_worker_trials(tmp_path, tiny_raw, two_node_cluster):
    address, env = two_node_cluster
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    space = dict(SPACE, methods={"kd": SPACE["methods"]["kd"]},
                 search={"num_trials": 2, "concurrency": 1, "max_epochs": 2, "scheduler": "none",
                         "workers_per_trial": 2, "cpus_per_worker": 1})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    storage = tmp_path / "results"  # one machine: a local folder is shared storage for both nodes
    cmd = [sys.executable, "-m", "kdray.cli", "search", str(tmp_path / "space.yaml"), "--address", address,
           "--storage-path", str(storage), "--no-progress", "--no-baseline"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    rows = [json.loads(line) for f in (storage / "tiny-search").glob("*/result.json")
            for line in f.read_text().splitlines() if line.strip()]
    assert len({r["trial_id"] for r in rows}) == 2
    assert all(r["world_size"] == 2 for r in rows)
    assert all(r["num_nodes"] == 2 for r in rows), [r.get("worker_nodes") for r in rows]
    assert all(r["replica_param_spread"] == 0.0 for r in rows)  # DDP kept the replicas identical
    assert {r["epoch"] for r in rows} == {1, 2}
    assert {r["node_ip"] for r in rows} == {HOST}  # nothing ran on a non-loopback address
