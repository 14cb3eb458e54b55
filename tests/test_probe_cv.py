"""Probe regularisation chosen on data (``l2: auto``): the batched fit against scikit-learn's logistic regression,
the cross-validated strength against ``LogisticRegressionCV`` on hidden states of a real (tiny, random-weight) BERT,
the folds, the fallback, and the chosen strength in the cache manifest, the layers table and the plot."""
from __future__ import annotations

import copy
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from torch import nn

from kdray.core.bundle import DataBundle
from kdray.core.cache import CacheRequest, get_cache, probe_reports
from kdray.core.methods import build_terms
from kdray.models.mnist1d import MNIST1DCNN
from kdray.core.probe_fit import FOLDS, L2_GRID, _pick, fallback_l2, fit_linear, standardisation, stratified_folds
from kdray.core.probes import ProbeSpec, accuracy, fit_probe
from kdray.core.signals import probe_specs
from kdray.errors import ConfigError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import ProbeLayers
from kdray.report.plots import probe_layers_plot
from kdray.report.tables import probe_layers_table


C, T, V = 3, 12, 60  # classes, tokens per sequence, vocabulary


def token_data(n: int, g: torch.Generator, cue: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences in which a fraction ``cue`` of the tokens come from five tokens of the example's class."""
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randint(20, V, (n, T), generator=g)
    cued = torch.rand(n, T, generator=g) < cue
    return torch.where(cued, 2 + 5 * y[:, None] + torch.randint(0, 5, (n, T), generator=g), x), y


@pytest.fixture(scope="module")
def bert_states():
    """Hidden states of a tiny BERT (random weights, built from a config) on 1000 training and 1000 test sequences."""
    import transformers as tf

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    (xtr, ytr), (xte, yte) = token_data(1000, g), token_data(1000, g)
    bert = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=T)).eval()
    with torch.no_grad():
        return bert(xtr, output_hidden_states=True).hidden_states, ytr, bert(xte, output_hidden_states=True).hidden_states, yte


POOLED = {"seq_mean": lambda h: h.mean(1), "first": lambda h: h[:, 0], "max": lambda h: h.amax(1)}


def sklearn_cv_accuracy(z: torch.Tensor, y: torch.Tensor, zt: torch.Tensor, yt: torch.Tensor) -> float:
    """LogisticRegressionCV over kdray's grid (C = 1 / (l2 * n_train)) on features standardised as kdray does."""
    m, s = standardisation(z)
    n_train = len(y) * (FOLDS - 1) / FOLDS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegressionCV(Cs=[1 / (l2 * n_train) for l2 in L2_GRID], max_iter=1000,
                                   cv=StratifiedKFold(FOLDS, shuffle=True, random_state=0))
        clf.fit(((z - m) / s).numpy(), y.numpy())
        return clf.score(((zt - m) / s).numpy(), yt.numpy())


def test_auto_matches_logistic_regression_cv_over_layers_budgets_and_poolings(bert_states):
    htr, ytr, hte, yte = bert_states
    cases = [(layer, pooling) for layer in (1, 3) for pooling in POOLED]
    diffs = []
    for n in (50, 200, 1000):
        feats = [POOLED[p](htr[layer][:n]) for layer, p in cases]
        fits = fit_linear(feats, ytr[:n], C, ["auto"] * len(cases))  # every layer and pooling in one batch
        for (layer, p), z, fit in zip(cases, feats, fits):
            zt = POOLED[p](hte[layer])
            ours = ((((zt - fit.mean) / fit.std) @ fit.weight.T + fit.bias).argmax(1) == yte).float().mean().item()
            theirs = sklearn_cv_accuracy(z, ytr[:n], zt, yte)
            assert fit.choice is not None and fit.choice.folds == FOLDS and fit.choice.l2 in L2_GRID
            assert ours >= theirs - 0.06, (n, layer, p, ours, theirs)  # other folds: with 50 labels the choice may differ
            diffs.append(ours - theirs)
    assert abs(float(np.mean(diffs))) <= 0.01, diffs


def test_the_batched_fit_is_scikit_learns_optimum_for_every_layer_at_once():
    """Layers of different widths (one wider than the examples are many) in one batch, each at its own strength."""
    g = torch.Generator().manual_seed(1)
    n = 120
    y = torch.randint(0, C, (n,), generator=g)
    feats = [torch.randn(n, d, generator=g) + 0.5 * torch.randn(C, d, generator=g)[y] for d in (8, 40, 300)]
    l2s = [1e-2, 1e-1, 1.0]
    fits = fit_linear(feats, y, C, l2s, max_iter=500)
    for z, l2, fit in zip(feats, l2s, fits):
        m, s = standardisation(z)
        zs = (z - m) / s
        ref = LogisticRegression(C=1 / (l2 * n), tol=1e-8, max_iter=5000).fit(zs.numpy(), y.numpy())
        ours = torch.softmax(zs @ fit.weight.T + fit.bias, 1).numpy()
        np.testing.assert_allclose(ours, ref.predict_proba(zs.numpy()), atol=5e-3)
        assert fit.l2 == l2 and fit.choice is None


def test_auto_chooses_stronger_regularisation_with_few_labels_and_many_dims(bert_states):
    htr, ytr, _, _ = bert_states

    def chosen(n: int) -> list[float]:
        return [fit.l2 for fit in fit_linear([htr[layer][:n].mean(1) for layer in (1, 2, 3)], ytr[:n], C, ["auto"] * 3)]

    for few, many in zip(chosen(50), chosen(1000)):  # 50 labels for 64 dimensions; then 1000
        assert few > many, (few, many)


def test_folds_are_stratified_deterministic_and_keep_lone_examples_in_training():
    y = torch.tensor([0] * 12 + [1] * 7 + [2] * 1)
    folds, k = stratified_folds(y)
    assert k == FOLDS and folds[-1] == -1  # the one example of class 2 is never held out
    for c, count in ((0, 12), (1, 7)):
        per_fold = torch.bincount(folds[y == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count
    assert torch.equal(stratified_folds(y)[0], folds)
    assert stratified_folds(torch.tensor([0, 0, 0, 1, 1]))[1] == 2  # fewer folds than 5: the smallest class has 2
    assert stratified_folds(torch.tensor([0, 1, 2]))[1] == 0


def test_one_label_per_class_falls_back_and_says_so(caplog):
    caplog.set_level(logging.INFO, "kdray")
    z, y = torch.randn(3, 50), torch.tensor([0, 1, 2])
    fit = fit_linear([z], y, C, ["auto"])[0]
    assert fit.l2 == fallback_l2(3) == pytest.approx(1 / 3) and fit.choice.folds == 0
    assert "nothing can be held out" in caplog.text and "C = 1" in caplog.text
    probe = fit_probe(z, y, C, "mean", "auto")
    assert accuracy(probe, z, y) == 1.0


def test_a_tie_goes_to_the_stronger_strength():
    grid = (1e-3, 1e-2, 1e-1)
    assert _pick(torch.tensor([0.5, 0.7, 0.7]), grid, 5).l2 == 1e-1
    assert _pick(torch.tensor([0.8, 0.7, 0.6]), grid, 5).l2 == 1e-3


def test_options_take_auto_or_a_number_and_specs_of_both_sort(tiny_raw):
    def options(l2):
        raw = copy.deepcopy(tiny_raw)
        raw["distill"]["terms"] = [{"method": "probe_kd", "teacher_layers": ["relu3"], "options": {"l2": l2}}]
        cfg = parse_config(raw)
        return probe_specs([m for _, _, m in build_terms(cfg.distill.terms, 4.0)], MNIST1DCNN(10))[0]

    auto, fixed = options("auto"), options(0.01)
    assert auto.l2 == "auto" and fixed.l2 == 0.01 and auto.column == "probe/relu3/mean/auto/100"
    assert sorted([fixed, auto]) == [auto, fixed]
    assert CacheRequest((), (fixed,)).union(CacheRequest((), (auto,))).probes == (auto, fixed)
    for bad in (0, "often", -1e-3):
        with pytest.raises(ConfigError) as info:
            options(bad)
        assert info.value.field == "distill.terms[0].options.l2" and "auto" in info.value.allowed


def mlp_bundle(n: int = 300, labelled: int = 90) -> tuple[nn.Module, DataBundle]:
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, C)).eval()
    g = torch.Generator().manual_seed(3)

    def split(m: int):
        y = torch.randint(0, C, (m,), generator=g)
        return torch.randn(m, 20, generator=g) + torch.randn(C, 20, generator=g)[y], y

    (x, y), (xv, yv), (xt, yt) = split(n), split(100), split(100)
    lab = torch.arange(n) < labelled
    bundle = DataBundle(x, torch.where(lab, y, -1), lab, xv, yv, xt, yt, C, None, "blobs", "blobs-test-probe-cv")
    return teacher, bundle


def test_the_chosen_strength_is_in_the_manifest_the_reports_the_table_and_the_plot(tmp_path):
    teacher, bundle = mlp_bundle()
    specs = (ProbeSpec("1", "mean", "auto", 100), ProbeSpec("3", "mean", "auto", 100), ProbeSpec("3", "mean", 0.5, 100))
    req = CacheRequest((), specs)
    first = get_cache(teacher, bundle, req, cache_root=str(tmp_path))
    records = first.manifest["probes"]
    assert [r["l2"] for r in records] == ["auto", "auto", 0.5]
    refits = [g * (FOLDS - 1) / FOLDS for g in L2_GRID]  # a grid strength, for all the labelled examples
    assert all(min(abs(r["l2_chosen"] / g - 1) for g in refits) < 1e-9 for r in records[:2])
    assert records[2]["l2_chosen"] == 0.5
    assert json.loads((first.path / "manifest.json").read_text())["probes"] == records
    assert [r.l2 for r in probe_reports(first.manifest)] == [r["l2_chosen"] for r in records]
    again = get_cache(teacher, bundle, req, cache_root=str(tmp_path))
    assert again.hit and again.key == first.key  # "auto" keys the entry like a number does
    logits, report = again.probe(specs[0])  # from the cache: the same strength
    assert report.l2 == records[0]["l2_chosen"] and logits.shape == (len(bundle.x_train), C)

    auto = [r for r in records if r["l2"] == "auto"]
    table = probe_layers_table(ProbeLayers("mean", auto, 0.9, None))
    assert "l2 (cross-validated)" in table.splitlines()[0]
    for r in auto:
        assert f"{r['l2_chosen']:.3g}" in table
    png = probe_layers_plot(auto, 0.9, tmp_path / "probes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_manifest_written_before_auto_still_reads():
    old = {"layer": "relu3", "pooling": "mean", "l2": 0.001, "max_iter": 100, "dim": 40, "train_acc": 1.0,
           "val_acc": 0.5}
    assert probe_reports({"probes": [old]})[0].l2 == 0.001
    table = probe_layers_table(ProbeLayers("mean", [old], None, None))
    assert "0.001" in table and "cross-validated" not in table


def test_a_search_space_draws_l2_from_auto_and_numbers(tmp_path, tiny_raw):
    from helpers.searches import write_space

    from kdray.experiment.space import configs_of_file

    probe_kd = [{"method": "probe_kd", "teacher_layers": ["relu3"], "options": {"l2": {"choice": ["auto", 0.01]}}}]
    cfgs = configs_of_file(str(write_space(tmp_path, tiny_raw, methods={"kd": [{"method": "kd"}],
                                                                         "probe_kd": probe_kd})))
    req = CacheRequest()
    for cfg in cfgs:
        terms = [m for _, _, m in build_terms(cfg.distill.terms, 4.0)]
        req = req.union(CacheRequest((), tuple(probe_specs(terms, MNIST1DCNN(10)))))
    assert {s.l2 for s in req.probes} == {"auto", 0.01}
    ranged = [{"method": "probe_kd", "teacher_layers": ["relu3"], "options": {"l2": {"float": [1e-4, 1.0], "log": True}}}]
    cfgs = configs_of_file(str(write_space(tmp_path, tiny_raw, methods={"probe_kd": ranged})))
    assert {t.options["l2"] for c in cfgs for t in c.distill.terms} >= {1e-4, 1.0}


def test_the_parent_run_logs_each_probes_strength_beside_its_accuracy(tmp_path):
    import os

    from mlflow import MlflowClient

    from kdray.tracking.parent_run import ParentRun, SearchStore

    store = SearchStore(os.environ["MLFLOW_TRACKING_URI"], "probe-l2", None, {}, tmp_path)
    c = store.client
    store.parent_run_id = c.create_run(c.create_experiment(f"probe-l2-{tmp_path.name}")).info.run_id
    records = [{"layer": f"blocks.{i}", "pooling": "mean", "l2": "auto", "dim": 8, "train_acc": 1.0,
                "val_acc": 0.5 + i / 10, "l2_chosen": 10.0 ** -i} for i in range(3)]
    ParentRun(store)._log_probes(records, 0.6)
    metrics = MlflowClient(store.uri).get_run(store.parent_run_id).data.metrics
    for i in range(3):
        assert metrics[f"probe_l2.blocks.{i}.mean"] == pytest.approx(10.0 ** -i)
        assert metrics[f"probe_val_acc.blocks.{i}.mean"] == pytest.approx(0.5 + i / 10)
    assert [a.path for a in c.list_artifacts(store.parent_run_id, "probes")] == ["probes/mean.png"]
