"""MLflow tracking of searches with a real local Ray and real MLflow (SQLite files and a real
``mlflow server``): nested runs, per-epoch metrics, statuses, summary artifacts, registered students that
load in a fresh process, all-or-nothing registration, ``kdray promote``, fail-fast on a bad URI, and
runs ended (never left RUNNING) on interruption and reused on resume."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, free_port
from helpers.mlflow_runs import all_runs, predict_in_fresh_process
from helpers.searches import SPACE, write_space
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kdray.cli import main
from kdray.data import make_bundle
from kdray.experiment.configs import parse_config
from kdray.experiment.space import load_space, trial_raw
from kdray.models import build_model, count_parameters
from kdray.search.driver import SearchOptions, run_search
from kdray.tracking.client import PARENT_ID_FILE
from kdray.tracking.search_runs import SearchTracker

MODEL = "tiny-students"


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()




def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tracked search shared by the tests below: 6 trials, ASHA (grace 1) over 4 epochs, top 2 registered."""
    tmp = tmp_path_factory.mktemp("tracked")
    space = write_space(tmp, copy.deepcopy(TINY), registered_model=MODEL)
    uri = f"sqlite:///{tmp}/mlflow.db"
    t0 = time.perf_counter()
    out = run_search(str(space), SearchOptions(storage_path=str(tmp / "results"), num_cpus=2, progress=False,
                                               baseline=False, tracking_uri=uri, experiment="tiny-tracked",
                                               register_top=2))
    print(f"tracked search: {time.perf_counter() - t0:.1f} s")
    return SimpleNamespace(out=out, uri=uri, tmp=tmp, space=space, client=MlflowClient(uri))


def test_one_parent_one_child_per_trial_with_epoch_metrics_and_statuses(tracked):
    c, df = tracked.client, tracked.out.table
    runs = all_runs(c, "tiny-tracked")
    parents = [r for r in runs if r.data.tags.get("kdray.role") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == tracked.out.mlflow_run_id
    assert (tracked.tmp / "results" / "tiny-search" / PARENT_ID_FILE).read_text().strip() == parent.info.run_id
    assert all(r.info.status != "RUNNING" for r in runs)
    assert parent.info.status == "FINISHED" and parent.data.tags["kdray.status"] == "finished"
    children = {r.data.tags["kdray.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == len(df) == len(runs) - 1 == 6
    assert set(children) == set(df["trial_id"])
    assert {"finished", "pruned"} <= set(df["status"])
    for _, row in df.iterrows():
        run = children[row.trial_id]
        assert run.data.tags["kdray.status"] == row.status
        assert run.info.status == {"finished": "FINISHED", "pruned": "FINISHED"}[row.status]
        assert run.data.params["method"] == row["param.method"]
        assert float(run.data.params["train.optimizer.lr"]) == pytest.approx(row["param.train.optimizer.lr"])
        steps = list(range(1, row.epochs + 1))
        for metric in ("val_acc", "loss", "loss_ce", "teacher_agreement", "epoch_time_s", "samples_per_s"):
            hist = c.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in hist) == steps, (metric, row.trial_id)
        method = run.data.params["method"]
        if method != "hard":
            term = {"kd": "loss_kd", "probe_kd": "loss_probe_kd", "fitnet": "loss_fitnet"}[method]
            assert len(c.get_metric_history(run.info.run_id, term)) == row.epochs
        assert run.data.metrics["student_params"] > 0 and run.data.metrics["student_size_bytes"] > 0
        if row.status == "finished":
            assert row.epochs == 4 and run.data.metrics["test_acc"] == pytest.approx(row.test_acc)
        else:
            assert row.epochs < 4 and "test_acc" not in run.data.metrics
    # the parent: tags, the space and base config as params and YAML, the summary artifacts
    tags = parent.data.tags
    assert tags["kdray.version"] and tags["kdray.ray_address"] == "local" and "mnist1d_cnn" in tags["kdray.teacher"]
    assert parent.data.params["space.name"] == "tiny-search"
    # the probes fitted up-front on every candidate layer of the space (relu2/relu3 x mean/flatten)
    assert {k for k in parent.data.metrics if k.startswith("probe_val_acc.")} == {
        f"probe_val_acc.{layer}.{pooling}" for layer in ("relu2", "relu3") for pooling in ("mean", "flatten")}
    probe_rows = df[df["param.method"] == "probe_kd"]
    assert probe_rows["probe_val_acc"].between(0, 1).all()
    assert parent.data.params["base.student.name"] == "mnist1d_cnn_small"
    assert parent.data.params["search.num_trials"] == "6"
    files = artifact_files(c, parent.info.run_id)
    assert {"config/space.yaml", "config/base.yaml", "results/trials.parquet", "results/trials.csv",
            "plots/best_over_trials.png", "plots/val_acc_by_param.png", "plots/parallel_coordinates.png",
            "plots/parallel_coordinates.html"} <= files
    local = c.download_artifacts(parent.info.run_id, "results/trials.parquet", str(tracked.tmp / "dl"))
    assert list(pd.read_parquet(local)["trial_id"]) == list(df["trial_id"])
    best = df[df.status == "finished"].iloc[0]
    assert tags["kdray.best_trial_id"] == best["trial_id"]
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best["val_acc"])
    assert parent.data.metrics["trials_pruned"] == (df.status == "pruned").sum()


def _checkpoint_student(trial_path: str, space_path: Path):
    """The trial's student rebuilt by hand from its last checkpoint (independent of kdray.tracking.registered_models)."""
    space, base_raw, base_dir = load_space(space_path)
    folder = Path(trial_path)
    config = json.loads((folder / "params.json").read_text())
    cfg = parse_config(trial_raw(space, base_raw, config), base_dir)
    ckpt = max(folder.glob("checkpoint_*"), key=lambda p: p.name)
    state = torch.load(ckpt / "state.pt", weights_only=True)["distiller"]
    model = build_model(cfg.student, 10)
    model.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return model.eval(), cfg, state


def test_best_student_is_registered_and_loads_in_a_fresh_process(tracked):
    c, df, out = tracked.client, tracked.out.table, tracked.out
    finished = df[df.status == "finished"]
    assert [r["trial_id"] for r in out.registered] == list(finished["trial_id"][:2])
    best = out.registered[0]
    mv = c.get_model_version_by_alias(MODEL, "challenger")
    assert str(mv.version) == best["version"] and best["alias"] == "challenger"
    assert int(mv.version) == max(int(r["version"]) for r in out.registered)  # the best is the newest version
    row = finished.iloc[0]
    child = c.get_run(mv.run_id)
    assert child.data.tags["kdray.trial_id"] == row["trial_id"]
    assert child.data.tags["mlflow.parentRunId"] == out.mlflow_run_id
    tags = mv.tags
    assert tags["parent_run_id"] == out.mlflow_run_id and tags["run_id"] == mv.run_id
    assert tags["method"] == row["param.method"] and "mnist1d_cnn" in tags["teacher"]
    assert float(tags["val_acc"]) == pytest.approx(row["val_acc"]) and float(tags["test_acc"]) == pytest.approx(row["test_acc"])
    for key in ("layers", "temperature", "weights"):
        assert tags[key]
    assert "ce=" in tags["weights"]
    assert df.loc[df.trial_id == row["trial_id"], "model_version"].iloc[0] == str(mv.version)
    # the registered model is the student alone (no adapters, probes or teacher) ...
    student, cfg, state = _checkpoint_student(row["path"], tracked.space)
    assert int(tags["student_params"]) == count_parameters(student)
    x = make_bundle(cfg.data, cfg.cache_dir).x_test[:7].numpy()  # batch 7: the batch dimension is dynamic
    with torch.no_grad():
        expected = student(torch.from_numpy(x)).numpy()
    # ... and a fresh process loading models:/NAME@challenger gives the checkpoint's predictions
    y = predict_in_fresh_process(f"models:/{MODEL}@challenger", x, tracked.uri, tracked.tmp)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_promote_moves_aliases_and_names_what_is_missing(tracked, capsys):
    c, uri = tracked.client, tracked.uri
    challenger = str(c.get_model_version_by_alias(MODEL, "challenger").version)
    assert main(["promote", MODEL, "--alias", "champion", "--tracking-uri", uri]) == 0
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == challenger
    others = [r["version"] for r in tracked.out.registered if r["version"] != challenger]
    if others:  # the search registered its 2 best (when ASHA let 2 trials finish)
        other = others[0]
    else:  # only one finished: a second version of the same student, tagged a little worse
        mv = c.get_model_version(MODEL, challenger)
        worse = {**mv.tags, "val_acc": str(float(mv.tags["val_acc"]) - 0.05)}
        from kdray.tracking.client import use_tracking_uri

        with use_tracking_uri(uri):  # MLflow resolves the logged model through the global tracking URI
            other = str(c.create_model_version(MODEL, mv.source, run_id=mv.run_id, tags=worse).version)
    tags = c.get_model_version(MODEL, challenger).tags
    assert tags["kdray.champion.previous_version"] == "none" and tags["kdray.champion.promoted_by"]
    assert tags["kdray.champion.promoted_at"].startswith("20")
    capsys.readouterr()
    # the other version (rank 2) has a lower val_acc than the champion: refused unless --force
    assert float(c.get_model_version(MODEL, other).tags["val_acc"]) <= float(tags["val_acc"])
    if float(c.get_model_version(MODEL, other).tags["val_acc"]) < float(tags["val_acc"]):  # (a tie is no refusal)
        assert main(["promote", MODEL, "--alias", "champion", "--version", other, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert "--force" in err and "val_acc" in err and other in err
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == challenger
    assert main(["promote", MODEL, "--alias", "champion", "--version", other, "--force", "--tracking-uri", uri]) == 0
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == other
    assert f"was version {challenger}" in capsys.readouterr().out
    tags = c.get_model_version(MODEL, other).tags
    assert tags["kdray.champion.previous_version"] == challenger and tags["kdray.champion.forced"] == "true"
    # kdray models list shows both versions with their aliases and metrics
    assert main(["models", "list", MODEL, "--format", "json", "--tracking-uri", uri]) == 0
    listed = {str(r["version"]): r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {challenger, other}
    assert "champion" in listed[other]["aliases"] and "challenger" in listed[challenger]["aliases"]
    assert listed[challenger]["val_acc"] == pytest.approx(float(c.get_model_version(MODEL, challenger).tags["val_acc"]))
    assert main(["models", "list", "--tracking-uri", uri]) == 0
    assert MODEL in capsys.readouterr().out
    for args, words in [(["nope-model", "--alias", "champion"], ["NAME", "nope-model", MODEL]),
                        ([MODEL, "--alias", "champion", "--version", "99"], ["--version", "99", challenger]),
                        ([MODEL, "--alias", "champion", "--from-alias", "staging"], ["--from-alias", "staging",
                                                                                     "challenger"]),
                        ([MODEL, "--alias", "v3"], ["--alias", "v3"])]:
        assert main(["promote", *args, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == other  # unchanged by the failures
    assert main(["models", "list", "nope-model", "--tracking-uri", uri]) == 2
    assert "nope-model" in capsys.readouterr().err


def test_a_failed_registration_leaves_no_model_version(tracked):
    from ray.tune import ExperimentAnalysis, ResultGrid

    from kdray.search.driver import finished_trials
    from kdray.tracking.registered_models import register_trials

    c = tracked.client
    space, base_raw, base_dir = load_space(tracked.space)
    tracker = SearchTracker.attach(tracked.uri, "tiny-tracked", space, base_raw, base_dir, tracked.out.mlflow_run_id, 10)
    grid = finished_trials(ResultGrid(ExperimentAnalysis(tracked.out.experiment_path, default_metric="val_acc",
                                                         default_mode="max")))
    exp_id = c.get_experiment_by_name("tiny-tracked").experiment_id
    models_before = len(c.search_logged_models([exp_id]))
    tags_before = {r.info.run_id: r.data.tags.get("kdray.registered_model") for r in all_runs(c, "tiny-tracked")}
    cfg = parse_config(base_raw, base_dir)
    example = make_bundle(cfg.data, cfg.cache_dir).x_test[:2].numpy()
    # "v1" is a reserved alias: the last step fails after the versions were created
    with pytest.raises(MlflowException, match="reserved"):
        register_trials(tracker, grid, tracked.out.table, 2, "rollback-students", example, alias="v1")
    assert not c.search_registered_models("name = 'rollback-students'")
    assert len(c.search_logged_models([exp_id])) == models_before
    assert {r.info.run_id: r.data.tags.get("kdray.registered_model") for r in all_runs(c, "tiny-tracked")} == tags_before
    # and an existing registered model only loses the versions of the failed call
    before = {v.version for v in c.search_model_versions(f"name = '{MODEL}'")}
    tracker.children.clear()
    tracker._load_children()
    with pytest.raises(MlflowException, match="reserved"):  # the trials are already registered: reused, not added
        register_trials(tracker, grid, tracked.out.table, 2, MODEL, example, alias="v1")
    assert {v.version for v in c.search_model_versions(f"name = '{MODEL}'")} == before


def test_runs_are_ended_on_interruption_and_reused_on_resume(tmp_path, tiny_raw):
    """The tracker alone (no Ray): an interrupted search kills its open runs; a resumed one reopens the same
    parent and the same child per trial, without logging an epoch twice; a failing search ends FAILED."""
    space_path = write_space(tmp_path, tiny_raw)
    space, base_raw, base_dir = load_space(space_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_path = str(tmp_path / "results" / "tiny-search")
    config = {"method": "kd", "kd.0.temperature": 2.0, "train.optimizer.lr": 0.01}
    start = dict(settings={"num_trials": 2}, space_path=space_path, ray_address=None, teacher_info={}, num_classes=10)

    t1 = SearchTracker(uri, "resumable", space, base_raw, base_dir)
    parent = t1.start(exp_path, resume=False, **start)
    child = t1.trial_started("t1", config)
    t1.trial_result("t1", {"epoch": 1, "val_acc": 0.5, "loss_kd": 1.0, "max_epochs": 3, "training_iteration": 1})
    t1.trial_started("t2", dict(config, method="hard"))
    t1.experiment_ended(["t1", "t2"])  # Tune stopped with both trials unfinished
    t1.close_after_error(KeyboardInterrupt())
    c = MlflowClient(uri)
    runs = {r.info.run_id: r for r in all_runs(c, "resumable")}
    assert {r.info.status for r in runs.values()} == {"KILLED"}
    assert runs[child].data.tags["kdray.status"] == "killed"
    assert (Path(exp_path) / PARENT_ID_FILE).read_text().strip() == parent

    t2 = SearchTracker(uri, "resumable", space, base_raw, base_dir)
    assert t2.start(exp_path, resume=True, **start) == parent
    assert c.get_run(parent).info.status == "RUNNING"
    assert t2.trial_started("t1", config) == child
    t2.trial_result("t1", {"epoch": 1, "val_acc": 0.9, "max_epochs": 3})  # already logged: skipped
    t2.trial_result("t1", {"epoch": 2, "val_acc": 0.6, "max_epochs": 3})
    t2.trial_completed("t1", {"epoch": 2, "max_epochs": 3})
    assert [(m.step, m.value) for m in sorted(c.get_metric_history(child, "val_acc"), key=lambda m: m.step)] == \
        [(1, 0.5), (2, 0.6)]
    assert c.get_run(child).data.tags["kdray.status"] == "pruned"
    t2.trial_started("t2", dict(config, method="hard"))
    t2.trial_errored("t2", "DivergedError: diverged: loss term 'fitnet' is inf at epoch 1")
    t2.close_after_error(RuntimeError("boom"))
    runs = all_runs(c, "resumable")
    assert len(runs) == 3 and all(r.info.status != "RUNNING" for r in runs)
    by_trial = {r.data.tags.get("kdray.trial_id"): r for r in runs}
    assert by_trial["t2"].info.status == "FAILED" and "diverged" in by_trial["t2"].data.tags["kdray.error"]
    assert c.get_run(parent).info.status == "FAILED" and "boom" in c.get_run(parent).data.tags["kdray.error"]


def test_unreachable_tracking_uri_fails_before_any_trial(tmp_path, tiny_raw, capsys, monkeypatch):
    space = write_space(tmp_path, tiny_raw)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    code = main(["search", str(space), "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri,
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and uri in err and "--tracking-uri" in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["search", str(space), "--storage-path", str(tmp_path / "results"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert uri in err and "MLFLOW_TRACKING_URI" in err, err
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "results").exists()


def test_search_against_a_real_mlflow_server(tmp_path, tiny_raw, mlflow_server):
    methods = {"kd": SPACE["methods"]["kd"],
               "diverge": [{"method": "fitnet", "weight": 1e39, "pair": ["relu3", "relu3"]}]}
    space = write_space(tmp_path, tiny_raw, name="served-search", methods=methods,
                        search={"num_trials": 2, "concurrency": 2, "scheduler": "none", "max_epochs": 2,
                                "max_failures": 0, "searcher": "random", "seed": 0,
                                "points_to_evaluate": [{"method": "kd"}, {"method": "diverge"}]})
    out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                               baseline=False, tracking_uri=mlflow_server.url))
    df = out.table
    assert set(df.status) == {"finished", "failed"}, df[["status", "error", "param.method"]].to_string()
    c = MlflowClient(mlflow_server.url)
    runs = all_runs(c, "served-search")
    assert all(r.info.status != "RUNNING" for r in runs)
    children = {r.data.tags["kdray.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.mlflow_run_id}
    assert len(runs) == 3 and set(children) == set(df.trial_id)
    for row in df.itertuples():
        run = children[row.trial_id]
        assert run.data.tags["kdray.status"] == row.status
        if row.status == "failed":
            assert run.info.status == "FAILED" and "diverged" in run.data.tags["kdray.error"]
        else:
            assert run.info.status == "FINISHED"
            assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_acc")) == [1, 2]
    mv = c.get_model_version_by_alias("served-search-student", "challenger")
    assert mv.run_id == children[df[df.status == "finished"].trial_id.iloc[0]].info.run_id
    # artifacts went through the server into its artifact store
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"trials.parquet", "trials.csv", "parallel_coordinates.html", "MLmodel"} <= stored


def test_eight_parallel_trials_on_the_sqlite_default(tmp_path, tiny_raw, monkeypatch, capfd):
    """The default store (./mlflow.db) with 8 trials at once: one writer, so no "database is locked"."""
    import ray

    ray.shutdown()  # a local Ray with 8 logical CPUs, so that 8 trials really run at once
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, tiny_raw, name="parallel8", methods={"kd": SPACE["methods"]["kd"]},
                        search={"num_trials": 8, "concurrency": 8, "scheduler": "none", "max_epochs": 2})
    try:
        assert main(["search", str(space), "--storage-path", str(tmp_path / "results"), "--num-cpus", "8",
                     "--no-progress", "--no-baseline"]) == 0
    finally:
        ray.shutdown()
    out = capfd.readouterr()
    assert "database is locked" not in out.out + out.err
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = all_runs(c, "parallel8")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(runs) == 9 and len(children) == 8
    assert len({r.data.tags["kdray.trial_id"] for r in children}) == 8
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(len(c.get_metric_history(r.info.run_id, "val_acc")) == 2 for r in children)
    # the trials overlapped: at some moment at least 4 child runs were open together
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) >= 4


def test_an_int8_student_is_registered_and_loads_within_a_point_of_the_float_one(tmp_path, tiny_raw):
    tiny_raw["student"] = {"name": "mnist1d_mlp", "kwargs": {}}
    tiny_raw["export"] = {"quantize": True}
    space = write_space(tmp_path, tiny_raw, name="tiny-int8", methods={"kd": SPACE["methods"]["kd"]},
                        search={"num_trials": 2, "concurrency": 2, "max_epochs": 3, "scheduler": "none"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), num_cpus=2, progress=False,
                                               baseline=False, tracking_uri=uri))
    c = MlflowClient(uri)
    mv = c.get_model_version_by_alias("tiny-int8-student", "challenger")
    tags = mv.tags
    assert tags["variant"] == "int8"
    assert int(float(tags["int8_size_bytes"])) < int(float(tags["float_size_bytes"])) / 2
    assert float(tags["int8_latency_ms"]) > 0 and float(tags["float_latency_ms"]) > 0
    cfg = parse_config(tiny_raw)
    b = make_bundle(cfg.data, cfg.cache_dir)
    y = predict_in_fresh_process("models:/tiny-int8-student@challenger", b.x_test.numpy(), uri, tmp_path)
    acc = float((y.argmax(1) == b.y_test.numpy()).mean())
    assert acc == pytest.approx(float(tags["int8_test_acc"]), abs=1e-6)
    assert abs(acc - float(tags["float_test_acc"])) <= 0.01  # within 1 point of the float student
    assert out.table.loc[out.table.trial_id == tags["trial_id"], "model_version"].iloc[0] == str(mv.version)


def test_born_again_generations_are_each_an_mlflow_child_run(tmp_path, tiny_raw, capsys):
    """kdray train --generations 2 --track: generation g is taught by generation g-1's student file (same
    architecture), saved under gen<g>, and logged as a child run of one parent, which plots the generations."""
    from kdray.core.checkpoint import read_checkpoint

    (tmp_path / "cfg.yaml").write_text(json.dumps(tiny_raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--generations", "2", "--track", "--tracking-uri", uri,
                 "--experiment", "born-again", "--output-dir", str(out), "--json"]) == 0
    cfg = parse_config(tiny_raw)
    for g in (1, 2):  # the teacher of generation g is generation g-1's student file, same architecture
        saved = read_checkpoint(out / f"gen{g}" / "student.pt")
        assert saved["model"] == cfg.student.model_dump(mode="json")
        summary = json.loads((out / f"gen{g}" / "summary.json").read_text())
        assert summary["teacher"]["source"].endswith(f"gen{g - 1}/student.pt")
        assert "loss_kd" in summary["history"][-1]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("born-again")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kdray.role") == "born_again")
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["kdray.generation"]))
    assert len(runs) == 4 and [r.data.tags["kdray.generation"] for r in children] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    accs = []
    for g, r in enumerate(children):
        hist = c.get_metric_history(r.info.run_id, "val_acc")
        assert [m.step for m in hist] == [1, 2]  # every epoch, logged as it came
        accs.append(json.loads((out / f"gen{g}" / "summary.json").read_text())["test_acc"])
        assert r.data.metrics["test_acc"] == pytest.approx(accs[-1])
        assert "student/student.pt" in {a.path for a in c.list_artifacts(r.info.run_id, "student")}
    gen_hist = sorted(c.get_metric_history(parent.info.run_id, "generation_test_acc"), key=lambda m: m.step)
    assert [m.value for m in gen_hist] == pytest.approx(accs)
    assert "plots/generations.png" in {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert "MLflow: experiment 'born-again'" in capsys.readouterr().out


def test_a_failing_tracked_train_ends_its_run_failed(tmp_path, tiny_raw):
    tiny_raw["distill"]["terms"] = [{"method": "fitnet", "weight": 1e39, "teacher_layers": ["relu3"],
                                     "student_layers": ["relu3"]}]  # diverges at the first step
    (tmp_path / "cfg.yaml").write_text(json.dumps(tiny_raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--track", "--tracking-uri", uri]) != 0
    (r,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tiny").experiment_id])
    assert r.info.status == "FAILED" and "diverged" in r.data.tags["kdray.error"]
