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
from helpers.searches import SPACE
from mlflow import MlflowClient

from kdray.cli import main
from kdray.config import ModelSpec
from kdray.core.checkpoint import save_model
from kdray.models import build_model

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
    ("a negative checkpoint interval", {}, {"search": {"checkpoint_every_s": -2}},
     ["search.checkpoint_every_s", "-2", ">= 0"]),
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
    ("--reduction-factor", "inf", ["--reduction-factor", "inf", "a finite number"]),
    ("--cpus-per-worker", "nan", ["--cpus-per-worker", "nan", "a finite number"]),
    ("--checkpoint-every-s", "-1", ["--checkpoint-every-s", "-1", ">= 0"]),
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


# ---------------------------------------------------------------------------------------------------------------
# issue 13: any file content, non-finite numbers, bad --set overrides

INF, NAN = float("inf"), float("nan")
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))  # 9**9 values expanded


def with_file(tmp_path: Path, cache: Path, command: str) -> tuple[list[str], Path]:
    """CLI arguments of a valid train (the file is its config) or search (the file is its space)."""
    argv = train(tmp_path, base_config(cache)) if command == "train" else search(tmp_path, base_config(cache))
    return argv, tmp_path / ("cfg.yaml" if command == "train" else "space.yaml")


# (id, new content from the valid file's text, words of the message); the same for a config and a space file
FILE_CASES = [
    ("Latin-1 text", lambda good: good.encode() + "# café\n".encode("latin-1"), ["UTF-8 text", "0xe9", "Latin-1"]),
    ("binary data", lambda good: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["binary data", "NUL byte"]),
    ("empty file", lambda good: b"", ["the file is empty"]),
    ("only comments", lambda good: b"# to do\n", ["only comments"]),
    ("alias bomb", lambda good: BOMB.encode(), ["50,000 values", "alias"]),
    ("over the size limit", lambda good: good.encode() + b"#" * 1_000_000, ["at most 1,000,000 bytes"]),
    ("not YAML", lambda good: b"name: [1, 2\n", ["valid YAML", "line 2"]),
    ("a recursive alias", lambda good: b"name: &n [*n]\n", ["name", "contain itself"]),
]
# (id, command, (old, new) text replacement in the valid file, words)
DUPLICATE_CASES = [
    ("a second student section", "train", ("\nstudent:", "\nstudent:\n  name: mnist1d_mlp\nstudent:"),
     ["student", "each key once", "lines"]),
    ("a nested duplicate", "train", ("  epochs: 2\n", "  epochs: 2\n  epochs: 200\n"),
     ["train.epochs", "each key once", "cfg.yaml"]),
    ("a second kd under methods", "search", ("\n  kd:", "\n  kd: []\n  kd:"), ["methods.kd", "each key once", "lines"]),
    ("a nested duplicate", "search", ("  num_trials: 6\n", "  num_trials: 6\n  num_trials: 60\n"),
     ["search.num_trials", "space.yaml"]),
    ("a very long bad value", "train", ("  epochs: 2\n", f"  epochs: {'x' * 5000}\n"),
     ["train.epochs", "x...", "(5002 characters)", "int"]),
    ("a very long bad value", "search", ("base: base.yaml\n", f"base: base.yaml\nmode: {'x' * 5000}\n"), ["mode", "(5002 characters)", "max"]),
    ("1e309 (a string YAML-wise)", "train", ("temperature: 4.0", "temperature: 1e309"),
     ["distill.temperature", "'1e309'", "a finite number"]),
    ("1.0e+309 (inf YAML-wise)", "train", ("temperature: 4.0", "temperature: 1.0e+309"),
     ["distill.temperature", "inf", "a finite number"]),
]


def check_short(message: str) -> None:
    """Echoed values are cut: the message stays a few hundred characters whatever the file holds."""
    assert len(message) < 1200, len(message)
    value = message.split(": got ", 1)[1].split("; allowed: ", 1)[0]
    assert len(value) <= 300, value


@pytest.mark.parametrize("command", ["train", "search"])
@pytest.mark.parametrize("make,words", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_any_file_content_is_refused(tmp_path, cache_dir, capsys, command, make, words):
    import time

    argv, path = with_file(tmp_path, cache_dir, command)
    path.write_bytes(make(path.read_text()))
    start = time.perf_counter()
    message = refused(tmp_path, cache_dir, argv, [str(path), *words], capsys)
    assert time.perf_counter() - start < 5, "bounded time: refused before any expansion or parsing of a huge file"
    check_short(message)


@pytest.mark.parametrize("name,command,change,words", DUPLICATE_CASES, ids=[f"{c[0]} ({c[1]})" for c in DUPLICATE_CASES])
def test_duplicate_keys_long_values_and_huge_numbers_in_files_are_refused(tmp_path, cache_dir, capsys, name, command,
                                                                          change, words):
    argv, path = with_file(tmp_path, cache_dir, command)
    good = path.read_text()
    assert change[0] in good, (change[0], good)
    path.write_text(good.replace(change[0], change[1], 1))
    check_short(refused(tmp_path, cache_dir, argv, words, capsys))


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_directory_and_a_base_file_that_is_not_utf8_are_refused(tmp_path, cache_dir, capsys, command):
    argv, path = with_file(tmp_path, cache_dir, command)
    path.unlink()
    path.mkdir()
    refused(tmp_path, cache_dir, argv, [str(path), "directory"], capsys)
    if command == "search":  # the base config a space names goes through the same checks
        path.rmdir()
        argv, _ = with_file(tmp_path, cache_dir, command)
        (tmp_path / "base.yaml").write_bytes((tmp_path / "base.yaml").read_bytes() + b"# \xe9t\xe9\n")
        refused(tmp_path, cache_dir, argv, ["base", "base.yaml", "UTF-8", "0xe9"], capsys)


# (dotted change of the base config, words): non-finite numbers anywhere, free-form dicts included
NON_FINITE_CASES = [
    ({"train.optimizer": {"lr": INF}}, ["train.optimizer.lr", "inf", "a finite number"]),
    ({"distill.temperature": NAN}, ["distill.temperature", "nan", "a finite number"]),
    ({"distill.ce_weight": -INF}, ["distill.ce_weight", "-inf"]),
    ({"distill.terms": [{"method": "kd", "weight": INF}]}, ["distill.terms[0].weight", "inf"]),
    ({"distill.terms": [{"method": "kd", "temperature": NAN}]}, ["distill.terms[0].temperature", "nan"]),
    ({"distill.terms": [{"method": "dkd", "options": {"beta": INF}}]}, ["distill.terms[0].options.beta", "inf"]),
    ({"train.max_grad_norm": INF}, ["train.max_grad_norm", "inf"]),
    ({"train.optimizer": {"schedule": "step", "gamma": NAN}}, ["train.optimizer.gamma", "nan"]),
    ({"export": {"sparsity": NAN}}, ["export.sparsity", "nan"]),
    ({"teacher_cache": {"max_feature_mb": INF}}, ["teacher_cache.max_feature_mb", "inf"]),
    ({"student.kwargs": {"channels": 4, "scale": NAN}}, ["student.kwargs.scale", "nan"]),
    ({"data.params": {"num_samples": 1000, "noise": -INF}}, ["data.params.noise", "-inf"]),
    ({"teacher.weight": INF}, ["teacher.weight", "inf"]),
]


@pytest.mark.parametrize("changes,words", NON_FINITE_CASES, ids=[next(iter(c[0])) + " " + c[1][0] for c in NON_FINITE_CASES])
def test_non_finite_numbers_in_a_config_are_refused(tmp_path, cache_dir, capsys, changes, words):
    refused(tmp_path, cache_dir, train(tmp_path, base_config(cache_dir, **changes)), words, capsys)


@pytest.mark.parametrize("space_changes,words", [
    ({"methods": {"kd": [{"method": "kd", "temperature": {"float": [1e-3, INF]}}]}},
     ["methods.kd[0].temperature.float[1]", "inf", "a finite number"]),
    ({"methods": {"kd": [{"method": "kd", "weight": {"float": [NAN, 1]}}]}}, ["methods.kd[0].weight.float[0]", "nan"]),
    ({"methods": {"kd": [{"method": "kd", "weight": {"choice": [0.5, INF]}}]}}, ["choice[1]", "inf"]),
    ({"params": {"train.optimizer.lr": {"float": [-INF, 0.1]}}}, ["params.train.optimizer.lr.float[0]", "-inf"]),
    ({"params": {"teacher.weight": {"choice": [INF]}}}, ["params.teacher.weight.choice[0]", "inf"]),
], ids=["inf at the high end", "nan at the low end", "inf choice", "-inf in params", "inf ensemble weight"])
def test_non_finite_numbers_in_a_space_are_refused(tmp_path, cache_dir, capsys, space_changes, words):
    refused(tmp_path, cache_dir, search(tmp_path, base_config(cache_dir), **space_changes), words, capsys)


@pytest.mark.parametrize("override,words", [
    ("train.epochs.x=1", ["train.epochs is 2 (int)", "'x'"]),
    ("name.first=1", ["name is 'tiny' (str)"]),
    ("distill.terms.first.weight=1", ["a list index below 1 after distill.terms", "'first'"]),
    (".a=1", ["non-empty parts"]),
    ("a..b=1", ["non-empty parts"]),
    ("=3", ["non-empty parts"]),
    ("train.epochs=[1", ["YAML", "the value"]),
    ("train.epochs", ["KEY=VALUE"]),
    ("distill.temperature=.inf", ["distill.temperature", "inf", "a finite number"]),
], ids=["into an int", "into a string", "a non-index into a list", "empty first part", "empty middle part",
        "empty key", "value not YAML", "no =", "inf value"])
def test_bad_set_overrides_are_refused(tmp_path, cache_dir, capsys, override, words):
    field = [] if "=." in override else ["--set", repr(override)]
    refused(tmp_path, cache_dir, train(tmp_path, base_config(cache_dir)) + ["--set", override], field + words, capsys)


def test_errors_of_a_model_factory_name_the_users_field(tmp_path, cache_dir, capsys, monkeypatch):
    """A factory that fails when built (not when checked) is reported under student.kwargs, not model.kwargs."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "helpers"))
    base = base_config(cache_dir, teacher=None, **{"distill.terms": [],
                                                    "student": {"name": "model_factories:flexible",
                                                                "kwargs": {"out_features": "three"}}})
    refused(tmp_path, cache_dir, train(tmp_path, base), ["student.kwargs", "'three'", "flexible"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# issue 13: values that only the real data, models and devices show; paths; the cluster; results files

NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
MLP_STUDENT = {"name": "mnist1d_mlp"}

# (id, config changes, words the message must hold): refused by `kdray train` and by `kdray search`
LATER_CASES = [
    ("no training examples left after the split",
     {"data.val_fraction": 0.99, "data.params": {"num_samples": 40}}, ["data.val_fraction", "0 training examples"]),
    ("fewer than 2 classes after label_map", {"data.params": {"num_samples": 1000, "label_map": [0] * 10}},
     ["data.params", "1 class", "at least 2 classes"]),
    ("a teacher recipe's data with no training examples",
     {"teacher.recipe.data": {"name": "mnist1d", "val_fraction": 0.99, "params": {"num_samples": 40}}},
     ["teacher.recipe.data.val_fraction", "0 training examples"]),
    ("a student whose classes differ from the data's",
     {"student": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 4, "num_classes": 5}}},
     ["student.kwargs", "5 output classes", "10 classes"]),
    ("a built-in student whose input no longer fits changed data parameters",
     {"student": MLP_STUDENT, "data.params": {"num_samples": 1000, "final_seq_length": 20}},
     ["student.kwargs", "inputs of shape (20,)", "in_length"]),
    ("a teacher whose input does not fit the data",
     {"teacher.model": {"name": "mnist1d_cnn", "kwargs": {"channels": 16, "in_length": 80}}},
     ["teacher.model.kwargs", "inputs of shape (40,)"]),
    ("a teacher recipe on a device that is not there", {"teacher.recipe.train": {"epochs": 1, "device": "cuda"}},
     ["teacher.recipe.train.device", "'cuda'", "no CUDA device"]),
]


@pytest.mark.parametrize("command", ["train", "search"])
@pytest.mark.parametrize("changes,words", [c[1:] for c in LATER_CASES], ids=[c[0] for c in LATER_CASES])
def test_values_that_only_fail_later_are_refused_up_front(tmp_path, capsys, command, changes, words):
    if "cuda" in str(changes) and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    cache = tmp_path / "cache"  # its own: no teacher may be trained or cached for a refused run
    base = base_config(cache, **changes)
    argv = search(tmp_path, base, methods=KD) if command == "search" else train(tmp_path, base)
    refused(tmp_path, cache, argv, words, capsys)
    assert not (cache / "teachers").exists() or not any((cache / "teachers").iterdir())


@NO_CUDA
def test_a_student_device_that_is_not_there_is_refused(tmp_path, cache_dir, capsys):
    base = base_config(cache_dir, **{"train.device": "cuda"})
    refused(tmp_path, cache_dir, train(tmp_path, base), ["train.device", "'cuda'", "no CUDA device"], capsys)
    refused(tmp_path, cache_dir, search(tmp_path, base, methods=KD), ["train.device", "'cuda'", "no GPU"], capsys)


@pytest.mark.parametrize("command", ["train", "search"])
@pytest.mark.parametrize("name", ["", "a/b", "..", "x\\y"])
def test_run_and_search_names_that_are_not_folder_names_are_refused(tmp_path, cache_dir, capsys, command, name):
    base = base_config(cache_dir, name=name)
    argv = search(tmp_path, base, methods=KD, name=name) if command == "search" else train(tmp_path, base)
    refused(tmp_path, cache_dir, argv, ["name", repr(name), "without '/'"], capsys)


def test_an_invalid_registered_model_name_is_refused(tmp_path, cache_dir, capsys):
    argv = search(tmp_path, base_config(cache_dir), methods=KD, registered_model="team/students")
    refused(tmp_path, cache_dir, argv, ["registered_model", "'team/students'", "without '/' or ':'"], capsys)
    # the default registered model follows --experiment: checked before any work too
    argv = search(tmp_path, base_config(cache_dir), methods=KD) + ["--experiment", "team:a"]
    refused(tmp_path, cache_dir, argv, ["--experiment", "'team:a-student'", "without '/' or ':'"], capsys)


def test_unusable_folders_are_refused_before_any_work(tmp_path, cache_dir, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    base = base_config(cache_dir)
    argv = train(tmp_path, base)
    refused(tmp_path, cache_dir, argv[:2] + ["--output-dir", str(a_file / "run")], ["--output-dir", "is a file"], capsys)
    refused(tmp_path, cache_dir, train(tmp_path, base_config(cache_dir, cache_dir=str(a_file / "cache"))),
            ["cache_dir", "a-file", "is a file"], capsys)
    argv = search(tmp_path, base)
    storage = argv.index("--storage-path") + 1
    for bad, words in [(str(a_file / "results"), ["--storage-path", "is a file"]),
                       ("ftp://host/results", ["--storage-path", "'ftp://host/results'", "s3://"])]:
        refused(tmp_path, cache_dir, argv[:storage] + [bad] + argv[storage + 1:], words, capsys)


def test_kdray_cache_dir_from_the_environment_is_checked(tmp_path, cache_dir, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(a_file / "cache"))
    base = base_config(cache_dir)
    base.pop("cache_dir")
    refused(tmp_path, cache_dir, train(tmp_path, base), ["KDRAY_CACHE_DIR", "is a file"], capsys)


def test_a_second_run_into_an_occupied_folder_is_refused_and_the_first_kept(tmp_path, cache_dir, capsys):
    base = base_config(cache_dir)
    argv = train(tmp_path, base)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "student.pt").write_bytes(b"the first run's student")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "--overwrite" in err and "Traceback" not in err
    assert (run_dir / "student.pt").read_bytes() == b"the first run's student"
    assert main(argv + ["--overwrite", "--set", "train.epochs=1"]) == 0
    assert (run_dir / "student.pt").read_bytes() != b"the first run's student"


def test_a_search_over_an_earlier_search_of_the_same_name_is_refused(tmp_path, cache_dir, capsys):
    argv = search(tmp_path, base_config(cache_dir), methods=KD)
    earlier = tmp_path / "results" / SPACE["name"]
    earlier.mkdir(parents=True)
    (earlier / "results.parquet").write_bytes(b"an earlier search")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(earlier) in err and "Traceback" not in err
    assert (earlier / "results.parquet").read_bytes() == b"an earlier search"
    import ray

    assert not ray.is_initialized()


def test_a_student_is_never_lost_when_its_folder_turns_bad_after_training(tmp_path, tiny_raw):
    from kdray.errors import KdrayError
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import run

    tiny_raw["train"]["epochs"] = 1
    a_file = tmp_path / "a-file"
    a_file.write_text("became a file during training")
    with pytest.raises(KdrayError) as e:
        run(parse_config(tiny_raw), output_dir=a_file / "run")
    rescue = Path(str(e.value).rsplit("saved in ", 1)[1].split(" instead")[0])
    assert (rescue / "student.pt").is_file() and (rescue / "summary.json").is_file()


def test_a_ray_address_with_no_ray_behind_it_is_refused_within_seconds(tmp_path, cache_dir, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    argv = search(tmp_path, base_config(cache_dir), methods=KD) + ["--address", f"127.0.0.1:{port}"]
    refused(tmp_path, cache_dir, argv, ["--address", f"127.0.0.1:{port}", "nothing answers", "omit --address"],
            capsys)
    assert time.monotonic() - t0 < 120  # ray.init alone waits minutes here


@pytest.mark.parametrize("option,value,words", [
    ("--cpus-per-worker", "100", ["--cpus-per-worker", "100", "at most 2 CPUs per worker"]),
    ("--gpus-per-worker", "1", ["--gpus-per-worker", "1", "at most 0 GPUs per worker"]),
    ("--num-cpus", "0", ["--num-cpus", "0", "1 or more"]),
    ("--workers-per-trial", "3", ["--workers-per-trial", "3", "at most 2 workers", "2 CPUs"]),
])
def test_resources_no_node_can_provide_are_refused(tmp_path, cache_dir, capsys, option, value, words):
    if option == "--gpus-per-worker" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = search(tmp_path, base_config(cache_dir), methods=KD) + ["--num-cpus", "2", option, value]
    refused(tmp_path, cache_dir, argv, words, capsys)


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet", pickle.dumps({"a": 1})],
                         ids=["empty", "damaged", "not parquet"])
@pytest.mark.parametrize("command", ["results", "report"])
def test_results_and_report_on_a_damaged_results_file_name_the_file(tmp_path, cache_dir, capsys, content, command):
    folder = tmp_path / "a-search"
    folder.mkdir()
    (folder / "results.parquet").write_bytes(content)
    refused(tmp_path, cache_dir, [command, str(folder)], ["EXPERIMENT", "results.parquet", "written by kdray search"],
            capsys)


def test_report_output_that_is_a_folder_or_under_a_file_is_refused(tmp_path, cache_dir, capsys):
    import pandas as pd

    folder = tmp_path / "a-search"
    folder.mkdir()
    pd.DataFrame({"trial_id": ["t1"], "status": ["finished"], "val_acc": [0.5]}).to_parquet(folder / "results.parquet")
    (tmp_path / "a-file").write_text("x")
    for out, words in [(folder, ["--output", "a file path", "folder"]),
                       (tmp_path / "a-file" / "report.html", ["--output", "is a file"])]:
        refused(tmp_path, cache_dir, ["report", str(folder), "-o", str(out)], words, capsys)
    assert main(["report", str(folder), "-o", str(tmp_path / "new" / "r.html")]) == 0
    assert (tmp_path / "new" / "r.html").is_file()
