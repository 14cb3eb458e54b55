"""The bad-input catalogue of issue 8 through the command line (``kdray.cli.main`` in-process): each bad input
stops with exit code 2 and one message naming the field, the value and what is allowed, and leaves nothing
behind: no MLflow store or run, no teacher-cache entry, no model version, no results folder, no Ray started.

(Unknown keys, wrong types, bad temperatures and missing layers of *experiment configs* are also covered in
tests/test_config.py and tests/test_cli.py; promote refusals against a real search in tests/test_tracking.py.)
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from mlflow import MlflowClient
from test_search import SPACE

from kdray.cli import main
from kdray.config import ModelSpec
from kdray.models import build_model
from kdray.teacher import save_model

TEACHER = {"name": "mnist1d_cnn", "kwargs": {"channels": 16}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache folder for these tests (the generated data set is reused); no teacher entry may ever appear."""
    return tmp_path_factory.mktemp("bad-input-cache")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Teacher files: a 5-class kdray model file, a corrupt file, a pickle with an arbitrary object."""
    d = tmp_path_factory.mktemp("checkpoints")
    spec = ModelSpec.model_validate(TEACHER)
    save_model(d / "five_classes.pt", build_model(spec, 5), spec, 5)
    (d / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 64)
    (d / "pickled.pt").write_bytes(pickle.dumps({"state": object()}))
    return d


def cache_entries(cache: Path) -> set[str]:
    """Teacher-output cache entries and cached teachers (the generated data set does not count)."""
    return {str(p.relative_to(cache)) for sub in ("teacher_outputs", "teachers") for p in (cache / sub).glob("*")}


def base_config(cache: Path, **changes) -> dict:
    raw = copy.deepcopy(TINY)
    raw["cache_dir"] = str(cache)
    for path, value in changes.items():  # dotted keys; None deletes
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


def refused(tmp_path: Path, cache: Path, argv: list[str], words: list[str], capsys) -> str:
    """Run the CLI; check exit 2, the words in the message, and that nothing was created."""
    import ray

    before = cache_entries(cache)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("kdray: error:")]
    assert len(message) == 1 and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in message[0], (w, message[0])
    assert cache_entries(cache) == before, "a teacher or teacher-output cache entry was created"
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()
    db = tmp_path / "mlflow.db"
    if db.exists():  # the store may exist (a connection check), but holds no run and no model
        c = MlflowClient(f"sqlite:///{db}")
        assert not [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]
        assert not c.search_registered_models()
    assert not ray.is_initialized()
    return message[0]


def search(tmp_path: Path, base: dict, **space_changes) -> list[str]:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = json.loads(json.dumps(SPACE))
    space.update(space_changes)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return ["search", str(tmp_path / "space.yaml"), "--storage-path", str(tmp_path / "results"), "--no-progress",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def train(tmp_path: Path, base: dict) -> list[str]:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(base))
    return ["train", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "run")]


KD = {"kd": [{"method": "kd", "temperature": {"float": [1.0, 4.0]}}]}


# (id, base config changes, space changes, words the message must hold)
SEARCH_CASES = [
    ("unknown key in the space", {}, {"serach": {"num_trials": 2}}, ["serach", "known keys", "methods"]),
    ("unknown key in the base config", {"train.epoch": 3}, {}, ["train.epoch", "known keys", "epochs"]),
    ("wrong type", {"train.epochs": "many"}, {}, ["train.epochs", "'many'", "int"]),
    ("unknown method", {}, {"methods": {"kd": [{"method": "kdd", "temperature": {"float": [1.0, 4.0]}}]}},
     ["method", "'kdd'", "probe_kd"]),
    ("layer path that does not exist", {},
     {"methods": {"probe_kd": [{"method": "probe_kd", "teacher_layers": {"choice": ["relu3", "relu7"]}}]}},
     ["teacher_layers", "'relu7'", "relu2"]),
    ("attention transfer on a 1-D output", {}, {"methods": {"at": [{"method": "at", "pair": ["fc", "fc"]}]}},
     ["layers", "'fc'", "(B, 10)", "(B, C, L)"]),
    ("temperature <= 0", {"distill.temperature": 0}, {}, ["distill.temperature", "0", "> 0"]),
    ("temperature <= 0 in a searched range", {}, {"methods": {"kd": [{"method": "kd",
                                                                      "temperature": {"float": [-1.0, 4.0]}}]}},
     ["temperature", "-1.0", "> 0"]),
    ("all loss weights zero", {"distill.ce_weight": 0},
     {"methods": {"kd": [{"method": "kd", "weight": 0, "temperature": {"float": [1.0, 4.0]}}]}},
     ["distill", "all loss weights are 0", "> 0"]),
    ("empty search space", {}, {"methods": {}, "params": {}}, ["methods", "[]", "something to search"]),
    ("a space whose every trial is the same", {}, {"methods": {"kd": [{"method": "kd"}]}, "params": {}},
     ["methods", "['kd']", "same config"]),
    ("params contradicting methods", {}, {"methods": KD, "params": {"distill.terms.0.weight": {"float": [0.1, 1]}}},
     ["params.distill.terms.0.weight", "float", "distill.terms"]),
    ("a method that contradicts the base config (no teacher)", {"teacher": None, "distill.terms": []},
     {"methods": KD}, ["teacher", "None", "teacher section"]),
]


@pytest.mark.parametrize("name,base_changes,space_changes,words", SEARCH_CASES, ids=[c[0] for c in SEARCH_CASES])
def test_search_refuses_bad_input_before_any_work(tmp_path, cache_dir, capsys, name, base_changes, space_changes,
                                                  words):
    argv = search(tmp_path, base_config(cache_dir, **base_changes), **space_changes)
    refused(tmp_path, cache_dir, argv, words, capsys)


@pytest.mark.parametrize("option,value,words", [
    ("--tpe-startup-trials", "0", ["--tpe-startup-trials", "0", ">= 1"]),
    ("--reduction-factor", "1", ["--reduction-factor", "1", "> 1"]),
])
def test_search_refuses_bad_search_options(tmp_path, cache_dir, capsys, option, value, words):
    argv = search(tmp_path, base_config(cache_dir)) + [option, value]
    refused(tmp_path, cache_dir, argv, words, capsys)


@pytest.mark.parametrize("command", ["search", "train"])
@pytest.mark.parametrize("file,words", [
    ("missing.pt", ["teacher.checkpoint", "missing.pt", "an existing checkpoint file"]),
    ("corrupt.pt", ["teacher.checkpoint", "corrupt.pt", "weights-only checkpoint"]),
    ("pickled.pt", ["teacher.checkpoint", "pickled.pt", "weights-only checkpoint"]),
    ("five_classes.pt", ["teacher.model", "5 output classes", "10 classes", "'kd'"]),
], ids=["missing", "corrupt", "not weights-only", "classes do not match for logit KD"])
def test_bad_teacher_checkpoints_are_refused(tmp_path, cache_dir, checkpoints, capsys, command, file, words):
    base = base_config(cache_dir, teacher={"model": TEACHER, "checkpoint": str(checkpoints / file)})
    argv = search(tmp_path, base, methods=KD) if command == "search" else train(tmp_path, base)
    refused(tmp_path, cache_dir, argv, words, capsys)


@pytest.mark.parametrize("changes,words", [
    pytest.param({"distill.terms": [{"method": "at", "teacher_layers": "fc", "student_layers": "fc"}]},
                 ["layers", "'fc'"], id="attention transfer on a 1-D output"),
    pytest.param({"distill.ce_weight": 0, "distill.terms": [{"method": "kd", "weight": 0}]},
                 ["distill", "all loss weights"], id="all loss weights zero"),
    pytest.param({"distill.terms": [{"method": "fitnet", "teacher_layers": "relu7", "student_layers": "relu2"}]},
                 ["teacher_layers", "'relu7'", "relu3"],
                 id="layer path that does not exist"),
])
def test_train_refuses_bad_input_before_any_work(tmp_path, capsys, changes, words):
    cache = tmp_path / "cache"  # its own: whether a teacher gets trained must not depend on the other cases
    refused(tmp_path, cache, train(tmp_path, base_config(cache, **changes)), words, capsys)


def test_promote_refuses_a_missing_model_version_or_alias_and_changes_nothing(tmp_path, cache_dir, capsys):
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("students")  # a model without versions or aliases
    for args, words in [(["nope", "--alias", "champion"], ["NAME", "'nope'", "students"]),
                        (["students", "--alias", "champion", "--version", "3"], ["--version", "'3'"]),
                        (["students", "--alias", "champion", "--from-alias", "challenger"],
                         ["--from-alias", "'challenger'"])]:
        refused(tmp_path, cache_dir, ["promote", *args, "--tracking-uri", uri], words, capsys)
    assert [m.name for m in c.search_registered_models()] == ["students"]
    assert not c.search_model_versions("name = 'students'") and not c.get_registered_model("students").aliases
