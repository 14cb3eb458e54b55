"""End to end on tiny MNIST-1D: teacher recipe and cache, every method through the real loop,
determinism, resume, saved students, online scheme, divergence and the teacher-class check."""
from __future__ import annotations

import copy

import pytest
import torch

from kdray.core.checkpoint import read_checkpoint, save_model
from kdray.core.train import StopTraining
from kdray.errors import ConfigError, DivergedError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import prepare, run
from kdray.experiment.teachers import load_model


@pytest.fixture(scope="module")
def prep():
    from tests.conftest import TINY

    cfg = parse_config(copy.deepcopy(TINY))
    return prepare(cfg)


def test_teacher_recipe_is_cached_by_hash(tiny_raw, prep):
    assert prep.teacher_info["teacher_test_acc"] > 0.3
    again = prepare(parse_config(tiny_raw))
    assert again.teacher_info["cached"] is True
    assert again.teacher_info["source"] == prep.teacher_info["source"]
    from kdray.experiment.teachers import recipe_key

    assert recipe_key(parse_config(tiny_raw)) == again.teacher_info["recipe_key"]
    tiny_raw["teacher"]["recipe"]["seed"] = 1  # any change to the recipe is a new teacher
    assert recipe_key(parse_config(tiny_raw)) != again.teacher_info["recipe_key"]
    tiny_raw["teacher"]["recipe"]["seed"] = 0
    tiny_raw["data"]["params"]["num_samples"] = 1200
    assert recipe_key(parse_config(tiny_raw)) != again.teacher_info["recipe_key"]


TERMS = {
    "kd": {"method": "kd"},
    "dkd": {"method": "dkd"},
    "probe_kd": {"method": "probe_kd", "teacher_layers": "relu3"},
    "fitnet": {"method": "fitnet", "teacher_layers": "relu2", "student_layers": "relu2"},
    "at": {"method": "at", "teacher_layers": "relu2", "student_layers": "relu2"},
    "ab": {"method": "ab", "teacher_layers": "conv2", "student_layers": "conv2"},
    "feature_l2": {"method": "feature_l2", "teacher_layers": "relu3", "student_layers": "relu3"},
    "fsp": {"method": "fsp", "teacher_layers": ["relu1", "relu2"], "student_layers": ["relu1", "relu2"]},
    "sp": {"method": "sp", "teacher_layers": "relu3", "student_layers": "relu3"},
    "rkd": {"method": "rkd", "teacher_layers": "flatten", "student_layers": "flatten"},
    "pkt": {"method": "pkt", "teacher_layers": "flatten", "student_layers": "flatten"},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_method_trains_end_to_end(name, tiny_raw, prep):
    tiny_raw["distill"]["terms"] = [TERMS[name]]
    tiny_raw["train"]["epochs"] = 1
    s = run(parse_config(tiny_raw), prep)
    h = s.history[-1]
    assert f"loss_{name}" in h and h[f"loss_{name}"] >= 0 and 0 <= h["val_acc"] <= 1
    assert 0 <= s.test_acc <= 1 and s.test_teacher_agreement is not None
    if name == "probe_kd":
        assert s.probes[0]["layer"] == "relu3" and 0 < s.probes[0]["val_acc"] <= 1


def test_same_seed_same_result_and_saved_student_reloads(tiny_raw, prep, tmp_path):
    a = run(parse_config(tiny_raw), prep, output_dir=tmp_path / "a")
    b = run(parse_config(tiny_raw), prep)
    assert a.history[-1]["loss"] == b.history[-1]["loss"] and a.test_acc == b.test_acc
    ckpt = read_checkpoint(tmp_path / "a" / "student.pt")  # weights_only=True inside
    assert ckpt["format"] == "kdray-model-v1" and ckpt["meta"]["test_acc"] == a.test_acc
    model = load_model(tmp_path / "a" / "student.pt").eval()
    x = prep.bundle.x_test
    acc = (model(x).argmax(1) == prep.bundle.y_test).float().mean().item()
    assert acc == pytest.approx(a.test_acc)
    assert not any("adapter" in k for k in ckpt["state_dict"])  # adapters are not saved with the student
    assert {"student.pt", "config.yaml", "metrics.csv", "summary.json"} <= {p.name for p in (tmp_path / "a").iterdir()}


def test_resume_from_a_saved_state_matches_an_uninterrupted_run(tiny_raw, prep, tmp_path):
    tiny_raw["distill"]["terms"] = [TERMS["fitnet"]]  # adapters must be restored too
    tiny_raw["train"]["epochs"] = 3
    full = run(parse_config(tiny_raw), prep)

    def stop_after_2(metrics, state):
        if metrics["epoch"] == 2:
            torch.save(state(), tmp_path / "state.pt")
            raise StopTraining

    part = run(parse_config(tiny_raw), prep, callbacks=(stop_after_2,))
    assert part.stopped_early and part.epochs == 2
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = run(parse_config(tiny_raw), prep, start_state=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-5)
    assert resumed.test_acc == pytest.approx(full.test_acc)


def test_online_scheme_trains_the_teacher_too(tiny_raw, prep):
    tiny_raw["distill"]["scheme"] = "online"
    tiny_raw["train"]["epochs"] = 1
    before = {k: v.clone() for k, v in prep.teacher.state_dict().items()}
    s = run(parse_config(tiny_raw), prep)
    assert s.history[-1]["loss_teacher"] > 0
    assert all(torch.equal(before[k], v) for k, v in prep.teacher.state_dict().items())  # shared teacher untouched


@pytest.mark.parametrize("terms, temperature, expected", [
    ([{"method": "dkd", "temperature": 4.0}], 2.0, 4.0),  # the dkd term's own temperature
    ([{"method": "dkd"}], 4.0, 4.0),  # dkd at distill.temperature (was 1: only a term named kd counted)
    ([{"method": "probe_kd", "teacher_layers": ["relu3"], "temperature": 5.0}], 3.0, 3.0),  # no teacher logits
], ids=["dkd-term-T", "dkd-distill-T", "no-logit-term"])
def test_online_teacher_step_uses_the_logit_terms_temperature(tiny_raw, prep, terms, temperature, expected):
    from torch.nn import functional as F

    from kdray.core.train import Distiller, online_teacher_loss

    tiny_raw["distill"].update(scheme="online", temperature=temperature, terms=terms)
    distiller = Distiller(torch.nn.Linear(40, 10), parse_config(tiny_raw).distill)
    assert distiller.online_temperature() == expected
    teacher = copy.deepcopy(prep.teacher).eval().requires_grad_(True)  # the online scheme trains its copy
    x, y = prep.bundle.x_train[:40], prep.bundle.y_train[:40]
    s_logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    got = online_teacher_loss(teacher, x, y, s_logits, distiller)
    with torch.no_grad():  # by hand: CE on the labelled examples + T^2 KL(student || teacher) at T = expected
        t, T, lab = teacher(x), expected, y >= 0
        ce = -F.log_softmax(t[lab], 1).gather(1, y[lab, None]).mean()
        p_s = F.softmax(s_logits / T, 1)
        kl = (p_s * (p_s.log() - F.log_softmax(t / T, 1))).sum(1).mean() * T * T
    assert lab.any() and got.item() == pytest.approx((ce + kl).item(), rel=1e-5)


def test_diverging_loss_names_epoch_and_term(tiny_raw, prep):
    tiny_raw["train"]["optimizer"] = {"name": "sgd", "lr": 1e12, "momentum": 0.0}
    tiny_raw["distill"]["terms"] = [TERMS["fitnet"]]
    with pytest.raises(DivergedError) as info:
        run(parse_config(tiny_raw), prep)
    assert info.value.epoch >= 1 and "diverged" in str(info.value)


def test_bad_layer_path_and_unusable_layer(tiny_raw, prep):
    tiny_raw["distill"]["terms"] = [{"method": "fitnet", "teacher_layers": "relu9", "student_layers": "relu2"}]
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw), prep)
    assert info.value.field == "distill.terms[0].teacher_layers" and "relu2" in info.value.allowed
    tiny_raw["distill"]["terms"] = [{"method": "at", "teacher_layers": "fc", "student_layers": "fc"}]
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw), prep)
    assert "fc" in str(info.value)


def test_logit_kd_needs_matching_teacher_classes(tiny_raw, tmp_path, prep):
    from kdray.config import ModelSpec
    from kdray.models import build_model

    spec = ModelSpec(name="mnist1d_cnn", kwargs={"channels": 16})
    save_model(tmp_path / "t5.pt", build_model(spec, 5), spec, 5)
    tiny_raw["teacher"] = {"model": spec.model_dump(), "checkpoint": str(tmp_path / "t5.pt")}
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw))
    assert info.value.field == "teacher.model" and "10 classes" in info.value.allowed
    tiny_raw["distill"]["terms"] = [TERMS["probe_kd"]]  # probes do not need the teacher's classes
    assert run(parse_config(tiny_raw)).test_acc >= 0


def test_pickled_or_missing_checkpoint_is_refused(tiny_raw, tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": object()}))
    for path in (tmp_path / "evil.pt", tmp_path / "missing.pt"):
        raw = copy.deepcopy(tiny_raw)
        raw["teacher"] = {"model": raw["teacher"]["model"], "checkpoint": str(path)}
        with pytest.raises(ConfigError) as info:
            run(parse_config(raw))
        assert info.value.field == "teacher.checkpoint" and str(path) in str(info.value)


def test_pruned_and_int8_students_are_measured_and_saved(tiny_raw, tmp_path):
    from kdray.core.compress import quantize_int8
    from kdray.models import build_model

    tiny_raw["student"] = {"name": "mnist1d_mlp", "kwargs": {}}
    tiny_raw["export"] = {"sparsity": 0.5, "finetune_epochs": 1, "quantize": True}
    cfg = parse_config(tiny_raw)
    s = run(cfg, output_dir=tmp_path)
    ex = s.export
    assert set(ex) == {"float", "pruned", "int8"}
    assert ex["float"]["sparsity"] == 0 and ex["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert s.test_acc == pytest.approx(ex["pruned"]["test_acc"])  # the saved student is the pruned one
    assert ex["int8"]["size_bytes"] < 0.5 * ex["float"]["size_bytes"]  # int8 Linear weights
    assert abs(ex["int8"]["test_acc"] - ex["pruned"]["test_acc"]) <= 0.03
    assert all(m["latency_ms"] > 0 for m in ex.values())
    assert s.history[-1]["student_gzip_bytes"] == ex["int8"]["gzip_bytes"] < ex["float"]["gzip_bytes"]  # as shipped
    # the int8 file is weights-only and rebuilds into the same quantized student
    student = load_model(tmp_path / "student.pt")
    q = quantize_int8(build_model(cfg.student, 10))
    q.load_state_dict(torch.load(tmp_path / "student_int8.pt", weights_only=True))
    from kdray.data import make_bundle

    b = make_bundle(cfg.data, cfg.cache_dir)
    with torch.no_grad():
        acc = (q(b.x_test).argmax(1) == b.y_test).float().mean().item()
        zeros = sum(int((m.weight == 0).sum()) for m in student.modules() if isinstance(m, torch.nn.Linear))
    assert acc == pytest.approx(ex["int8"]["test_acc"])
    assert zeros > 0


def test_self_distillation_runs_without_a_teacher(tiny_raw):
    del tiny_raw["teacher"]
    tiny_raw["distill"] = {"ce_weight": 1.0, "terms": [{"method": "self_aux", "student_layers": ["relu1", "relu2"]}]}
    s = run(parse_config(tiny_raw))
    assert s.history[-1]["loss_self_aux"] > 0 and not s.teacher
    tiny_raw["distill"]["terms"].append({"method": "kd"})
    with pytest.raises(ConfigError, match="teacher"):
        parse_config(tiny_raw)


def test_a_two_teacher_ensemble_teaches_logits_and_layers_of_either_member(tiny_raw):
    from kdray.core.signals import TeacherEnsemble
    from kdray.experiment.run import list_model_layers

    tiny_raw["extra_teachers"] = [{"model": {"name": "mnist1d_cnn", "kwargs": {"channels": 8}}, "weight": 3.0,
                                   "recipe": {"seed": 1, "train": {"epochs": 2, "progress": False}}}]
    tiny_raw["distill"]["terms"] = [{"method": "kd", "weight": 0.5},
                                    {"method": "fitnet", "teacher_layers": ["1.relu3"], "student_layers": ["relu3"]},
                                    {"method": "probe_kd", "teacher_layers": ["0.relu2"], "options": {"pooling": "max"}}]
    cfg = parse_config(tiny_raw)
    paths = {i.path for i in list_model_layers(cfg, "teacher")}
    assert {"0.relu3", "1.relu3", "1.fc"} <= paths
    prep = prepare(cfg)
    ens = prep.teacher
    assert isinstance(ens, TeacherEnsemble) and prep.teacher_info["members"] == 2
    x = prep.bundle.x_test[:5]
    with torch.no_grad():  # re-derived: temperature-T softmax of the output = weighted mean of member probabilities
        T = cfg.distill.temperature
        mean = 0.25 * torch.softmax(getattr(ens, "0")(x) / T, 1) + 0.75 * torch.softmax(getattr(ens, "1")(x) / T, 1)
        torch.testing.assert_close(torch.softmax(ens(x) / T, 1), mean)
    s = run(cfg, prep)
    last = s.history[-1]
    assert {"loss_kd", "loss_fitnet", "loss_probe_kd"} <= set(last) and s.probes[0]["layer"] == "0.relu2"
    tiny_raw["extra_teachers"][0]["weight"] = 0
    with pytest.raises(ConfigError, match="extra_teachers"):
        parse_config(tiny_raw)


def test_ensemble_weights_mix_cached_member_logits_without_new_cache_entries(tiny_raw, tmp_path):
    """The ensemble's mixing weights are not part of the cached teacher: the cache keeps every member's
    logits and each run mixes them with its own weights, so a search can draw the weights."""
    from kdray.core.cache import list_entries
    from kdray.core.signals import mix_logits
    from kdray.experiment.run import build

    tiny_raw["cache_dir"] = str(tmp_path / "cache")
    tiny_raw["extra_teachers"] = [{"model": {"name": "mnist1d_cnn", "kwargs": {"channels": 8}},
                                   "recipe": {"seed": 1, "train": {"epochs": 2, "progress": False}}}]
    prep = prepare(parse_config(tiny_raw))
    members = [getattr(prep.teacher, "0"), getattr(prep.teacher, "1")]
    x, y = prep.bundle.x_train, prep.bundle.y_test
    accs = {}
    for w in (0.1, 9.0):
        tiny_raw["extra_teachers"][0]["weight"] = w
        cfg = parse_config(tiny_raw)
        built = build(cfg, prep, torch.device("cpu"))
        with torch.no_grad():  # re-derived from the members themselves
            want = mix_logits([m(x) for m in members], [1.0, w], cfg.distill.temperature)
            want_test = mix_logits([m(prep.bundle.x_test) for m in members], [1.0, w], cfg.distill.temperature)
        torch.testing.assert_close(built.signal.logits, want, atol=1e-4, rtol=1e-4)
        s = run(cfg, prep)
        accs[w] = s.teacher["teacher_test_acc"]
        assert s.teacher["ensemble_weights"] == pytest.approx([1 / (1 + w), w / (1 + w)])
        assert accs[w] == pytest.approx((want_test.argmax(1) == y).float().mean().item())
        assert s.history[-1]["teacher_test_acc"] == accs[w]
    assert len(list_entries(str(tmp_path / "cache"))) == 1  # both mixes from the one entry of member logits


def test_no_validation_split_trains(tiny_raw):
    tiny_raw["data"]["val_fraction"] = 0.0
    s = run(parse_config(tiny_raw))
    assert 0 <= s.test_acc <= 1 and len(s.history) == 2
