"""The extension test: a response method defined and registered outside kdray (DIST, in
tests/helpers/dist_method.py) works through a config and ``run``, through the teacher cache, in ``kdray methods``
and in a search whose Ray workers register it too, with no kdray file naming it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from helpers.dist_method import DIST, dist_loss
from helpers.searches import write_space
from kdray.core.methods import METHODS, Signals, kd_loss
from kdray.experiment import teacher_signal
from kdray.experiment.configs import parse_config
from kdray.experiment.run import run
from kdray.search.driver import SearchOptions, run_search

pytestmark = pytest.mark.slow


def test_dist_is_registered_with_its_traits():
    assert METHODS.get("dist") is DIST and DIST.name == "dist"
    assert DIST.uses_teacher_logits and DIST.needs_teacher and not DIST.uses_probes


def test_dist_loss_invariants():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    assert dist_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-3)  # eps in the denominator, as the official code
    assert dist_loss(s + 3.0, t - 1.0, 4.0).item() == pytest.approx(dist_loss(s, t, 4.0).item())  # shift invariant
    assert dist_loss(s, t, 1.0, beta=1.0, gamma=0.0).item() <= 2.0 + 1e-9  # 1 - pearson lies in [0, 2]
    s.requires_grad_()
    m = METHODS.get("dist")(parse_term("dist"), 4.0)
    loss = m(Signals(student_logits=s, teacher_logits=t))
    loss.backward()
    assert s.grad.abs().sum() > 0 and loss.item() != pytest.approx(kd_loss(s, t, 4.0).item())


def parse_term(method):
    from kdray.config import TermConfig

    return TermConfig(method=method)


def test_dist_trains_a_student_from_the_teacher_cache(tiny_raw, tmp_path, monkeypatch, caplog):
    def no_teacher_pass(*a, **k):
        raise AssertionError("the run computed the teacher's outputs instead of reading the teacher cache")

    monkeypatch.setattr(teacher_signal, "teacher_pass", no_teacher_pass)
    tiny_raw["train"]["epochs"] = 6  # 3 left this 4-channel student at chance with the tiny teacher (0.345 test acc)
    tiny_raw["distill"]["terms"] = [{"method": "dist", "temperature": 4.0, "options": {"beta": 1.0, "gamma": 1.0}}]
    tiny_raw["cache_dir"] = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="kdray"):
        summary = run(parse_config(tiny_raw))
    assert "teacher signal: from the teacher cache" in caplog.text
    losses = [h["loss_dist"] for h in summary.history]
    assert losses[-1] < losses[0], losses
    assert summary.test_acc > 0.2  # ten classes: chance is 0.1


def test_a_search_draws_dist_in_ray_workers(tiny_raw, tmp_path):
    import ray

    helpers = str(Path(__file__).parent)
    path = os.pathsep.join([helpers, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path, "KDRAY_CACHE_DIR": os.environ.get("KDRAY_CACHE_DIR", "")},
                          "worker_process_setup_hook": "helpers.dist_method.setup"})
    try:
        space = write_space(tmp_path, tiny_raw, name="dist-search",
                            methods={"dist": [{"method": "dist", "temperature": {"float": [1.0, 4.0]}}],
                                     "kd": [{"method": "kd"}]},
                            search={"num_trials": 2, "concurrency": 2, "max_epochs": 1, "scheduler": "none",
                                    "points_to_evaluate": [{"method": "dist"}, {"method": "kd"}]})
        df = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "results"), progress=False,
                                                  baseline=False, tracking=False)).table
    finally:
        ray.shutdown()
    assert len(df) == 2 and (df.status == "finished").all(), df[["status", "error"]] if "error" in df else df
    dist = df[df["param.method"] == "dist"]  # drawn, and trained in a Ray worker that registered it
    assert len(dist) == 1 and dist["val_acc"].between(0, 1).all()
