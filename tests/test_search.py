"""kdray search on a real local Ray: TPE + ASHA, pruned trials told to Optuna as PRUNED, results,
space validation before any trial, and interrupt + resume without rerunning finished trials."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers.searches import SPACE, finished_epochs, write_space
from optuna.trial import TrialState

from kdray.cli import main
from kdray.experiment.space import SearchSettings, SearchSpace
from kdray.search.driver import SearchOptions, run_search
from kdray.search.results import read_results
from kdray.search.trial import CheckpointPlan
from kdray.search.tuner import asha_rungs, make_early_stopper


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def test_search_prunes_with_asha_and_tells_optuna_pruned(tmp_path, tiny_raw):
    space = write_space(tmp_path, tiny_raw)  # ASHA's rungs: epochs 1, 2 and 4 of 4
    out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                               overrides={"checkpoint_every_s": 1e6}))  # rungs and the end only
    df = out.table
    assert len(df) == 6 and set(df["status"]) <= {"finished", "pruned"}
    assert (df["status"] == "pruned").sum() >= 1, df[["status", "epochs"]]
    assert (df["status"] == "finished").sum() >= 1
    assert (df.loc[df.status == "finished", "epochs"] == 4).all()
    assert (df.loc[df.status == "pruned", "epochs"] < 4).all()
    assert df.loc[df.status == "finished", "test_acc"].notna().all()
    # the Optuna study saw the same: pruned trials PRUNED (with intermediate values), never COMPLETE
    trials = out.study.trials
    states = [t.state for t in trials]
    assert states.count(TrialState.PRUNED) == (df["status"] == "pruned").sum()
    assert states.count(TrialState.COMPLETE) == (df["status"] == "finished").sum()
    for t in trials:
        assert t.intermediate_values, "per-epoch values are reported to Optuna"
        if t.state == TrialState.COMPLETE:
            assert max(t.intermediate_values) == 4 and t.value == t.intermediate_values[4]
        else:
            assert max(t.intermediate_values) < 4
    # conditional dimensions: a trial has only the dimensions of its method
    for t in trials:
        m = t.params["method"]
        assert all(k in ("method", "train.optimizer.lr") or k.startswith(m + ".") for k in t.params)
    # results saved next to the experiment, readable again, with the hard-label baseline computed
    again = read_results("tiny-search", str(tmp_path / "results"))
    assert list(again["trial_id"]) == list(df["trial_id"])
    assert (tmp_path / "results" / "tiny-search" / "results.csv").is_file()
    assert 0 < out.baseline["test_acc"] <= 1
    assert main(["results", "tiny-search", "--storage-path", str(tmp_path / "results"), "--sort", "epochs"]) == 0
    # checkpoints at ASHA's rungs and the last epoch only, trial processes reused
    rows = pd.concat([pd.read_json(f, lines=True) for f in (tmp_path / "results" / "tiny-search").glob("*/result.json")])
    assert sorted(rows.loc[rows.checkpoint_dir_name.notna(), "epoch"].unique()) == [1, 2, 4]
    assert rows.loc[rows.epoch == 3, "checkpoint_dir_name"].isna().all() and (rows.epoch == 3).any()
    assert rows.pid.nunique() < len(df)  # 6 trials, 2 at a time, in fewer processes


@pytest.mark.parametrize("grace,factor,max_epochs,rungs", [
    (4, 2, 20, [4, 8, 16]), (1, 2, 4, [1, 2, 4]), (2, 3, 20, [2, 6, 18]), (2, 1.5, 5, [2, 3, 5]), (5, 2, 3, [3]),
])
def test_checkpoint_epochs_are_the_epochs_where_ray_asha_decides(grace, factor, max_epochs, rungs):
    from ray.tune.schedulers import ASHAScheduler

    space = SearchSpace(name="s", base="b.yaml", search=SearchSettings(grace_period=grace, reduction_factor=factor))
    assert asha_rungs(space, space.search, max_epochs) == rungs
    asha = make_early_stopper(space, space.search, max_epochs)
    assert isinstance(asha, ASHAScheduler)  # Ray's own milestones, reached at the first whole epoch past them:
    assert sorted(math.ceil(m) for m, _ in asha._brackets[0]._rungs) == rungs
    assert asha_rungs(space, space.search.model_copy(update={"scheduler": "none"}), max_epochs) == []


def test_checkpoint_plan_checkpoints_at_rungs_at_the_end_and_after_the_interval():
    plan = CheckpointPlan(epochs=(2, 4), every_s=10.0)
    assert [e for e in range(1, 9) if plan.due(e, 8, seconds_since_last=1.0)] == [2, 4, 8]
    assert plan.due(3, 8, seconds_since_last=10.0) and not plan.due(3, 8, seconds_since_last=9.99)
    assert all(CheckpointPlan(every_s=0).due(e, 8, seconds_since_last=0.0) for e in range(1, 9))


def test_bad_layer_in_space_stops_before_any_trial(tmp_path, tiny_raw, capsys):
    methods = dict(SPACE["methods"])
    methods["probe_kd"] = [{"method": "probe_kd", "teacher_layers": {"choice": ["relu2", "relu7"]}}]
    space = write_space(tmp_path, tiny_raw, methods=methods)
    code = main(["search", str(space), "--storage-path", str(tmp_path / "results"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "relu7" in err and "teacher_layers" in err and "relu2" in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("change,field", [
    ({"params": {"distill.temperature": {"float": [0.0, 4.0]}}}, "distill.temperature"),
    ({"params": {"data.label_fraction": {"float": [0.1, 0.5]}}}, "params.data.label_fraction"),
    ({"params": {"train.optimizer.lr": {"float": [0.1, 0.01]}}}, "params.train.optimizer.lr"),
    ({"methods": {"kd": [{"method": "kd", "weight": {"choice": []}}]}}, "methods.kd[0].weight"),
    ({"search": {"points_to_evaluate": [{"method": "nope"}]}}, "search.points_to_evaluate[0].method"),
    ({"search": {"points_to_evaluate": [{"method": "kd", "fitnet.0.pair": ["relu3", "relu3"]}]}},
     "search.points_to_evaluate[0]"),
    ({"search": {"points_to_evaluate": [{"train.optimizer.lr": 5.0}]}}, "search.points_to_evaluate[0].train.optimizer.lr"),
])
def test_bad_values_in_space_exit_2(tmp_path, tiny_raw, capsys, change, field):
    space = write_space(tmp_path, tiny_raw, **change)
    assert main(["search", str(space), "--storage-path", str(tmp_path / "r"), "--no-progress"]) == 2
    assert field in capsys.readouterr().err




def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_raw):
    space = write_space(tmp_path, tiny_raw, search={**SPACE["search"], "num_trials": 5, "concurrency": 1,
                                                    "scheduler": "none", "max_epochs": 3})
    storage = tmp_path / "results"
    cmd = [sys.executable, "-m", "kdray.cli", "search", str(space), "--storage-path", str(storage),
           "--no-progress", "--no-baseline", "--num-cpus", "2"]
    env = dict(os.environ)
    log = tmp_path / "search.log"  # a file, not a pipe nobody reads while it runs (a full pipe blocks the search)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    exp = storage / "tiny-search"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(finished_epochs(exp)) < 2 and proc.poll() is None:
            time.sleep(0.5)
        assert len(finished_epochs(exp)) >= 2, log.read_text(errors="replace")[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:  # whatever failed above: no search (and its local Ray, same process group) left running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    before = finished_epochs(exp)
    assert 2 <= len(before) < 5
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = finished_epochs(exp)
    assert len(after) == 5
    for trial, epochs in before.items():
        assert after[trial] == epochs == [1, 2, 3]  # not one more report: it did not run again
    df = read_results(str(exp))
    assert (df["status"] == "finished").sum() == 5


def test_a_failing_trial_is_errored_and_the_search_goes_on(tmp_path, tiny_raw):
    methods = {"kd": SPACE["methods"]["kd"],
               "diverge": [{"method": "fitnet", "weight": 1e39, "pair": ["relu3", "relu3"]}]}
    space = write_space(tmp_path, tiny_raw, methods=methods,
                        search={**SPACE["search"], "num_trials": 4, "scheduler": "none", "max_epochs": 2,
                                "max_failures": 1,
                                "points_to_evaluate": [{"method": "diverge"}, {"method": "kd"}]})
    out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                               baseline=False))
    df = out.table
    failed = df[df.status == "failed"]
    assert len(df) == 4 and len(failed) >= 1 and (df.status == "finished").sum() >= 1
    assert failed["error"].str.contains("diverged").all()
    assert all(t.state in (TrialState.FAIL, TrialState.COMPLETE) for t in out.study.trials)
    assert sum(t.state == TrialState.FAIL for t in out.study.trials) == len(failed)


def test_multi_objective_search_finds_a_pareto_front_and_registers_it(tmp_path, tiny_raw):
    from mlflow import MlflowClient

    space = write_space(tmp_path, tiny_raw, name="tiny-pareto", methods={"kd": SPACE["methods"]["kd"]},
                        objectives=[{"metric": "student_params", "mode": "min"}],
                        params={"student.kwargs.channels": {"choice": [2, 4, 8]}},
                        search={"num_trials": 5, "concurrency": 2, "max_epochs": 2, "seed": 1,
                                "points_to_evaluate": [{"student.kwargs.channels": 2},
                                                       {"student.kwargs.channels": 8}]})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                               baseline=False, tracking_uri=uri, register_pareto=True))
    df = out.table
    assert len(out.study.directions) == 2
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in out.study.trials)
    assert (df.status == "finished").all() and (df.epochs == 2).all()  # no ASHA in a multi-objective search
    assert df["student_params"].nunique() >= 2
    front = df[df.pareto]
    assert len(front) >= 1
    for _, r in front.iterrows():  # nothing beats a front member on both objectives
        assert not ((df.val_acc >= r.val_acc) & (df.student_params <= r.student_params)
                    & ((df.val_acc > r.val_acc) | (df.student_params < r.student_params))).any()
    assert df.loc[df.student_params.idxmin(), "pareto"] or df.student_params.value_counts()[df.student_params.min()] > 1
    c = MlflowClient(uri)
    assert {r["trial_id"] for r in out.registered} == set(front.trial_id)
    assert "plots/pareto_front.png" in {a.path for a in c.list_artifacts(out.mlflow_run_id, "plots")}


def test_ensemble_weight_is_a_search_dimension(tmp_path, tiny_raw):
    """extra_teachers.0.weight drawn per trial: one shared ensemble, one cache entry of member logits, and each
    trial reports the test accuracy of its own mix."""
    from kdray.core.cache import list_entries

    tiny_raw["cache_dir"] = str(tmp_path / "cache")
    tiny_raw["extra_teachers"] = [{"model": {"name": "mnist1d_cnn", "kwargs": {"channels": 8}},
                                   "recipe": {"seed": 1, "train": {"epochs": 2, "progress": False}}}]
    space = write_space(tmp_path, tiny_raw, name="tiny-ensemble", methods={"kd": [{"method": "kd"}]},
                        params={"extra_teachers.0.weight": {"float": [0.01, 100.0], "log": True}},
                        search={"num_trials": 3, "concurrency": 2, "max_epochs": 1, "scheduler": "none",
                                "points_to_evaluate": [{"extra_teachers.0.weight": 0.01},
                                                       {"extra_teachers.0.weight": 100.0}]})
    df = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                              baseline=False, tracking=False)).table
    assert (df.status == "finished").all() and df["param.extra_teachers.0.weight"].nunique() == 3
    assert df["teacher_test_acc"].between(0, 1).all()
    assert len(list_entries(str(tmp_path / "cache"))) == 1
    # nearly all weight on one member: the mix's accuracy is that member's
    by_w = df.set_index("param.extra_teachers.0.weight")["teacher_test_acc"]
    assert by_w[0.01] != by_w[100.0] or by_w.nunique() == 1


@pytest.mark.parametrize("key", ["teacher.model.name", "extra_teachers.0.recipe.seed"])
def test_teacher_settings_other_than_mix_weights_cannot_be_searched(tmp_path, tiny_raw, key, capsys):
    space = write_space(tmp_path, tiny_raw, params={key: {"choice": [1, 2]}})
    assert main(["search", str(space), "--storage-path", str(tmp_path / "r"), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"params.{key}" in err and "extra_teachers.N.weight" in err


def test_sparsity_and_quantization_are_search_dimensions_against_size(tmp_path, tiny_raw):
    """export.sparsity and export.quantize drawn per trial, against the gzipped size of the student as shipped."""
    space = write_space(tmp_path, tiny_raw, name="tiny-compress", methods={"kd": [{"method": "kd"}]},
                        objectives=[{"metric": "student_gzip_bytes", "mode": "min"}],
                        params={"export.sparsity": {"choice": [0.0, 0.9]}, "export.quantize": {"choice": [False, True]},
                                "export.finetune_epochs": 1},
                        search={"num_trials": 2, "concurrency": 2, "max_epochs": 1,
                                "points_to_evaluate": [{"export.sparsity": 0.0, "export.quantize": False},
                                                       {"export.sparsity": 0.9, "export.quantize": True}]})
    df = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                              baseline=False, tracking=False)).table
    assert (df.status == "finished").all() and len(df) == 2
    dense = df[df["param.export.sparsity"] == 0.0].iloc[0]
    small = df[df["param.export.sparsity"] == 0.9].iloc[0]
    assert not dense["param.export.quantize"] and small["param.export.quantize"]
    assert small.student_gzip_bytes < 0.7 * dense.student_gzip_bytes
    assert small.pareto


def _epoch(epoch: int, value: float, max_epochs: int = 3) -> dict:
    return {"val_acc": value, "epoch": epoch, "max_epochs": max_epochs}


def test_study_searcher_tells_optuna_how_each_trial_ended_and_survives_save_and_restore(tmp_path):
    """The searcher alone, driven by hand as Tune would, on a real Optuna study (no Ray Tune run)."""
    import optuna

    from kdray.search.searcher import StudySearcher

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    searcher = StudySearcher(space, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                             points_to_evaluate=[{"x": 0.25}])
    assert searcher.suggest("done") == {"x": 0.25} == searcher.suggest("done")  # the enqueued point comes first
    assert set(searcher.suggest("pruned")) == set(searcher.suggest("nan")) == {"x"}
    for epoch in (1, 2, 1, 3):  # Tune may hand a result twice: one report per step
        searcher.on_trial_result("done", _epoch(epoch, epoch / 10))
    searcher.on_trial_complete("done", _epoch(3, 0.3))
    searcher.on_trial_result("pruned", _epoch(1, 0.2))
    searcher.on_trial_complete("pruned", _epoch(2, 0.4))  # stopped before max_epochs, e.g. by ASHA
    searcher.on_trial_result("nan", _epoch(1, 0.5))

    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    again = StudySearcher(space, metric="val_acc", mode="max")
    again.restore(str(path))
    again.on_trial_complete("nan", _epoch(3, float("nan")))  # the restored searcher still knows the running trial
    again.suggest("errored")
    again.on_trial_complete("errored", None, error=True)
    again.on_trial_complete("unknown", _epoch(3, 0.9))  # never suggested here: ignored

    done, pruned, nan, errored = again.study.trials
    assert (done.state, done.value, done.intermediate_values) == (TrialState.COMPLETE, 0.3, {1: 0.1, 2: 0.2, 3: 0.3})
    assert pruned.state == TrialState.PRUNED and pruned.intermediate_values == {1: 0.2, 2: 0.4}
    assert nan.state == TrialState.FAIL and nan.intermediate_values == {1: 0.5}
    assert errored.state == TrialState.FAIL
    assert [t.state for t in searcher.study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]


def test_study_searcher_multi_objective_tells_every_value_or_fail():
    from kdray.search.searcher import StudySearcher

    searcher = StudySearcher(lambda t: {"n": t.suggest_int("n", 1, 4)}, metric=["val_acc", "student_params"],
                             mode=["max", "min"])
    assert set(searcher.suggest("a")) == {"n"}
    searcher.suggest("b")
    searcher.on_trial_result("a", _epoch(1, 0.5))  # no intermediate values in a multi-objective study
    searcher.on_trial_complete("a", {**_epoch(3, 0.7), "student_params": 120})
    searcher.on_trial_complete("b", _epoch(3, 0.7))  # student_params missing
    a, b = searcher.study.trials
    assert (a.state, a.values, a.intermediate_values) == (TrialState.COMPLETE, [0.7, 120.0], {})
    assert b.state == TrialState.FAIL


def test_the_callback_tune_pickles_reaches_the_callbacks_of_the_run_in_this_process():
    """--resume: Tune unpickles the callbacks of the interrupted run; events must reach this run's callbacks."""
    import ray.cloudpickle as pickle
    from ray.tune import Callback

    from kdray.search.callbacks import this_run

    class Recorder(Callback):
        def __init__(self):
            self.started = []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.append(trial)

    old, new = Recorder(), Recorder()
    with this_run("s", [old]) as forward:
        pickled = pickle.dumps(forward)
    restored = pickle.loads(pickled)
    restored.on_trial_start(iteration=1, trials=[], trial="t1")  # no run registered here: its own callbacks
    with this_run("s", [new]):
        restored.on_trial_start(iteration=2, trials=[], trial="t2")
    assert restored.live()[0].started == ["t1"] and new.started == ["t2"] and old.started == []
