"""Model zoo: built-in models, import-path models, spec validation and the Hugging Face wrapper."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdray.config import ModelSpec
from kdray.errors import ConfigError
from kdray.models import MODELS, build_model, check_model_spec, count_parameters

HELPERS = Path(__file__).resolve().parent / "helpers"

MNIST1D = ["mnist1d_cnn", "mnist1d_cnn_small", "mnist1d_mlp"]
RESNETS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "resnet8x4", "resnet32x4"]


@pytest.fixture
def factories(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    return "model_factories"


def test_registry_lists_all_builtins():
    assert set(MNIST1D + RESNETS + ["hf_sequence_classifier"]) <= set(MODELS.names())


@pytest.mark.parametrize("name", MNIST1D)
@pytest.mark.parametrize("shape", [(4, 40), (4, 1, 40)])
def test_mnist1d_models_give_logits(name, shape):
    model = build_model(ModelSpec(name=name), num_classes=7)
    assert model(torch.randn(*shape)).shape == (4, 7)


@pytest.mark.parametrize("name", RESNETS)
def test_resnets_give_logits(name):
    model = build_model(ModelSpec(name=name), num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def test_cnn_module_paths_and_hook_shapes():
    model = build_model(ModelSpec(name="mnist1d_cnn", kwargs={"channels": 32}), 10)
    mods = _modules(model)
    names = ["conv1", "relu1", "conv2", "relu2", "conv3", "relu3", "fc"]
    assert all(n in mods for n in names)
    assert all(isinstance(mods[f"relu{i}"], nn.ReLU) for i in (1, 2, 3))
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in names[:-1]]
    model(torch.randn(5, 40))
    for h in hooks:
        h.remove()
    assert seen["conv1"][1].shape == (5, 32, 40)
    assert seen["relu2"][1].shape == (5, 32, 40)
    assert seen["relu3"][1].shape == (5, 32, 20)
    pre, post = seen["relu3"]
    assert torch.equal(post, pre.clamp_min(0))  # input of relu = pre-activation


def test_mlp_module_paths():
    mods = _modules(build_model(ModelSpec(name="mnist1d_mlp", kwargs={"hidden": 16, "depth": 3}), 10))
    assert {"fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "head"} <= set(mods)
    assert "fc4" not in mods and mods["fc3"].out_features == 16


def test_resnet_module_paths():
    model = build_model(ModelSpec(name="resnet20"), 10).eval()
    mods = _modules(model)
    assert {"conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer3.0.conv1", "layer3.2.relu2",
            "layer2.0.downsample", "fc"} <= set(mods)
    assert "layer3.3" not in mods  # 20 = 6*3+2: three blocks per stage
    out = {}
    mods["layer3"].register_forward_hook(lambda m, i, o: out.__setitem__("f", o))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert out["f"].shape == (2, 64, 8, 8)


def test_resnet_x4_parameter_counts_match_repdistiller():
    n8 = count_parameters(build_model(ModelSpec(name="resnet8x4"), 100))
    n32 = count_parameters(build_model(ModelSpec(name="resnet32x4"), 100))
    assert 1.1e6 < n8 < 1.35e6
    assert 7.2e6 < n32 < 7.6e6
    assert count_parameters(build_model(ModelSpec(name="resnet8"), 100)) < 0.1e6


def test_count_parameters_trainable_only():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == 8 and count_parameters(model, trainable_only=True) == 6


def test_kwargs_change_width():
    small = build_model(ModelSpec(name="mnist1d_cnn", kwargs={"channels": 4}), 10)
    assert small.conv1.out_channels == 4


# --- import paths ------------------------------------------------------------------------------


def test_import_path_factory_gets_num_classes_and_kwargs(factories):
    spec = ModelSpec(name=f"{factories}:tiny_mlp", kwargs={"hidden": 5})
    check_model_spec(spec, "student")
    model = build_model(spec, num_classes=4)
    assert model(torch.randn(3, 40)).shape == (3, 4)
    assert model[1].out_features == 5


def test_import_path_class_without_num_classes():
    spec = ModelSpec(name="torch.nn:Linear", kwargs={"in_features": 40, "out_features": 3})
    check_model_spec(spec, "student")
    assert isinstance(build_model(spec, num_classes=10), nn.Linear)


def test_import_path_with_var_kwargs(factories):
    spec = ModelSpec(name=f"{factories}:flexible", kwargs={"anything": 1, "out_features": 2})
    check_model_spec(spec, "student")
    assert build_model(spec, 10).out_features == 2


def test_num_classes_in_kwargs_wins(factories):
    assert build_model(ModelSpec(name=f"{factories}:tiny_mlp", kwargs={"num_classes": 3}), 10)[-1].out_features == 3


# --- errors ------------------------------------------------------------------------------------


def _err(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


def test_unknown_name_lists_registry():
    e = _err(check_model_spec, ModelSpec(name="resnet9"), "student")
    assert e.field == "student.name" and e.value == "resnet9"
    assert "resnet8" in e.allowed and "mnist1d_cnn" in e.allowed
    e = _err(build_model, ModelSpec(name="resnet9"), 10)
    assert e.field == "model.name"


@pytest.mark.parametrize("name", ["no_such_pkg_kdray.mod:f", "torch.nn:NoSuchThing", "torch.nn:", ":f"])
def test_bad_import_paths(name):
    e = _err(check_model_spec, ModelSpec(name=name), "teacher.model")
    assert e.field == "teacher.model.name" and e.value == name


def test_import_path_not_callable(factories):
    e = _err(check_model_spec, ModelSpec(name=f"{factories}:NOT_CALLABLE"), "student")
    assert e.field == "student.name" and "callable" in e.allowed


def test_factory_not_returning_module(factories):
    spec = ModelSpec(name=f"{factories}:not_a_module")
    check_model_spec(spec, "student")
    e = _err(build_model, spec, 10, "student")
    assert e.field == "student.name" and "nn.Module" in e.allowed and "dict" in e.allowed


def test_unknown_kwarg_names_accepted_ones(factories):
    e = _err(check_model_spec, ModelSpec(name="mnist1d_cnn", kwargs={"chanels": 8}), "student")
    assert e.field == "student.kwargs.chanels" and e.value == 8
    assert "channels" in e.allowed and "kernel" in e.allowed
    e = _err(check_model_spec, ModelSpec(name=f"{factories}:tiny_mlp", kwargs={"depth": 2}), "student")
    assert e.field == "student.kwargs.depth" and "hidden" in e.allowed
    e = _err(build_model, ModelSpec(name="resnet8", kwargs={"width": 2}), 10, "teacher.model")
    assert e.field == "teacher.model.kwargs.width" and "(none)" in e.allowed


@pytest.mark.parametrize("kwargs, key", [({"channels": 0}, "channels"), ({"channels": 2.5}, "channels"),
                                         ({"kernel": "5"}, "kernel")])
def test_bad_kwarg_values(kwargs, key):
    e = _err(check_model_spec, ModelSpec(name="mnist1d_cnn", kwargs=kwargs), "student")
    assert e.field == f"student.kwargs.{key}" and e.value == kwargs[key]


def test_missing_required_kwarg():
    e = _err(check_model_spec, ModelSpec(name="hf_sequence_classifier"), "teacher.model")
    assert e.field == "teacher.model.kwargs.path"


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture
def tiny_bert(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_hf_sequence_classifier_loads_local_folder(tiny_bert):
    spec = ModelSpec(name="hf_sequence_classifier", kwargs={"path": str(tiny_bert)})
    check_model_spec(spec, "teacher.model")
    model = build_model(spec, num_classes=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 3)
        # padding is masked: extra pad tokens do not change the first row's logits
        longer = model(torch.tensor([[5, 6, 7, 0, 0, 0, 0]]))
    assert torch.allclose(logits[0], longer[0], atol=1e-5)
    assert "model.bert.encoder.layer.0" in dict(model.named_modules())


def test_hf_sequence_classifier_config_only(tiny_bert):
    model = build_model(ModelSpec(name="hf_sequence_classifier",
                                  kwargs={"path": str(tiny_bert), "config_only": True, "pad_token_id": 0}), 4)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 4)


def test_a_smaller_student_from_the_teachers_config(tiny_bert):
    spec = ModelSpec(name="hf_sequence_classifier", kwargs={"path": str(tiny_bert), "config_only": True,
                                                            "config": {"num_hidden_layers": 1}})
    model = build_model(spec, 4)
    assert len(model.model.bert.encoder.layer) == 1 and model(torch.tensor([[1, 2, 3]])).shape == (1, 4)
    e = _err(build_model, ModelSpec(name="hf_sequence_classifier", kwargs={
        "path": str(tiny_bert), "config_only": True, "config": {"num_hiden_layers": 1}}), 4, "student")
    assert e.field == "student.kwargs.config.num_hiden_layers" and "num_hidden_layers" in str(e)
    e = _err(build_model, ModelSpec(name="hf_sequence_classifier", kwargs={
        "path": str(tiny_bert), "config": {"num_hidden_layers": 1}}), 4, "student")
    assert e.field == "student.kwargs.config" and "config_only" in str(e)


def test_hf_sequence_classifier_bad_path(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "nope")
    e = _err(build_model, ModelSpec(name="hf_sequence_classifier", kwargs={"path": missing}), 2, "teacher.model")
    assert e.field == "teacher.model.kwargs.path" and e.value == missing


def test_a_pretrained_encoder_without_a_task_head_loads_with_one_line_saying_its_head_is_new(tiny_bert, caplog, capfd):
    """A BertModel-only folder (a sentence encoder as published): one kdray line, not the library's report."""
    import logging

    import transformers

    before = transformers.utils.logging.get_verbosity()
    with caplog.at_level(logging.INFO, logger="kdray"):
        build_model(ModelSpec(name="hf_sequence_classifier", kwargs={"path": str(tiny_bert)}), 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "kdray"]
    assert len(lines) == 1 and "has no classification head" in lines[0] and "untrained" in lines[0]
    assert "classifier.weight" in lines[0] and str(tiny_bert) in lines[0]
    out, err = capfd.readouterr()
    for words in ("newly initialized", "LOAD REPORT", "MISSING", "Some weights"):
        assert words not in out + err
    assert transformers.utils.logging.get_verbosity() == before  # restored after the load
    # a folder with its head: no line at all
    caplog.clear()
    model = build_model(ModelSpec(name="hf_sequence_classifier", kwargs={"path": str(tiny_bert)}), 3)
    model.model.save_pretrained(tiny_bert.parent / "with-head")
    with caplog.at_level(logging.INFO, logger="kdray"):
        build_model(ModelSpec(name="hf_sequence_classifier", kwargs={"path": str(tiny_bert.parent / "with-head")}), 3)
    assert not [r for r in caplog.records if r.name == "kdray"]


def test_the_transformers_floor_is_the_one_in_pyproject_and_older_versions_are_refused_naming_it():
    import re
    import tomllib

    from kdray.core.hf_package import TRANSFORMERS_MIN, check_transformers, check_version

    extra = tomllib.loads((HELPERS.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    assert f"transformers>={TRANSFORMERS_MIN}" in extra
    check_transformers("teacher.model.name", "hf_causal_lm")  # the installed one is new enough
    for old in ("4.40.2", "4.55.4", "3.5"):
        e = _err(check_version, old, "teacher.model.name", "hf_causal_lm")
        assert e.field == "teacher.model.name" and f"transformers >= {TRANSFORMERS_MIN}" in e.allowed
        assert old in e.allowed and "kwargs" not in e.field
    for ok in (TRANSFORMERS_MIN, "4.56.0.dev0", "4.57.1", "5.25.0"):
        check_version(ok, "teacher.model.name", "hf_causal_lm")
    assert re.fullmatch(r"\d+\.\d+", TRANSFORMERS_MIN)


def test_an_encoder_folder_without_tokenizer_files_is_refused_as_a_tokenizer_naming_it(tiny_bert):
    """transformers 5 loads it as a BertTokenizer of its 5 special tokens; 4.x cannot load it: the same refusal."""
    from kdray.core.text import load_tokenizer

    e = _err(load_tokenizer, str(tiny_bert), "data.params.student_tokenizer")
    assert e.field == "data.params.student_tokenizer" and e.value == str(tiny_bert)
    assert "usable tokenizer files" in e.allowed and str(tiny_bert) in e.allowed
