"""Config validation: every bad input is one ConfigError naming the field, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdray.config import MAX_YAML_VALUES, apply_overrides, parse_yaml, read_yaml
from kdray.errors import ConfigError
from kdray.experiment.configs import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def bad(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if "qwen" not in p.name))
def test_shipped_configs_are_valid(path):
    """(The language-model configs name weights and data on the user's disk: tests/test_llm.py runs them on a
    stand-in made of the same folders.)"""
    cfg = load_config(path)
    assert cfg.student.name


def test_unknown_top_level_key_lists_known_keys(tiny_raw):
    tiny_raw["epochz"] = 3
    e = bad(tiny_raw)
    assert e.field == "epochz" and e.value == 3
    assert "known keys" in e.allowed and "train" in e.allowed and "distill" in e.allowed


def test_unknown_nested_key_names_the_path(tiny_raw):
    tiny_raw["train"]["optimizer"] = {"nme": "sgd"}
    e = bad(tiny_raw)
    assert e.field == "train.optimizer.nme"
    assert "lr" in e.allowed and "name" in e.allowed


def test_wrong_type(tiny_raw):
    tiny_raw["train"]["epochs"] = "many"
    e = bad(tiny_raw)
    assert e.field == "train.epochs" and e.value == "many" and "int" in e.allowed


@pytest.mark.parametrize("temp", [0, -1.5])
def test_temperature_must_be_positive(tiny_raw, temp):
    tiny_raw["distill"]["temperature"] = temp
    e = bad(tiny_raw)
    assert e.field == "distill.temperature" and e.value == temp and "> 0" in e.allowed


def test_term_temperature_and_negative_weight(tiny_raw):
    tiny_raw["distill"]["terms"][0]["temperature"] = 0
    assert bad(tiny_raw).field == "distill.terms[0].temperature"
    tiny_raw["distill"]["terms"][0]["temperature"] = 2
    tiny_raw["distill"]["terms"][0]["weight"] = -0.1
    e = bad(tiny_raw)
    assert e.field == "distill.terms[0].weight" and e.value == -0.1 and ">= 0" in e.allowed


@pytest.mark.parametrize("frac", [0, 0.0, 1.5, -0.2])
def test_label_fraction_range(tiny_raw, frac):
    tiny_raw["data"]["label_fraction"] = frac
    e = bad(tiny_raw)
    assert e.field == "data.label_fraction" and e.value == frac


def test_label_fraction_one_is_allowed(tiny_raw):
    tiny_raw["data"]["label_fraction"] = 1
    assert parse_config(tiny_raw).data.label_fraction == 1.0


def test_unknown_method_lists_methods(tiny_raw):
    tiny_raw["distill"]["terms"][0]["method"] = "kdd"
    e = bad(tiny_raw)
    assert e.field == "distill.terms[0].method" and e.value == "kdd"
    for name in ("kd", "probe_kd", "fitnet", "at", "fsp", "ab", "feature_l2", "sp", "rkd", "pkt", "dkd"):
        assert name in e.allowed


def test_all_weights_zero(tiny_raw):
    tiny_raw["distill"]["ce_weight"] = 0
    tiny_raw["distill"]["terms"][0]["weight"] = 0
    e = bad(tiny_raw)
    assert e.field == "distill" and "> 0" in e.allowed


def test_teacher_has_at_most_one_source(tiny_raw):
    tiny_raw["teacher"]["checkpoint"] = "teacher.pt"
    e = bad(tiny_raw)
    assert e.field == "teacher" and "at most one" in e.allowed
    # neither is a model with weights of its own, or refused before any work (tests/test_llm.py)


def test_terms_need_a_teacher(tiny_raw):
    del tiny_raw["teacher"]
    assert bad(tiny_raw).field == "teacher"


def test_unknown_model_and_dataset(tiny_raw):
    tiny_raw["student"]["name"] = "mnist1d_mpl"
    assert bad(tiny_raw).field.startswith("student")
    tiny_raw["student"]["name"] = "mnist1d_mlp"
    tiny_raw["data"]["name"] = "mnist2d"
    e = bad(tiny_raw)
    assert e.field == "data.name" and "mnist1d" in e.allowed


def test_method_options_are_checked(tiny_raw):
    tiny_raw["distill"]["terms"] = [{"method": "probe_kd", "teacher_layers": "relu3", "options": {"pooling": "avg"}}]
    e = bad(tiny_raw)
    assert e.field.startswith("distill.terms[0].options") and e.value == "avg"


def test_single_layer_string_becomes_a_list(tiny_raw):
    tiny_raw["distill"]["terms"] = [{"method": "probe_kd", "teacher_layers": "relu3"}]
    assert parse_config(tiny_raw).distill.terms[0].teacher_layers == ["relu3"]


def test_overrides_parse_values_and_index_lists(tiny_raw):
    out = apply_overrides(tiny_raw, ["train.optimizer.lr=1e-3", "distill.terms.0.weight=2", "seed=7"])
    cfg = parse_config(out)
    assert cfg.train.optimizer.lr == pytest.approx(1e-3) and cfg.distill.terms[0].weight == 2 and cfg.seed == 7
    assert tiny_raw["seed"] == 0  # the input is not modified
    with pytest.raises(ConfigError) as info:
        apply_overrides(tiny_raw, ["distill.terms.5.weight=1"])
    assert info.value.field == "--set" and info.value.value == "distill.terms.5.weight=1"
    with pytest.raises(ConfigError):
        apply_overrides(tiny_raw, ["no-equals-sign"])


def test_load_config_errors_on_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "mapping" in info.value.allowed


def test_relative_checkpoint_resolves_against_config_folder(tmp_path, tiny_raw):
    del tiny_raw["teacher"]["recipe"]
    tiny_raw["teacher"]["checkpoint"] = "t.pt"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert load_config(p).teacher.checkpoint == str(tmp_path / "t.pt")


# ---------------------------------------------------------------------------------------------
# issue 13: the YAML loader and ConfigError messages


def yaml_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "config", "c.yaml", "c.yaml")
    return info.value


def test_config_error_cuts_long_values_and_pickles_with_its_fields_intact():
    import pickle

    e = ConfigError("train.epochs", "x" * 10_000, "int")
    assert len(str(e)) < 300 and "(10002 characters)" in str(e) and str(e).startswith("train.epochs: got 'xxx")
    again = pickle.loads(pickle.dumps(e))
    assert (again.field, again.value, again.allowed, str(again)) == (e.field, e.value, e.allowed, str(e))
    assert "\n" not in str(ConfigError("a", "b", "valid YAML (line one\n  line two)"))  # one line on the terminal


@pytest.mark.parametrize("text,field,lines", [
    ("a: 1\na: 2\n", "a", "lines 1 and 2"),
    ("train:\n  optimizer:\n    lr: 1\n    lr: 2\n", "train.optimizer.lr", "lines 3 and 4"),
    ("distill:\n  terms:\n  - method: kd\n    method: at\n", "distill.terms[0].method", "lines 3 and 4"),
    ("m: {x: 1, y: 2, x: 3}\n", "m.x", "lines 1 and 1"),
])
def test_duplicate_keys_name_the_dotted_path_and_lines(text, field, lines):
    e = yaml_error(text)
    assert e.field == field and lines in e.allowed and "c.yaml" in e.allowed


def test_merge_keys_are_not_duplicates_and_keep_yaml_semantics():
    text = "base: &b {lr: 1, epochs: 2}\ntrain:\n  <<: *b\n  lr: 3\n"
    assert parse_yaml(text, "config", "c.yaml", "c.yaml") == {"base": {"lr": 1, "epochs": 2},
                                                              "train": {"lr": 3, "epochs": 2}}


def test_alias_bomb_is_refused_in_bounded_time_and_memory():
    import time
    import tracemalloc

    bomb = "a: &a [" + ", ".join(["lol"] * 10) + "]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefghijklmnop", "bcdefghijklmnopq"))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        e = yaml_error(bomb)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{MAX_YAML_VALUES:,} values" in e.allowed and e.field == "e"  # 10**5 values at e: the first too big
    assert seconds < 2 and peak < 20 * 2**20, (seconds, peak)


def test_many_plain_values_and_deep_nesting_are_refused_quickly():
    import time

    start = time.perf_counter()
    e = yaml_error("x: [" + ", ".join(["1"] * (MAX_YAML_VALUES + 10)) + "]\n")
    assert f"{MAX_YAML_VALUES:,} values" in e.allowed and time.perf_counter() - start < 5
    assert "nested" in yaml_error("x: " + "[" * 5000).allowed


def test_unreadable_file_is_refused(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\n")
    p.chmod(0)
    with pytest.raises(ConfigError) as info:
        read_yaml(p)
    assert "readable" in info.value.allowed


def test_override_descending_into_a_scalar_names_set_and_the_text(tiny_raw):
    with pytest.raises(ConfigError) as info:
        apply_overrides(tiny_raw, ["train.epochs.x=1"])
    assert info.value.field == "--set" and info.value.value == "train.epochs.x=1"
    assert "train.epochs is 2 (int)" in info.value.allowed


def test_non_finite_numbers_in_free_form_dicts(tiny_raw):
    tiny_raw["distill"]["terms"][0]["options"] = {"nested": [1.0, {"deep": float("nan")}]}
    e = bad(tiny_raw)
    assert e.field == "distill.terms[0].options.nested[1].deep" and "finite" in e.allowed
