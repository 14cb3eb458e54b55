"""The teacher-output cache: hits, keys that change with the teacher and the data, corruption detected and
rebuilt, float16 under a budget, `kdray cache`, and a second search that builds nothing."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from kdray.cli import main
from kdray.core.cache import CacheRequest, entries_root, get_cache, list_entries
from kdray.core.probes import ProbeSpec
from kdray.experiment.configs import parse_config
from kdray.experiment.run import prepare, run
from kdray.search.driver import SearchOptions, run_search

PROBE = ProbeSpec("relu3", "mean", 1e-3, 100)
REQ = CacheRequest(("relu2",), (PROBE,))


@pytest.fixture
def cache_root(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture(scope="module")
def prep():
    from conftest import TINY

    return prepare(parse_config(copy.deepcopy(TINY)))


def test_entry_content_and_a_hit_the_second_time(prep, cache_root, caplog):
    caplog.set_level(logging.INFO, "kdray")
    first = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    assert not first.hit
    b = prep.bundle
    for split, x in (("train", b.x_train), ("val", b.x_val), ("test", b.x_test)):
        cols = first.arrays[split]
        assert np.array_equal(cols["example_id"], np.arange(len(x)))
        with torch.no_grad():
            expected = prep.teacher(x)
        np.testing.assert_allclose(cols["logits"], expected.numpy(), rtol=1e-5, atol=1e-5)
        assert cols["feat/relu2"].shape == (len(x), 16, 40)
        assert cols[PROBE.column].shape == (len(x), 10)
    np.testing.assert_array_equal(first.arrays["train"]["label"], b.y_train.numpy())  # -1: unlabelled
    m = first.manifest
    assert m["examples"] == len(b.x_train) + len(b.x_val) + len(b.x_test)
    assert m["bytes_per_example"] == pytest.approx(m["bytes"] / m["examples"], rel=1e-3)
    assert m["probes"][0]["layer"] == "relu3" and 0 <= m["probes"][0]["val_acc"] <= 1
    second = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    assert second.hit and second.key == first.key
    # a smaller request is served by the entry that covers it
    third = get_cache(prep.teacher, prep.bundle, CacheRequest(), cache_root=cache_root)
    assert third.hit and third.key == first.key
    assert len(list_entries(cache_root)) == 1
    assert "teacher cache: hit" in caplog.text


def test_other_teacher_weights_data_or_dtype_make_a_new_entry(prep, cache_root, tiny_raw):
    base = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    other = copy.deepcopy(prep.teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert get_cache(other, prep.bundle, REQ, cache_root=cache_root).key != base.key
    tiny_raw["data"]["params"]["num_samples"] = 800
    smaller = prepare(parse_config(tiny_raw))
    entry = get_cache(prep.teacher, smaller.bundle, REQ, cache_root=cache_root)
    assert not entry.hit and entry.key != base.key and entry.manifest["examples"] == 800
    half = get_cache(prep.teacher, prep.bundle, CacheRequest(("relu2",), (), "float16"), cache_root=cache_root)
    assert not half.hit and half.arrays["train"]["feat/relu2"].dtype == np.float16
    assert len(list_entries(cache_root)) == 4


def test_a_corrupt_file_is_detected_and_rebuilt(prep, cache_root, caplog):
    entry = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    path = entry.path / "train.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, "kdray")
    again = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    assert not again.hit and "corrupt" in caplog.text and "checksum" in caplog.text
    np.testing.assert_array_equal(again.arrays["train"]["logits"], entry.arrays["train"]["logits"])
    (again.path / "manifest.json").write_text("{not json")
    assert not get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root).hit


def test_cached_and_in_memory_teacher_signals_train_the_same_student(tiny_raw):
    tiny_raw["distill"]["terms"] = [{"method": "fitnet", "teacher_layers": ["relu3"], "student_layers": ["relu3"]},
                                    {"method": "probe_kd", "teacher_layers": ["relu3"], "options": {"pooling": "max"}}]
    cached = run(parse_config(tiny_raw))
    tiny_raw["teacher_cache"] = {"enabled": False}
    live = run(parse_config(tiny_raw))
    assert cached.history[-1]["loss"] == pytest.approx(live.history[-1]["loss"], rel=1e-4)
    assert cached.test_acc == pytest.approx(live.test_acc)
    assert cached.probes == live.probes
    assert cached.probes[0]["l2"] > 0  # l2: auto (the default): the strength chosen, in summary.json


def test_features_over_the_budget_go_float16_or_stay_uncached(tiny_raw, caplog):
    caplog.set_level(logging.INFO, "kdray")
    tiny_raw["distill"]["terms"] = [{"method": "fitnet", "teacher_layers": ["relu2"], "student_layers": ["relu2"]}]
    n = 1000  # examples in all splits; relu2 is 16 x 40 per example
    tiny_raw["teacher_cache"] = {"max_feature_mb": n * 640 * 3 / 1e6}  # fits in float16 only
    run(parse_config(tiny_raw))
    assert "storing them in float16" in caplog.text
    tiny_raw["teacher_cache"] = {"max_feature_mb": 0.1}
    run(parse_config(tiny_raw))
    assert "not cached" in caplog.text and "computed once in memory" in caplog.text


def test_kdray_cache_build_ls_rm(tmp_path, tiny_raw, capsys):
    import yaml
    from helpers.searches import write_space

    space = write_space(tmp_path, tiny_raw)
    root = str(tmp_path / "c")
    assert main(["cache", "build", str(space), "--cache-dir", root]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built") and "probe relu2 (flatten)" in out and "probe relu3 (mean)" in out
    assert main(["cache", "build", str(space), "--cache-dir", root]) == 0
    assert capsys.readouterr().out.startswith("hit")
    assert main(["cache", "ls", "--format", "json", "--cache-dir", root]) == 0
    entries = yaml.safe_load(capsys.readouterr().out)
    assert len(entries) == 1 and entries[0]["feature_layers"] == "relu2,relu3"
    assert main(["cache", "rm", "nope", "--cache-dir", root]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["cache", "rm", entries[0]["key"], "--cache-dir", root]) == 0
    assert list_entries(root) == []


def test_a_second_search_builds_nothing(tmp_path, tiny_raw, monkeypatch):
    from helpers.searches import write_space

    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path / "cache"))  # trials (other processes) see it too
    space = write_space(tmp_path, tiny_raw, search={"num_trials": 3, "concurrency": 2, "max_epochs": 1,
                                                    "scheduler": "none"})
    opts = dict(num_cpus=2, progress=False, baseline=False, tracking=False)
    import ray

    ray.shutdown()  # a new local Ray, so that its workers get this test's KDRAY_CACHE_DIR
    try:
        run_search(str(space), SearchOptions(storage_path=str(tmp_path / "r1"), **opts))
        entries = list_entries()
        assert len(entries) == 1
        run_search(str(space), SearchOptions(storage_path=str(tmp_path / "r2"), **opts))
    finally:
        ray.shutdown()
    assert list_entries() == entries  # same entry, same creation time: nothing was built


def _wrong_shapes(good: dict) -> dict:
    """Entry folder name -> a manifest of the wrong shape, and what the warning must say about it."""
    def edit(**changes):
        m = copy.deepcopy(good)
        m.update(changes)
        return {k: v for k, v in m.items() if v is not DROP}

    DROP = object()
    return {"a-list": ([good], "manifest is a list, expected an object"),
            "null": (None, "manifest is NoneType, expected an object"),
            "no-key": (edit(key=DROP), "manifest has no 'key'"),
            "no-files": (edit(files=DROP), "manifest has no 'files'"),
            "files-a-string": (edit(files="train.parquet"), "'files' is 'train.parquet', expected an object"),
            "examples-a-string": (edit(examples="many"), "'examples' is 'many', expected an integer"),
            "probe-without-layer": (edit(request={**good["request"], "probes": [{"pooling": "mean"}]}),
                                    "probe[0] has no 'layer'"),
            "file-without-checksum": (edit(files={**good["files"], "val.parquet": {"bytes": 1, "rows": 1}}),
                                      "has no 'sha256'"),
            "copied-entry": (good, "is not the folder name")}


def test_wrong_shape_manifests_are_reported_skipped_and_removable(prep, cache_root, caplog, capsys):
    import json
    import shutil

    import yaml

    entry = get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root)
    shapes = _wrong_shapes(entry.manifest)
    for name, (manifest, _) in shapes.items():
        shutil.copytree(entry.path, entry.path.parent / name)
        (entry.path.parent / name / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, "kdray")
    assert main(["cache", "ls", "--format", "json", "--cache-dir", cache_root]) == 0
    assert [e["key"] for e in yaml.safe_load(capsys.readouterr().out)] == [entry.key]
    for name, (_, problem) in shapes.items():
        assert f"entry {name} is corrupt" in caplog.text and problem in caplog.text, name
    # lookups skip them too: a hit on the good entry, and a build (no crash) once it is gone
    assert get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root).hit
    assert main(["cache", "rm", entry.key, "--cache-dir", cache_root]) == 0
    assert capsys.readouterr().out == f"removed {entry.key}\n"
    assert not get_cache(prep.teacher, prep.bundle, REQ, cache_root=cache_root).hit
    assert main(["cache", "rm", "a-list", "no-key", "--cache-dir", cache_root]) == 0
    assert capsys.readouterr().out.split() == ["removed", "a-list", "removed", "no-key"]
    assert main(["cache", "rm", "--all", "--cache-dir", cache_root]) == 0
    assert not any(entry.path.parent.iterdir())
    assert main(["cache", "ls", "--cache-dir", cache_root]) == 0
    assert "empty" in capsys.readouterr().out


class Interrupting(nn.Module):
    """The teacher, until its forward has run ``after`` times; then it raises ``error`` (Ctrl-C, a crash)."""

    def __init__(self, teacher: nn.Module, after: int, error: type[BaseException]):
        super().__init__()
        self.teacher, self.after, self.error, self.calls = teacher, after, error, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise self.error("interrupted during the build")
        return self.teacher(x)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_build_leaves_no_temporary_folder_and_no_entry(prep, cache_root, error):
    teacher = Interrupting(prep.teacher, after=3, error=error)
    with pytest.raises(error):
        get_cache(teacher, prep.bundle, CacheRequest(("teacher.relu2",)), cache_root=cache_root, batch_size=100)
    assert teacher.calls == 4  # it did stop in the middle of the build
    root = entries_root(cache_root)
    assert list(root.iterdir()) == [] and list_entries(cache_root) == []


def test_temporary_folders_of_killed_builds_are_swept(cache_root):
    import os
    import subprocess
    import sys
    import time

    from kdray.core.cache_store import _HOST, STALE_TMP_SECONDS

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = entries_root(cache_root)
    names = {f".k1.{_HOST}.{dead.pid}.tmp": False,  # its process is gone
             f".k2.{_HOST}.{os.getpid()}.tmp": True,  # a build in progress
             ".k3.otherhost.1.tmp": True,  # another machine's build: kept until it is old
             ".k4.otherhost.2.tmp": False, ".k5.3.tmp": False}  # old
    for name in names:
        (root / name).mkdir()
    old = time.time() - STALE_TMP_SECONDS - 60
    for name in (".k4.otherhost.2.tmp", ".k5.3.tmp"):
        os.utime(root / name, (old, old))
    assert main(["cache", "ls", "--cache-dir", cache_root]) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(n for n, kept in names.items() if kept)
