"""The training step of issue 17: losses summed on the device with a rarely read divergence check, the same fp32
results as the per-batch float path before it, ``train.precision`` (bf16 on the CPU runs, fp16 refused there) and
``train.compile`` (hooks on a compiled student still feed the terms)."""
from __future__ import annotations

import copy

import pytest
import torch

from kdray.core.step import LossSums
from kdray.core.train import Data, fit, make_optimizer, make_scheduler, seed_everything
from kdray.errors import ConfigError, DivergedError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import build, prepare, run

FITNET = {"method": "fitnet", "teacher_layers": "relu2", "student_layers": "relu2"}


@pytest.fixture(scope="module")
def prep():
    from tests.conftest import TINY

    return prepare(parse_config(copy.deepcopy(TINY)))


def built_and_data(raw: dict, prep):
    """A freshly seeded distiller and teacher signal for ``raw`` (the same initial student every call)."""
    cfg = parse_config(raw)
    seed_everything(cfg.seed)
    built = build(cfg, prep, torch.device("cpu"))
    b = prep.bundle
    return cfg, built, Data(b.x_train, b.y_train, b.x_val, b.y_val, cfg.data.batch_size, cfg.data.eval_batch_size)


def per_batch_float_losses(cfg, built, data) -> list[dict[str, float]]:
    """The epoch losses as kdray computed them before issue 17: every loss part read back with ``float`` after
    every batch and summed in Python."""
    distiller, params = built.distiller, [p for p in built.distiller.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.train.optimizer)
    sched = make_scheduler(opt, cfg.train.optimizer, cfg.train.epochs)
    history = []
    for epoch in range(1, cfg.train.epochs + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(data.x_train), generator=gen)
        sums: dict[str, float] = {}
        batches = 0
        distiller.train()
        for start in range(0, len(order), data.batch_size):
            idx = order[start:start + data.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            loss, parts, _ = distiller(x, y, built.signal.outputs(idx, x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            values = {k: float(v.detach()) for k, v in parts.items()}
            values["loss"] = float(loss.detach())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        sched.step()
        history.append({("loss" if k == "loss" else f"loss_{k}"): v / batches for k, v in sums.items()})
    return history


def losses(history: list[dict]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k.startswith("loss")} for h in history]


def test_fp32_losses_equal_the_per_batch_float_path(tiny_raw, prep):
    tiny_raw["distill"]["terms"] = [{"method": "kd", "weight": 0.5}, FITNET]
    tiny_raw["train"]["epochs"] = 3
    cfg, built, data = built_and_data(tiny_raw, prep)
    expected = per_batch_float_losses(cfg, built, data)
    built.distiller.close()
    cfg, built, data = built_and_data(tiny_raw, prep)
    got = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal).history
    built.distiller.close()
    assert set(expected[0]) == {"loss", "loss_ce", "loss_kd", "loss_fitnet"}
    assert losses(got) == expected  # exactly: the sums on the device are float64, as Python's were


def test_loss_sums_name_the_first_non_finite_part_and_keep_exact_means():
    sums = LossSums()
    rows = [{"ce": 1.5, "kd": 0.25, "loss": 1.75}, {"ce": 2.0, "kd": float("inf"), "loss": float("inf")},
            {"ce": float("nan"), "kd": float("nan"), "loss": float("nan")}]
    finite = LossSums()
    for r in rows[:1] * 3:
        finite.add({k: torch.tensor(v) for k, v in r.items()})
    finite.check(1)  # nothing non-finite
    assert finite.means() == {"loss_ce": 1.5, "loss_kd": 0.25, "loss": 1.75}
    for r in rows:
        sums.add({k: torch.tensor(v) for k, v in r.items()})
    with pytest.raises(DivergedError) as info:
        sums.check(7)
    assert (info.value.epoch, info.value.term, info.value.value) == (7, "kd", float("inf"))  # not ce (later), not loss
    with pytest.raises(ValueError):
        sums.add({"ce": torch.tensor(1.0), "loss": torch.tensor(1.0)})  # a part missing: refused, not mis-summed


def test_divergence_is_caught_in_its_epoch_between_checks(tiny_raw, prep):
    tiny_raw["train"]["optimizer"] = {"name": "sgd", "lr": 1e12, "momentum": 0.0}
    tiny_raw["train"]["epochs"] = 3
    tiny_raw["distill"]["terms"] = [FITNET]
    cfg, built, data = built_and_data(tiny_raw, prep)
    with pytest.raises(DivergedError) as info:  # 12 batches per epoch, fewer than Trainer.check_every
        fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal)
    built.distiller.close()
    assert info.value.epoch == 1 and info.value.term in ("ce", "fitnet", "loss")


def test_bf16_on_the_cpu_trains_in_bfloat16_with_float32_terms(tiny_raw, prep):
    tiny_raw["distill"]["terms"] = [{"method": "kd", "weight": 0.5}, FITNET]
    tiny_raw["train"]["epochs"] = 2
    cfg, built, data = built_and_data(tiny_raw, prep)
    fp32 = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal).history
    built.distiller.close()
    tiny_raw["train"]["precision"] = "bf16"
    cfg, built, data = built_and_data(tiny_raw, prep)
    bf16 = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal).history
    assert built.distiller._hooks.outputs["relu2"].dtype == torch.bfloat16  # the student ran under autocast
    assert all(p.dtype == torch.float32 for p in built.distiller.parameters())  # weights stay float32
    built.distiller.close()
    for k in ("loss", "loss_ce", "loss_kd", "loss_fitnet"):
        assert bf16[-1][k] == pytest.approx(fp32[-1][k], rel=0.1) and bf16[-1][k] != fp32[-1][k]
    assert 0.0 <= bf16[-1]["val_acc"] <= 1.0


def test_precisions_the_device_cannot_do_are_refused_before_any_work(tiny_raw, tmp_path):
    tiny_raw["train"]["precision"] = "fp8"
    with pytest.raises(ConfigError) as info:
        parse_config(tiny_raw)
    assert info.value.field == "train.precision" and "bf16" in info.value.allowed and "fp16" in info.value.allowed
    tiny_raw["cache_dir"] = str(tmp_path)  # nothing may be written here: the refusal comes first
    tiny_raw["train"].update(precision="fp16", device="cpu")
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw))
    assert (info.value.field, info.value.value) == ("train.precision", "fp16") and "CUDA" in info.value.allowed
    tiny_raw["train"]["precision"] = "fp32"
    tiny_raw["teacher"]["recipe"]["train"]["precision"] = "fp16"
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw))
    assert info.value.field == "teacher.recipe.train.precision"
    assert not any(tmp_path.iterdir())


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(tiny_raw, tmp_path, monkeypatch):
    tiny_raw["cache_dir"] = str(tmp_path / "cache")
    tiny_raw["train"].update(compile=True, device="cpu")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no C++ compiler on it
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ConfigError) as info:
        run(parse_config(tiny_raw))
    assert (info.value.field, info.value.value) == ("train.compile", True) and "C++" in info.value.allowed
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_compiled_student_keeps_its_hooks_and_results(tiny_raw, prep):
    tiny_raw["distill"]["terms"] = [FITNET]  # reads the student's relu2 through a forward hook
    tiny_raw["train"]["epochs"] = 1
    cfg, built, data = built_and_data(tiny_raw, prep)
    plain = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal).history
    built.distiller.close()
    tiny_raw["train"]["compile"] = True
    cfg, built, data = built_and_data(tiny_raw, prep)
    compiled = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=built.signal).history
    student = built.distiller.student
    built.distiller.close()
    assert compiled[0]["loss_fitnet"] > 0 and compiled[0]["loss_fitnet"] == pytest.approx(plain[0]["loss_fitnet"],
                                                                                          rel=1e-4)
    assert compiled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
    assert student._compiled_call_impl is None  # plain again after fit: a copy of it runs itself
