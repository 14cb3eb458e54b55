"""The teacher pass on Ray Data (kdray.search.teacher_pass) and the teacher cache on shared storage: a 2-actor
pass makes the entry the single-process pass makes (same arrays, bit for bit in float32 on CPU, same manifest
checksums), also as a `file://` URI; a worker killed during the pass does not corrupt the entry; workers above
the cluster's capacity and an unwritable cache URI are refused before any work."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdray.cli import main
from kdray.core.cache import CacheRequest, get_cache, list_entries
from kdray.core.cache_store import SPLITS
from kdray.core.probes import ProbeSpec
from kdray.experiment.configs import parse_config
from kdray.experiment.run import prepare

HELPERS = Path(__file__).parent / "helpers"
REQ = CacheRequest(("relu2",), (ProbeSpec("relu3", "mean", 1e-3, 100),))


@pytest.fixture(scope="module")
def prep():
    from conftest import TINY

    return prepare(parse_config(copy.deepcopy(TINY)))


@pytest.fixture
def uri_cache_env(monkeypatch, tmp_path, kdray_cache):
    """``--cache-dir URI`` sets $KDRAY_CACHE_DIR for the process: restore it after the test. With a URI there,
    teachers and generated data use $XDG_CACHE_HOME/kdray: point that at the session's cache (no retraining)."""
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(kdray_cache))
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg/kdray").symlink_to(kdray_cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs (loopback, token auth) whose workers can import ``helpers`` (tests/helpers)."""
    import ray

    ray.shutdown()
    path = os.pathsep.join(p for p in (str(HELPERS.parent), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path, "KDRAY_CACHE_DIR": os.environ.get("KDRAY_CACHE_DIR", "")}})
    yield
    ray.shutdown()


def assert_same_entry(a, b) -> None:
    """Same key, same arrays (exactly), same files and checksums."""
    assert a.key == b.key
    for split in SPLITS:
        assert sorted(a.arrays[split]) == sorted(b.arrays[split])
        for col, arr in a.arrays[split].items():
            assert arr.dtype == b.arrays[split][col].dtype, (split, col)
            np.testing.assert_array_equal(arr, b.arrays[split][col], err_msg=f"{split} {col}")
    assert a.manifest["files"] == b.manifest["files"] and a.manifest["shapes"] == b.manifest["shapes"]
    assert a.manifest["probes"] == b.manifest["probes"]


def test_two_actors_make_the_single_process_entry_also_on_a_storage_uri(prep, local_ray, tmp_path, caplog):
    from kdray.search.teacher_pass import ray_outputs_fn

    single = get_cache(prep.teacher, prep.bundle, REQ, cache_root=str(tmp_path / "local"), batch_size=100)
    uri = f"file://{tmp_path}/shared"
    caplog.set_level(logging.INFO, "kdray")
    spread = get_cache(prep.teacher, prep.bundle, REQ, cache_root=uri, batch_size=100,
                       outputs_fn=ray_outputs_fn(2, use_gpu=False))
    assert not spread.hit and "on 2 Ray Data actors (CPU), batches of 100" in caplog.text
    assert isinstance(spread.path, str) and spread.path.startswith(uri)
    assert_same_entry(single, spread)
    assert {"train.parquet", "val.parquet", "test.parquet", "manifest.json"} == \
        {p.name for p in (tmp_path / "shared/teacher_outputs" / spread.key).iterdir()}
    again = get_cache(prep.teacher, prep.bundle, REQ, cache_root=uri)  # read back from the URI, checksums checked
    assert again.hit and again.key == spread.key
    assert [e["key"] for e in list_entries(uri)] == [spread.key]
    # a reference (what trials on other nodes get) reads the arrays from storage
    ref = spread.reference()
    assert ref.arrays == {} and ref.loaded().arrays["train"]["logits"].shape == single.arrays["train"]["logits"].shape


def test_a_corrupt_file_on_storage_is_detected_and_rebuilt(prep, tmp_path, caplog):
    uri = f"file://{tmp_path}/shared"
    entry = get_cache(prep.teacher, prep.bundle, REQ, cache_root=uri)
    path = tmp_path / "shared/teacher_outputs" / entry.key / "val.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, "kdray")
    again = get_cache(prep.teacher, prep.bundle, REQ, cache_root=uri)
    assert not again.hit and "does not match its checksum" in caplog.text
    assert_same_entry(entry, again)
    assert main(["cache", "rm", "--all", "--cache-dir", uri]) == 0
    assert list_entries(uri) == [] and not any((tmp_path / "shared/teacher_outputs").iterdir())


def test_a_worker_killed_during_the_pass_does_not_corrupt_the_entry(prep, local_ray, tmp_path, caplog):
    from helpers.fault_teachers import DiesOnce

    from kdray.search.teacher_pass import object_store_loader, ray_outputs_fn

    marker = tmp_path / "died"
    teacher = DiesOnce(prep.teacher, str(marker), after=2).eval()
    req = CacheRequest(("teacher.relu2",))
    caplog.set_level(logging.INFO, "kdray")
    spread = get_cache(teacher, prep.bundle, req, cache_root=str(tmp_path / "spread"), batch_size=100,
                       outputs_fn=ray_outputs_fn(2, False, object_store_loader(teacher)))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor did die during the pass
    single = get_cache(teacher, prep.bundle, req, cache_root=str(tmp_path / "single"), batch_size=100)
    assert_same_entry(single, spread)
    assert get_cache(teacher, prep.bundle, req, cache_root=str(tmp_path / "spread")).hit  # intact on disk


def _kdray_lines(out: str) -> list[str]:
    """kdray's lines of stdout (without what Ray's error reporter prints there about an earlier test's workers)."""
    return [line for line in out.splitlines() if "(raylet)" not in line and "(MapWorker" not in line]


def _space_with(tmp_path: Path, tiny_raw: dict, **teacher_cache) -> Path:
    from helpers.searches import write_space

    tiny_raw["teacher_cache"] = teacher_cache
    return write_space(tmp_path, tiny_raw, search={"num_trials": 2, "concurrency": 2, "max_epochs": 1,
                                                   "scheduler": "none"})


def test_kdray_cache_build_runs_the_pass_on_two_actors_and_shuts_its_ray_down(tmp_path, tiny_raw, capsys, caplog,
                                                                               uri_cache_env):
    import ray

    ray.shutdown()
    space = _space_with(tmp_path, tiny_raw, workers=2)
    uri = f"file://{tmp_path}/shared"
    caplog.set_level(logging.INFO, "kdray")
    assert main(["cache", "build", str(space), "--cache-dir", uri, "--num-cpus", "2"]) == 0
    built = _kdray_lines(capsys.readouterr().out)
    assert built[0].startswith("built") and f"in {uri}/teacher_outputs/" in built[0]
    assert "on 2 Ray Data actors (CPU)" in caplog.text
    assert not ray.is_initialized()
    assert main(["cache", "build", str(space), "--cache-dir", uri, "--num-cpus", "2"]) == 0
    assert _kdray_lines(capsys.readouterr().out)[0].startswith("hit")
    assert main(["cache", "ls", "--format", "json", "--cache-dir", uri]) == 0
    assert len(yaml.safe_load(capsys.readouterr().out)) == 1


@pytest.mark.parametrize("workers, expected", [(3, "at most 2 actors, one per CPU of this Ray cluster"),
                                               (0, "a whole number of Ray actors (1 or more)")])
def test_workers_the_cluster_cannot_hold_are_refused_before_any_work(tmp_path, tiny_raw, capsys, workers, expected,
                                                                     monkeypatch, kdray_cache):
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(kdray_cache))  # --cache-dir sets it for the process
    import ray

    ray.shutdown()
    space = _space_with(tmp_path, tiny_raw, workers=workers)
    root = tmp_path / "cache"
    assert main(["cache", "build", str(space), "--cache-dir", str(root), "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "teacher_cache.workers" in err and str(workers) in err and expected in err
    assert not ray.is_initialized() and not (root / "teacher_outputs").exists()


def test_a_search_refuses_workers_above_the_cluster_and_leaves_no_ray(tmp_path, tiny_raw):
    import ray

    from kdray.errors import ConfigError
    from kdray.search.driver import SearchOptions, run_search

    ray.shutdown()
    space = _space_with(tmp_path, tiny_raw, workers=5)
    with pytest.raises(ConfigError) as e:
        run_search(str(space), SearchOptions(storage_path=str(tmp_path / "r"), num_cpus=2, progress=False,
                                             baseline=False, tracking=False))
    assert e.value.field == "teacher_cache.workers" and e.value.value == 5
    assert not ray.is_initialized() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("uri, expected", [("file://{tmp}/a-file/cache", "a folder path"),
                                           ("ftp://host/cache", "a URI of s3://, gs://")])
def test_an_unwritable_or_unknown_cache_uri_is_refused_before_any_work(tmp_path, tiny_raw, capsys, uri, expected,
                                                                      uri_cache_env):
    (tmp_path / "a-file").write_text("not a folder")
    space = _space_with(tmp_path, tiny_raw, workers=1)
    uri = uri.format(tmp=tmp_path)
    assert main(["cache", "build", str(space), "--cache-dir", uri]) == 2
    err = capsys.readouterr().err
    assert "cache_dir" in err and uri in err and expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "base.yaml", "space.yaml", "xdg"]


def test_a_language_model_teacher_with_two_views_makes_the_single_process_entry(local_ray, tmp_path):
    """A tiny Qwen2 teacher reading its own prompts (a BERT student reads another view): 2 actors over the
    length-grouped batches give the single-process entry, pooled states of every decoder layer included."""
    from helpers import llm

    from kdray.search.teacher_pass import ray_outputs_fn

    llm.save_causal_lm(tmp_path / "qwen", "qwen2")
    llm.save_bert(tmp_path / "bert")
    llm.write_mc(tmp_path / "arc", "arc", n_train=60, n_test=20)
    raw = {"name": "lm", "data": {"name": "multiple_choice", "root": str(tmp_path / "arc"), "label_fraction": 0.5,
                                  "params": {"student_tokenizer": str(tmp_path / "bert")}},
           "teacher": {"model": {"name": "hf_causal_lm", "kwargs": {"path": str(tmp_path / "qwen")}}},
           "student": {"name": "hf_sequence_classifier", "kwargs": {"path": str(tmp_path / "bert"), "config_only": True}},
           "distill": {"terms": [{"method": "probe_kd", "teacher_layers": ["model.model.layers.0"],
                                  "options": {"pooling": "last"}}]}}
    lm = prepare(parse_config(raw))
    assert lm.bundle.two_views
    req = CacheRequest((), tuple(ProbeSpec(f"model.model.layers.{i}", "last", 1e-3, 100) for i in range(3)),
                       pooled_dtype="float16")
    single = get_cache(lm.teacher, lm.bundle, req, cache_root=str(tmp_path / "local"), batch_size=16)
    spread = get_cache(lm.teacher, lm.bundle, req, cache_root=str(tmp_path / "spread"), batch_size=16,
                       outputs_fn=ray_outputs_fn(2, use_gpu=False))
    assert not spread.hit
    assert_same_entry(single, spread)
