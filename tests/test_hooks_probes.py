"""Forward hooks by module path, layer listing, and Probe-KD probes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdray.core.hooks import FeatureHooks, check_paths, list_layers, output_shapes
from kdray.core.probes import accuracy, fit_probe, pool
from kdray.errors import ConfigError


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Linear(6, 3))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_capture_outputs_and_are_removed():
    m = net()
    x = torch.randn(5, 4)
    with FeatureHooks(m, ["1", "2.0"]) as h:
        m(x)
        assert hook_count(m) == 2
    assert hook_count(m) == 0
    expected = m[2][0](torch.relu(m[0](x)))
    assert torch.allclose(h.outputs["2.0"], expected)
    assert h.outputs["1"].shape == (5, 8)


def test_hooks_removed_after_an_exception():
    m = net()
    with pytest.raises(RuntimeError):
        with FeatureHooks(m, ["1"]):
            m(torch.randn(2, 5))  # wrong width
    assert hook_count(m) == 0


def test_bad_path_names_the_closest():
    m = net()
    with pytest.raises(ConfigError) as info:
        check_paths(m, ["2.1", "2.00"], "distill.terms[0].student_layers")
    e = info.value
    assert e.field == "distill.terms[0].student_layers" and e.value == "2.00"
    assert "2.0" in e.allowed


def test_list_layers_and_output_shapes():
    m = net()
    infos = {i.path: i for i in list_layers(m, torch.randn(7, 4), "student")}
    assert set(infos) == {"0", "1", "2", "2.0", "2.1", "3"}
    assert infos["2.0"].shape == (7, 6) and infos["2.0"].type == "Linear" and infos["2.0"].params == 8 * 6 + 6
    assert output_shapes(m, torch.randn(3, 4), ["3"], "f") == {"3": torch.Size([3, 3])}
    assert m.training  # list_layers restores the mode


def test_pooling_shapes():
    x = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    assert torch.equal(pool(x, "mean"), x.mean(2))
    assert torch.equal(pool(x, "max"), x[:, :, -1])
    assert pool(x, "flatten").shape == (2, 12)
    assert torch.equal(pool(x, "first"), x[:, 0])
    assert torch.equal(pool(x, "seq_mean"), x.mean(1))
    assert pool(torch.randn(2, 5), "mean").shape == (2, 5)
    with pytest.raises(ValueError):
        pool(x, "median")


def test_probe_fits_separable_data_and_l2_shrinks_weights():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 10, generator=g)
    feats = x.unsqueeze(-1).expand(300, 10, 2).contiguous()  # (B, C, L) like a conv map
    weak = fit_probe(feats, y, 3, "mean", l2=1e-4)
    strong = fit_probe(feats, y, 3, "mean", l2=10.0)
    assert accuracy(weak, feats, y) > 0.95
    assert strong.linear.weight.norm() < weak.linear.weight.norm()
    assert not any(p.requires_grad for p in weak.parameters())


def test_hooks_capture_a_module_input_on_the_mnist1d_cnn():
    from kdray.models.mnist1d import mnist1d_cnn

    m = mnist1d_cnn(10, channels=8).eval()
    x = torch.randn(3, 40)
    with FeatureHooks(m, ["relu2:input", "conv2", "conv2:output", "relu2"]) as h:
        m(x)
    assert torch.equal(h.outputs["relu2:input"], h.outputs["conv2"])  # the pre-activation entering relu2
    assert torch.equal(h.outputs["conv2:output"], h.outputs["conv2"])
    assert torch.equal(h.outputs["relu2"], torch.relu(h.outputs["conv2"]))
    assert output_shapes(m, x, ["relu2:input"], "teacher_layers") == {"relu2:input": h.outputs["conv2"].shape}


@pytest.mark.parametrize("layer", ["relu2:inputs", "nope:input", ":input"])
def test_check_paths_refuses_a_bad_suffix_or_path(layer):
    from kdray.models.mnist1d import mnist1d_cnn

    with pytest.raises(ConfigError) as e:
        check_paths(mnist1d_cnn(10, channels=8), [layer], "teacher_layers")
    assert e.value.field == "teacher_layers" and e.value.value == layer
