"""Faults a long search must survive, each provoked for real: a trial's process SIGKILLed mid-epoch, the driver
stopped with SIGTERM and resumed, the worker node of a two-node cluster lost, and the MLflow server going away
mid-search. Every search runs as a user runs it (``python -m kdray.cli search`` in a subprocess, a real local
Ray, MLflow in a SQLite file or a real ``mlflow server``); every wait is bounded and every process started here
is stopped here.

The student is ``slow_models:slow_mlp`` (tests/helpers): its training steps sleep a fixed time, so an epoch
takes about a second and a fault lands *during* training, not after a trial that took 50 ms is already over.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.mlflow_runs import all_runs
from helpers.processes import HOST, free_port, stop_processes
from helpers.searches import SPACE, finished_epochs, write_space
from mlflow import MlflowClient

from kdray.search.results import read_results
from kdray.tracking.client import PARENT_ID_FILE

pytestmark = pytest.mark.slow

HELPERS = Path(__file__).resolve().parent / "helpers"
KD_ONLY = {"kd": SPACE["methods"]["kd"]}


def slow_student(raw: dict, delay_s: float) -> dict:
    """The tiny config with a student whose every training step sleeps ``delay_s`` (~13 steps per epoch)."""
    raw["student"] = {"name": "slow_models:slow_mlp", "kwargs": {"delay_s": delay_s}}
    return raw


def search_env(**extra: str) -> dict:
    """The test's environment (KDRAY_CACHE_DIR of the session included) with tests/helpers importable by the
    driver and, through it, by every Ray worker."""
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def search_cmd(space: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdray.cli", "search", str(space), "--storage-path", str(storage), "--no-progress",
            "--no-baseline", *extra]


def trial_rows(exp: Path) -> dict[str, list[dict]]:
    """Trial folder -> its result.json rows (one per reported epoch)."""
    out = {}
    for f in exp.glob("*/result.json"):
        with contextlib.suppress(ValueError):  # a line being written right now
            out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail with the driver's output if the driver exits
    or the time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the search exited ({proc.returncode}) before {what}:\n{output_of(proc)[-4000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def output_of(proc: subprocess.Popen) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text(errors="replace")


@contextlib.contextmanager
def driver(cmd: list[str], log_path: Path, env: dict):
    """A ``kdray search`` process in its own process group (its local Ray included): SIGKILLed as a group at the
    end whatever happened, so no test leaves a Ray behind."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # Ray processes it started, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def runs_by_trial(client: MlflowClient, experiment: str) -> tuple[list, dict[str, list]]:
    """(parent runs, trial id -> its child runs) of an MLflow experiment."""
    runs = all_runs(client, experiment)
    parents = [r for r in runs if r.data.tags.get("kdray.role") == "search"]
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            children.setdefault(r.data.tags["kdray.trial_id"], []).append(r)
    return parents, children


# --------------------------------------------------------------------------------------------------
# 1. a trial's process killed mid-epoch


def test_a_trial_process_killed_mid_epoch_resumes_from_its_checkpoint_with_one_run(tmp_path, tiny_raw):
    space = write_space(tmp_path, slow_student(tiny_raw, 0.1), name="killed-trial", methods=KD_ONLY,
                        search={"num_trials": 2, "concurrency": 2, "max_epochs": 4, "scheduler": "none",
                                "max_failures": 2})
    exp, uri = tmp_path / "results" / "killed-trial", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = search_cmd(space, tmp_path / "results", "--tracking-uri", uri, "--num-cpus", "2", "--register-top", "0")

    def mid_trial():  # a trial that reported an epoch, not its last one: (folder, its pid, its last epoch)
        for name, rows in trial_rows(exp).items():
            if rows and 1 <= rows[-1]["epoch"] < rows[-1]["max_epochs"]:
                return name, rows[-1]["pid"], rows[-1]["epoch"]
        return None

    with driver(cmd, tmp_path / "search.log", search_env()) as proc:
        victim, pid, epoch = wait_for("a trial reporting its first epochs", mid_trial, proc, timeout_s=150, poll_s=0.1)
        os.kill(pid, signal.SIGKILL)  # the trial's Ray worker process, during its next epoch
        proc.wait(timeout=150)
        log = output_of(proc)
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log.split("Trial task failed")[0]  # nothing but Tune's report of the dead worker

    rows = trial_rows(exp)[victim]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # every epoch once: continued, not restarted at epoch 1
    after = [r for r in rows if r["pid"] != pid]
    assert after and all(r["pid"] == after[0]["pid"] for r in after)  # one new process finished the trial
    assert after[0]["resumed_from"] >= epoch >= 1  # ... from the checkpoint of an epoch reported before the kill
    assert after[0]["epoch"] == after[0]["resumed_from"] + 1
    assert all(r["resumed_from"] == 0 for r in rows if r["pid"] == pid)
    df = read_results(str(exp))
    assert list(df["status"]) == ["finished", "finished"] and (df["epochs"] == 4).all()

    c = MlflowClient(uri)
    parents, children = runs_by_trial(c, "killed-trial")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(df["trial_id"])
    victim_id = rows[0]["trial_id"]
    [run] = children[victim_id]  # exactly one child run for the retried trial
    assert run.info.status == "FINISHED" and run.data.tags["kdray.status"] == "finished"
    assert run.data.tags["kdray.retries"] == "1"
    assert "died" in run.data.tags["kdray.retry_1_error"]  # Ray's word for the killed worker
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_acc")) == [1, 2, 3, 4]
    [other] = [runs for tid, runs in children.items() if tid != victim_id]
    assert len(other) == 1 and "kdray.retries" not in other[0].data.tags


# --------------------------------------------------------------------------------------------------
# 2. the driver stopped with SIGTERM, then resumed


def test_sigterm_kills_the_runs_registers_nothing_and_resume_finishes_under_the_same_parent(tmp_path, tiny_raw):
    space = write_space(tmp_path, slow_student(tiny_raw, 0.05), name="sigterm-search", methods=KD_ONLY,
                        search={"num_trials": 3, "concurrency": 1, "max_epochs": 3, "scheduler": "none",
                                "max_failures": 1})
    storage, uri = tmp_path / "results", f"sqlite:///{tmp_path}/mlflow.db"
    exp = storage / "sigterm-search"
    cmd = search_cmd(space, storage, "--tracking-uri", uri, "--num-cpus", "2")

    def one_done_one_running():
        rows = trial_rows(exp)
        done = [n for n, r in rows.items() if r and r[-1]["epoch"] == r[-1]["max_epochs"]]
        running = [n for n, r in rows.items() if r and r[-1]["epoch"] < r[-1]["max_epochs"]]
        return done and running

    with driver(cmd, tmp_path / "search.log", search_env()) as proc:
        wait_for("a finished trial and a running one", one_done_one_running, proc, timeout_s=200)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log = output_of(proc)
    assert proc.returncode == 130, log[-4000:]
    assert "kdray: interrupted" in log and "--resume" in log and "Traceback" not in log, log[-4000:]

    c = MlflowClient(uri)
    parents, children = runs_by_trial(c, "sigterm-search")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "KILLED" and parent.data.tags["kdray.status"] == "killed"
    assert (exp / PARENT_ID_FILE).read_text().strip() == parent.info.run_id
    statuses = {tid: runs[0].info.status for tid, runs in children.items()}
    assert "RUNNING" not in statuses.values() and "KILLED" in statuses.values(), statuses
    assert "FINISHED" in statuses.values(), statuses
    assert not c.search_registered_models() and not c.search_model_versions()  # nothing half-registered
    before = finished_epochs(exp)
    assert 1 <= len(before) < 3

    done = subprocess.run(cmd + ["--resume"], env=search_env(), capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = finished_epochs(exp)
    assert len(after) == 3
    for trial, epochs in before.items():
        assert after[trial] == epochs == [1, 2, 3]  # a finished trial did not run again
    df = read_results(str(exp))
    assert (df["status"] == "finished").sum() == 3

    parents, children = runs_by_trial(c, "sigterm-search")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent run, continued
    assert (exp / PARENT_ID_FILE).read_text().strip() == parent.info.run_id
    resumed = c.get_run(parent.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["kdray.resumes"] == "1"
    assert sorted(children) == sorted(df["trial_id"])
    for tid, runs in children.items():
        assert len(runs) == 1, tid  # one child run per trial, the interrupted one reopened
        assert runs[0].info.status == "FINISHED" and runs[0].data.tags["kdray.status"] == "finished"
        assert sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "val_acc")) == [1, 2, 3]
    mv = c.get_model_version_by_alias("sigterm-search-student", "challenger")  # registered once it finished
    assert mv.run_id in {runs[0].info.run_id for runs in children.values()}


# --------------------------------------------------------------------------------------------------
# 3. the worker node of a two-node cluster lost mid-search


@pytest.fixture
def head_and_worker():
    """A two-node Ray cluster on loopback as in tests/test_cluster.py (separate ``ray start`` processes, token
    auth, 1 CPU each), but the worker node has its own temp dir, so that its processes, and only they, can be
    found and killed: yields (address, env, head temp dir, worker temp dir)."""
    import secrets

    ray_bin = str(Path(sys.executable).with_name("ray"))
    head_temp = Path(tempfile.mkdtemp(prefix="kdr-h-"))  # short: Ray's socket paths have a length limit
    worker_temp = Path(tempfile.mkdtemp(prefix="kdr-w-"))
    port = free_port()
    env = search_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    common = ["--num-cpus", "1", "--node-ip-address", HOST, "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", str(head_temp), *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", "--address", f"{HOST}:{port}", "--temp-dir", str(worker_temp), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"{HOST}:{port}", env, head_temp, worker_temp
    finally:
        workers = node_processes(head_temp) | node_processes(worker_temp)  # their workers too (renamed by Ray)
        stop_processes([str(head_temp), str(worker_temp), f"{HOST}:{port}"])  # only this cluster's processes
        kill_all(workers)
        shutil.rmtree(head_temp, ignore_errors=True)
        shutil.rmtree(worker_temp, ignore_errors=True)


def _parent_and_cmdline(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1]), cmdline


def node_of(pid: int, head_temp: Path, worker_temp: Path) -> str | None:
    """"head" or "worker": the node a process belongs to (None if it is gone). Ray workers rename themselves
    (``ray::ImplicitFunc``), but their parent is their node's raylet, whose command line names the node's temp
    dir."""
    try:
        while pid > 1:
            ppid, cmdline = _parent_and_cmdline(pid)
            if str(worker_temp) in cmdline:
                return "worker"
            if str(head_temp) in cmdline:
                return "head"
            pid = ppid
    except (OSError, ValueError, IndexError):
        return None
    return None


def node_processes(temp: Path) -> set[int]:
    """Every process of the node with this temp dir: its raylet and daemons, and all their descendants (the
    workers, whose command lines do not name the temp dir)."""
    tree: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                tree[int(d.name)] = _parent_and_cmdline(int(d.name))
    found = {pid for pid, (_, cmd) in tree.items() if str(temp) in cmd}
    while True:
        more = {pid for pid, (ppid, _) in tree.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def test_losing_the_worker_node_reschedules_its_trials_on_the_head(tmp_path, tiny_raw, head_and_worker):
    address, env, head_temp, worker_temp = head_and_worker
    space = write_space(tmp_path, slow_student(tiny_raw, 0.1), name="node-lost", methods=KD_ONLY,
                        search={"num_trials": 3, "concurrency": 2, "max_epochs": 3, "scheduler": "none",
                                "max_failures": 3, "cpus_per_worker": 1})
    exp = tmp_path / "results" / "node-lost"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = search_cmd(space, tmp_path / "results", "--address", address, "--tracking-uri", uri, "--register-top", "0")
    nodes: dict[int, str] = {}  # pid of every trial process seen -> its node

    def see() -> None:
        for rows in trial_rows(exp).values():
            for r in rows:
                if r["pid"] not in nodes and (node := node_of(r["pid"], head_temp, worker_temp)):
                    nodes[r["pid"]] = node

    def on_worker_node():  # a trial on the worker node that reported an epoch, not its last one
        see()
        for name, rows in trial_rows(exp).items():
            if rows and rows[-1]["epoch"] < rows[-1]["max_epochs"] and nodes.get(rows[-1]["pid"]) == "worker":
                return name, rows[-1]["pid"]
        return None

    with driver(cmd, tmp_path / "search.log", env) as proc:
        victim, pid = wait_for("a trial reporting from the worker node", on_worker_node, proc, timeout_s=150,
                               poll_s=0.1)
        doomed = node_processes(worker_temp)
        assert pid in doomed and not doomed & node_processes(head_temp)
        kill_all(doomed)  # the whole worker node at once: its raylet, daemons and workers
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            see()
            time.sleep(0.2)
        if proc.poll() is None:
            pytest.fail("the search did not end within 180 s of losing the worker node:\n" + output_of(proc)[-4000:])
        log = output_of(proc)
    assert proc.returncode == 0, log[-4000:]
    assert not node_processes(worker_temp)  # the node stayed dead: its trials finished elsewhere

    rows = trial_rows(exp)
    assert len(rows) == 3 and all(r and r[-1]["epoch"] == 3 for r in rows.values())
    after = [r for r in rows[victim] if r["pid"] != pid]
    assert [r["epoch"] for r in rows[victim]] == [1, 2, 3]  # continued from its checkpoint, not restarted
    assert after and after[0]["resumed_from"] >= 1
    assert {nodes.get(r["pid"]) for r in after} == {"head"}, nodes  # rescheduled on the head
    df = read_results(str(exp))
    assert (df["status"] == "finished").sum() == 3 and (df["epochs"] == 3).all()
    c = MlflowClient(uri)
    parents, children = runs_by_trial(c, "node-lost")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(df["trial_id"]) and all(len(r) == 1 for r in children.values())
    assert all(r[0].info.status == "FINISHED" for r in children.values())
    [run] = children[rows[victim][0]["trial_id"]]
    assert int(run.data.tags["kdray.retries"]) >= 1  # the retry is on the trial's one run


# --------------------------------------------------------------------------------------------------
# 4. the MLflow server goes away mid-search


def test_tracking_server_lost_mid_search_trials_finish_and_say_what_was_not_logged(tmp_path, tiny_raw,
                                                                                  mlflow_server):
    space = write_space(tmp_path, slow_student(tiny_raw, 0.05), name="server-lost", methods=KD_ONLY,
                        search={"num_trials": 2, "concurrency": 2, "max_epochs": 4, "scheduler": "none"})
    exp = tmp_path / "results" / "server-lost"
    cmd = search_cmd(space, tmp_path / "results", "--tracking-uri", mlflow_server.url, "--num-cpus", "2")
    with driver(cmd, tmp_path / "search.log", search_env()) as proc:
        wait_for("a first epoch result", lambda: any(r for r in trial_rows(exp).values()), proc, timeout_s=150)
        with contextlib.suppress(ProcessLookupError):  # the server and its workers: one process group
            os.killpg(mlflow_server.proc.pid, signal.SIGTERM)
        mlflow_server.proc.wait(timeout=30)
        try:
            proc.wait(timeout=60)  # 4 epochs of ~0.7 s left: no reason to take longer without the server
        except subprocess.TimeoutExpired:
            pytest.fail("the search stalled after the MLflow server went away; trial epochs so far: "
                        f"{ {n[:14]: [r['epoch'] for r in rows] for n, rows in trial_rows(exp).items()} }")
        log = output_of(proc)
    rows = trial_rows(exp)
    assert len(rows) == 2 and all([r["epoch"] for r in rs] == [1, 2, 3, 4] for rs in rows.values()), rows
    assert "Traceback" not in log, log[-4000:]
    assert "not logged" in log, log[-4000:]  # what MLflow is missing, said at the end
    if proc.returncode != 0:  # a clean stop is allowed too, naming the server
        assert mlflow_server.url in log and "kdray: error" in log, log[-4000:]
    assert (exp / "results.parquet").is_file()  # the trials table is saved whatever MLflow did
