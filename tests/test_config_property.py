"""Property tests (hypothesis): whatever a config or search space file holds, loading it either gives a valid
config or raises the documented :class:`~kdray.errors.ConfigError`, whose message starts with the field at
fault; never another exception.

Inputs are valid configs (the tiny test config and every shipped config; the test search space) with 1-3
random mutations: a value replaced by a random value (None, bools, numbers out of range, NaN, inf, random
strings, method and model names that may not exist, nested lists and dicts), a key deleted, an unknown key
added.
"""
from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path

import yaml
from conftest import TINY
from helpers.searches import SPACE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdray.config import ExperimentConfig, read_yaml
from kdray.errors import ConfigError
from kdray.experiment.configs import parse_config
from kdray.experiment.space import SearchSpace, load_space

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [TINY] + [read_yaml(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
WORDS = ["kd", "dkd", "probe_kd", "fitnet", "at", "nope", "mnist1d_cnn", "mnist1d_mlp", "resnet8", "relu3", "fc",
         "adam", "cosine", "offline", "online", "float16", "mean", "-1", "1e-3", "json:[1]", "missing.module:factory",
         "kdray.models:no_such_factory", "epochs", ""]
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.", max_size=12)  # no ':': nothing gets imported
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(), st.text(max_size=12),
                    st.sampled_from(WORDS), NAME)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(WORDS) | NAME, inner, max_size=3), max_leaves=8)
SETTINGS = settings(max_examples=200, deadline=None, database=None,  # nothing written into the repo
                    suppress_health_check=[HealthCheck.too_slow])


def paths(tree, prefix=()):
    """Every path to a node of a nested dict/list (the root included)."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def node_at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@st.composite
def mutated(draw, seeds: list[dict]):
    raw = copy.deepcopy(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(raw))))
        op = draw(st.sampled_from(["replace", "delete", "unknown key", "none", "name"]))
        parent, key = (node_at(raw, path[:-1]), path[-1]) if path else (None, None)
        if op == "unknown key" or parent is None:
            target = node_at(raw, path)
            if isinstance(target, dict):
                target[draw(NAME.filter(lambda k: k not in target)) or "zz"] = draw(VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "none":
            parent[key] = None
        elif op == "name":
            parent[key] = draw(st.sampled_from(WORDS) | NAME)
        else:
            parent[key] = draw(VALUES)
    return raw


def check_error(e: ConfigError, raw: dict, fields: set[str]) -> None:
    """The message is "<field>: got <value>; allowed: <what>" and the field names something real."""
    assert isinstance(e.field, str) and e.field and str(e).startswith(f"{e.field}: got "), str(e)
    assert "; allowed: " in str(e) and e.allowed, str(e)
    tail = e.field.split(" -> ")[-1]  # a space field -> the config field of a trial
    assert any(tail == k or tail.startswith((k + ".", k + "[", k + " ")) for k in fields | {str(k) for k in raw}), \
        (e.field, str(e))


@SETTINGS
@given(raw=mutated(SEEDS))
def test_parse_config_gives_a_valid_config_or_a_config_error(raw):
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        check_error(e, raw, set(ExperimentConfig.model_fields))
    else:
        assert isinstance(cfg, ExperimentConfig)
        again = ExperimentConfig.model_validate(cfg.model_dump())  # what was accepted is valid as it stands
        assert again == cfg


_folder = Path(tempfile.mkdtemp(prefix="kdray-property-"))
(_folder / "base.yaml").write_text(yaml.safe_dump(TINY))
_count = itertools.count()
SPACE_FIELDS = set(SearchSpace.model_fields) | {"space", "search space", "base", "params", "methods"}


@SETTINGS
@given(raw=mutated([SPACE, {**SPACE, "methods": {"kd": SPACE["methods"]["kd"]}}]))
def test_load_space_gives_a_valid_space_or_a_config_error(raw):
    path = _folder / f"space-{next(_count)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        space, base_raw, base_dir = load_space(path)
    except ConfigError as e:
        check_error(e, raw if isinstance(raw, dict) else {}, SPACE_FIELDS)
    else:
        assert isinstance(space, SearchSpace) and base_raw == TINY and base_dir == _folder
    finally:
        path.unlink()


@SETTINGS
@given(text=st.text(max_size=80) | VALUES.map(lambda v: yaml.safe_dump(v)))
def test_any_file_content_gives_a_space_or_a_config_error(text):
    path = _folder / f"text-{next(_count)}.yaml"
    path.write_text(text)
    try:
        load_space(path)
    except ConfigError as e:
        assert e.field and str(e).startswith(f"{e.field}: got "), str(e)
    finally:
        path.unlink()


YAMLISH = st.text(alphabet="ab1.: &*[]{},-<\n'\"#!?|>", max_size=60)  # anchors, aliases, merges, flow, duplicates


@SETTINGS
@given(data=st.binary(max_size=120) | YAMLISH.map(str.encode) | st.text(max_size=40).map(
    lambda t: t.encode("latin-1", "replace")))
def test_any_bytes_give_a_mapping_or_a_one_line_config_error(data):
    path = _folder / f"bytes-{next(_count)}.yaml"
    path.write_bytes(data)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        assert e.field and str(e).startswith(f"{e.field}: got ") and "\n" not in str(e), str(e)
    else:
        assert isinstance(raw, dict)
    finally:
        path.unlink()
