"""Unit tests of kdray.core.methods against values derived independently (by hand, or numpy with loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdray.config import TermConfig
from kdray.core.methods import METHODS, Method, Signals, build_terms
from kdray.errors import ConfigError

ALL = ["ab", "at", "dkd", "feature_l2", "fitnet", "fsp", "kd", "pkt", "probe_kd", "rkd", "self_aux", "sp"]


# --------------------------------------------------------------------------------------------------
# independent numpy references (no kdray helpers)


def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def np_kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def block_mean(x, k):
    """Average-pool the last two dims of a numpy array by non-overlapping k x k blocks."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // k, k, w // k, k).mean(axis=(-3, -1))


def make(method, default_t=4.0, **kw):
    """An instance of ``method``; ``kw`` are TermConfig fields, ``default_t`` is distill.temperature."""
    term = TermConfig(method=method, **kw)
    return METHODS.get(method)(term, default_t)


def built(method, s_feats, t_feats, **kw):
    s_layers, t_layers = list(s_feats), list(t_feats)
    m = make(method, student_layers=s_layers, teacher_layers=t_layers, **kw)
    m.build({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()})
    return m


def feat_sig(s_feats, t_feats, B):
    return Signals(student_logits=torch.zeros(B, 3), teacher_logits=torch.zeros(B, 3),
                   student_features=s_feats, teacher_features=t_feats, labels=torch.full((B,), -1))


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# logit methods


def test_kd_hand_value():
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); KL = .75 ln 1.5 + .25 ln .5
    m = make("kd", 1.0)
    sig = Signals(student_logits=torch.tensor([[0.0, 0.0]]),
                  teacher_logits=torch.tensor([[math.log(3), 0.0]]))
    assert m(sig).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_kd_batch_mean_and_t_squared():
    s, t = rand(2, 5, seed=1), rand(2, 5, seed=2) * 3
    for T in (1.0, 2.0, 4.0):
        m = make("kd", T)
        expected = [np_kl(np_softmax(t[i].numpy() / T), np_softmax(s[i].numpy() / T)) * T * T
                    for i in range(2)]
        got = m(Signals(student_logits=s, teacher_logits=t)).item()
        assert got == pytest.approx(np.mean(expected), rel=1e-9)  # mean, not sum
        per = [m(Signals(student_logits=s[i:i + 1], teacher_logits=t[i:i + 1])).item() for i in range(2)]
        assert got == pytest.approx((per[0] + per[1]) / 2, rel=1e-9)


def test_kd_term_temperature_overrides_default():
    assert make("kd", 4.0, temperature=2.0).temperature == 2.0
    assert make("kd", 3.0).temperature == 3.0


def test_probe_kd_uses_probe_logits():
    s, p = rand(3, 4, seed=3), rand(3, 4, seed=4)
    T = 2.0
    m = make("probe_kd", T, teacher_layers=["blocks.1"])
    sig = Signals(student_logits=s, teacher_logits=None, probe_logits={"blocks.1": p})
    expected = np.mean([np_kl(np_softmax(p[i].numpy() / T), np_softmax(s[i].numpy() / T)) * T * T
                        for i in range(3)])
    assert m(sig).item() == pytest.approx(expected, rel=1e-9)
    assert m.opts.pooling == "auto" and m.opts.l2 == "auto" and m.opts.max_iter == 100


def np_dkd(s, t, target, T, alpha, beta):
    out = []
    for i in range(s.shape[0]):
        ps, pt, g = np_softmax(s[i] / T), np_softmax(t[i] / T), target[i]
        tckd = np_kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        others = [j for j in range(len(ps)) if j != g]
        qs = [ps[j] / (1 - ps[g]) for j in others]
        qt = [pt[j] / (1 - pt[g]) for j in others]
        out.append((alpha * tckd + beta * np_kl(qt, qs)) * T * T)
    return float(np.mean(out))


def test_dkd_against_loop_reference():
    s, t = rand(3, 5, seed=5).numpy(), (rand(3, 5, seed=6) * 2).numpy()
    labels = torch.tensor([2, 0, 4])
    m = make("dkd", 4.0, options={"alpha": 1.0, "beta": 8.0})
    got = m(Signals(student_logits=torch.tensor(s), teacher_logits=torch.tensor(t), labels=labels)).item()
    assert got == pytest.approx(np_dkd(s, t, [2, 0, 4], 4.0, 1.0, 8.0), rel=1e-9)
    m2 = make("dkd", 2.0, options={"alpha": 0.5, "beta": 3})
    got2 = m2(Signals(student_logits=torch.tensor(s), teacher_logits=torch.tensor(t), labels=labels)).item()
    assert got2 == pytest.approx(np_dkd(s, t, [2, 0, 4], 2.0, 0.5, 3.0), rel=1e-9)


def test_dkd_uses_teacher_argmax_for_unlabelled():
    s, t = rand(3, 5, seed=7), rand(3, 5, seed=8) * 2
    argmax = t.argmax(1)
    other = (argmax + 1) % 5
    m = make("dkd")
    unl = m(Signals(student_logits=s, teacher_logits=t, labels=torch.tensor([-1, -1, -1]))).item()
    assert unl == pytest.approx(np_dkd(s.numpy(), t.numpy(), argmax.tolist(), 4.0, 1.0, 8.0), rel=1e-9)
    assert m(Signals(student_logits=s, teacher_logits=t, labels=None)).item() == pytest.approx(unl, rel=1e-12)
    mixed = torch.tensor([other[0].item(), -1, other[2].item()])
    want = [other[0].item(), argmax[1].item(), other[2].item()]
    got = m(Signals(student_logits=s, teacher_logits=t, labels=mixed)).item()
    assert got == pytest.approx(np_dkd(s.numpy(), t.numpy(), want, 4.0, 1.0, 8.0), rel=1e-9)
    assert got != pytest.approx(unl)


# --------------------------------------------------------------------------------------------------
# feature methods


def test_fitnet_identity_shapes_is_plain_mse():
    s, t = rand(2, 3, 4, seed=9), rand(2, 3, 4, seed=10)
    m = built("fitnet", {"s": s}, {"t": t})
    assert list(m.parameters()) == []  # equal shapes: no adapter
    assert m(feat_sig({"s": s}, {"t": t}, 2)).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-12)


def test_fitnet_linear_adapter_with_known_weights():
    s, t = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    m = built("fitnet", {"s": s}, {"t": t})
    lin = m.adapters[0]
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
    # adapted: [[1.5, 5], [0.5, 0]]; diffs [[.5, 5], [-1.5, -2]]; squares .25 25 2.25 4 -> mean 31.5/4
    assert m(feat_sig({"s": s}, {"t": t}, 2)).item() == pytest.approx(31.5 / 4)


def test_fitnet_conv_adapter_and_pooling():
    s, t = rand(2, 2, 4, 4, seed=11).float(), rand(2, 3, 2, 2, seed=12).float()
    m = built("fitnet", {"s": s}, {"t": t})
    conv = m.adapters[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    w = np.array([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]])
    b = np.array([0.1, 0.2, 0.3])
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w, dtype=torch.float32).view(3, 2, 1, 1))
        conv.bias.copy_(torch.tensor(b, dtype=torch.float32))
    pooled = block_mean(s.numpy(), 2)  # (2, 2, 2, 2)
    adapted = np.zeros((2, 3, 2, 2))
    for n in range(2):
        for o in range(3):
            adapted[n, o] = b[o] + sum(w[o, i] * pooled[n, i] for i in range(2))
    expected = ((adapted - t.numpy()) ** 2).mean()
    assert m(feat_sig({"s": s}, {"t": t}, 2)).item() == pytest.approx(expected, rel=1e-5)


def test_adapters_created_from_shapes_and_in_parameters():
    m = make("fitnet", student_layers=["a", "b", "c"], teacher_layers=["x", "y", "z"])
    m.build({"a": torch.Size([8, 5]), "b": torch.Size([8, 4, 10]), "c": torch.Size([8, 6, 3, 3])},
            {"x": torch.Size([8, 7]), "y": torch.Size([8, 4, 5]), "z": torch.Size([8, 2, 3, 3])})
    kinds = [type(a) for a in m.adapters]
    assert kinds == [nn.Linear, nn.Identity, nn.Conv2d]
    ids = {id(p) for p in m.parameters()}
    for a in (m.adapters[0], m.adapters[2]):
        assert {id(p) for p in a.parameters()} <= ids and len(list(a.parameters())) == 2
    assert m.adapters[0].in_features == 5 and m.adapters[0].out_features == 7
    assert m.adapters[2].in_channels == 6 and m.adapters[2].out_channels == 2
    m1 = make("ab", student_layers=["a"], teacher_layers=["x"])
    m1.build({"a": torch.Size([8, 4, 10])}, {"x": torch.Size([8, 6, 10])})
    assert isinstance(m1.adapters[0], nn.Conv1d) and m1.adapters[0].kernel_size == (1,)
    assert len(list(m1.parameters())) == 2
    fsp = make("fsp", student_layers=["a", "b"], teacher_layers=["x", "y"])
    fsp.build({"a": torch.Size([8, 4, 8, 8]), "b": torch.Size([8, 6, 4, 4])},
              {"x": torch.Size([8, 4, 8, 8]), "y": torch.Size([8, 9, 4, 4])})
    assert isinstance(fsp.adapters[0], nn.Identity) and isinstance(fsp.adapters[1], nn.Conv2d)
    assert len(list(fsp.parameters())) == 2


def test_feature_l2():
    s, t = rand(3, 2, 5, seed=13), rand(3, 2, 5, seed=14)
    m = built("feature_l2", {"s": s}, {"t": t})
    expected = []
    for i in range(3):
        a, b = s[i].numpy().ravel(), t[i].numpy().ravel()
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        expected.append(((a - b) ** 2).sum())
    assert m(feat_sig({"s": s}, {"t": t}, 3)).item() == pytest.approx(np.mean(expected), rel=1e-10)
    # hand value: orthogonal unit vectors are at squared distance 2
    e1, e2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    m2 = built("feature_l2", {"s": e1}, {"t": e2})
    assert m2(feat_sig({"s": e1}, {"t": e2}, 1)).item() == pytest.approx(2.0)


def test_ab_hand_values():
    s = torch.tensor([[-2.0, -0.5, 0.5, 2.0], [0.0, 0.0, 3.0, -3.0]])
    t = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [1.0, -1.0, -1.0, 1.0]])
    # row 0: 0 + .25 + .25 + 0; row 1: (0-1)^2 + (0+1)^2 + (3+1)^2 + (-3-1)^2 = 1 + 1 + 16 + 16
    m = built("ab", {"s": s}, {"t": t})
    assert m(feat_sig({"s": s}, {"t": t}, 2)).item() == pytest.approx((0.5 + 34.0) / 8)
    m2 = built("ab", {"s": s}, {"t": t}, options={"margin": 2.0})
    # row 0: s=-2 (t<=0, s>-2? no) 0; -0.5 -> 1.5^2; 0.5 -> 1.5^2; 2 (t>0, s<=2) -> 0
    # row 1: 0 -> 4; 0 -> 4; 3 (t<=0, s>-2) -> 25; -3 (t>0, s<=2) -> 25
    assert m2(feat_sig({"s": s}, {"t": t}, 2)).item() == pytest.approx((4.5 + 58.0) / 8)


def np_attention(f):
    a = (f ** 2).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_at_with_pooling_and_sum_over_pairs():
    s1, t1 = rand(2, 3, 4, 4, seed=15), rand(2, 5, 2, 2, seed=16)  # student map pooled to 2x2
    s2, t2 = rand(2, 4, 6, seed=17), rand(2, 2, 6, seed=18)  # 1-D maps, equal length
    m = built("at", {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2})
    assert list(m.parameters()) == []
    l1 = ((np_attention(block_mean(s1.numpy(), 2)) - np_attention(t1.numpy())) ** 2).mean()
    l2 = ((np_attention(s2.numpy()) - np_attention(t2.numpy())) ** 2).mean()
    got = m(feat_sig({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}, 2)).item()
    assert got == pytest.approx(l1 + l2, rel=1e-10)


@pytest.mark.parametrize("n", [2, 3])
def test_at_with_n_identical_pairs_is_n_times_one_pair(n):
    """RepDistiller and mdistiller sum AT over the pairs: the reference weight 1000 is for that sum."""
    s, t = rand(4, 3, 4, 4, seed=19), rand(4, 5, 4, 4, seed=20)
    one = built("at", {"s": s}, {"t": t})(feat_sig({"s": s}, {"t": t}, 4)).item()
    m = make("at", student_layers=["s"] * n, teacher_layers=["t"] * n)
    m.build({"s": s.shape}, {"t": t.shape})
    assert one > 0 and m(feat_sig({"s": s}, {"t": t}, 4)).item() == pytest.approx(n * one, rel=1e-12)


def test_at_on_flat_layer_raises_config_error():
    m = make("at", student_layers=["fc1"], teacher_layers=["conv2"])
    with pytest.raises(ConfigError) as e:
        m.build({"fc1": torch.Size([32, 100])}, {"conv2": torch.Size([32, 8, 10])})
    assert e.value.field == "student_layers" and e.value.value == "fc1"
    assert "(B, 100)" in e.value.allowed and "(B, C, L)" in e.value.allowed
    m = make("at", student_layers=["conv1"], teacher_layers=["fc"])
    with pytest.raises(ConfigError) as e:
        m.build({"conv1": torch.Size([32, 8, 10])}, {"fc": torch.Size([32, 64])})
    assert e.value.field == "teacher_layers" and e.value.value == "fc" and "(B, 64)" in e.value.allowed
    fsp = make("fsp", student_layers=["c1", "fc1"], teacher_layers=["a", "b"])
    with pytest.raises(ConfigError) as e:
        fsp.build({"c1": torch.Size([4, 3, 8]), "fc1": torch.Size([4, 100])},
                  {"a": torch.Size([4, 3, 8]), "b": torch.Size([4, 3, 8])})
    assert e.value.field == "student_layers" and e.value.value == "fc1" and "(B, 100)" in e.value.allowed


def test_fsp_against_loop_reference():
    s1, s2 = rand(2, 2, 4, 4, seed=19), rand(2, 3, 2, 2, seed=20)
    t1, t2 = rand(2, 2, 2, 2, seed=21), rand(2, 3, 2, 2, seed=22)
    m = built("fsp", {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2})
    assert list(m.parameters()) == []  # channel counts agree

    def gram(f1, f2):  # f1 (C1, H, W), f2 (C2, H, W) with equal H, W
        P = f1.shape[1] * f1.shape[2]
        g = np.zeros((f1.shape[0], f2.shape[0]))
        for i in range(f1.shape[0]):
            for j in range(f2.shape[0]):
                g[i, j] = sum(f1[i, h, w] * f2[j, h, w]
                              for h in range(f1.shape[1]) for w in range(f1.shape[2])) / P
        return g

    sq = []
    for n in range(2):
        gs = gram(block_mean(s1[n].numpy(), 2), s2[n].numpy())
        gt = gram(t1[n].numpy(), t2[n].numpy())
        sq.append((gs - gt) ** 2)
    got = m(feat_sig({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}, 2)).item()
    assert got == pytest.approx(np.mean(sq), rel=1e-10)


def test_sp_against_loop_reference_summed_over_pairs():
    def np_sp(fs, ft):
        B = fs.shape[0]
        fs, ft = fs.reshape(B, -1), ft.reshape(B, -1)
        total = 0.0
        gs, gt = fs @ fs.T, ft @ ft.T
        for i in range(B):
            rs, rt = gs[i] / np.linalg.norm(gs[i]), gt[i] / np.linalg.norm(gt[i])
            for j in range(B):
                total += (rt[j] - rs[j]) ** 2
        return total / B ** 2

    s1, t1 = rand(4, 3, 5, seed=23), rand(4, 7, seed=24)  # any ranks, no adapter
    s2, t2 = rand(4, 6, seed=25), rand(4, 2, 2, 2, seed=26)
    m = built("sp", {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2})
    assert list(m.parameters()) == []
    got = m(feat_sig({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}, 4)).item()
    expected = np_sp(s1.numpy(), t1.numpy()) + np_sp(s2.numpy(), t2.numpy())
    assert got == pytest.approx(expected, rel=1e-10)


def np_rkd(fs, ft, dw, aw):
    B = fs.shape[0]

    def dists(f):
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(B)] for i in range(B)])
        return d / (d.sum() / (B * (B - 1)))  # mean over the B(B-1) non-diagonal pairs

    def unit(v):
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def angles(f):
        return np.array([[[unit(f[j] - f[i]) @ unit(f[k] - f[i]) for k in range(B)] for j in range(B)]
                         for i in range(B)])

    ds, dt = dists(fs), dists(ft)
    as_, at = angles(fs), angles(ft)
    dist = np.mean([smooth_l1(a, b) for a, b in zip(ds.ravel(), dt.ravel())])
    ang = np.mean([smooth_l1(a, b) for a, b in zip(as_.ravel(), at.ravel())])
    return dw * dist + aw * ang


def test_rkd_against_loop_reference():
    s, t = rand(4, 2, 3, seed=27), rand(4, 5, seed=28) * 3
    m = built("rkd", {"s": s}, {"t": t})
    got = m(feat_sig({"s": s}, {"t": t}, 4)).item()
    assert got == pytest.approx(np_rkd(s.numpy().reshape(4, -1), t.numpy(), 25.0, 50.0), rel=1e-7)
    m2 = built("rkd", {"s": s}, {"t": t}, options={"distance_weight": 1.0, "angle_weight": 0.0})
    got2 = m2(feat_sig({"s": s}, {"t": t}, 4)).item()
    assert got2 == pytest.approx(np_rkd(s.numpy().reshape(4, -1), t.numpy(), 1.0, 0.0), rel=1e-7)


def test_rkd_angles_match_difference_vectors_with_duplicates_and_gradients():
    """kdray computes RKD angles from the Gram matrix; the direct (B, B, D) unit-difference formulation
    gives the same values and gradients, and a duplicated example gives 0 angles and finite gradients."""
    from kdray.core.methods import _angles

    def direct(f):  # RepDistiller's form, but e_ii = 0 without normalize's eps (whose 1/eps gradient, cancelled
        v = f[None, :, :] - f[:, None, :]  # between f_i and -f_i, leaves 1e12-scale rounding noise)
        n = v.norm(dim=2, keepdim=True)
        e = torch.where(n > 0, v / n.clamp_min(1e-30), 0.0)
        return torch.bmm(e, e.transpose(1, 2))

    f = torch.randn(24, 40, generator=torch.Generator().manual_seed(3)) * 5 + 2
    f[7] = f[3]  # a duplicate, as two inputs with the same (e.g. all-zero) features give
    a, b = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    got, want = _angles(a), direct(b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[3, 7].abs().max() == 0 and got[7, :, 3].abs().max() == 0
    w = torch.randn(24, 24, 24, generator=torch.Generator().manual_seed(4))
    (got * w).sum().backward()  # the direct form's gradient explodes at a duplicate (normalize's eps: 1e12)
    assert torch.isfinite(a.grad).all() and a.grad.abs().max() < 1e3
    f[7] += 0.5  # no duplicate: the same gradients
    a, b = f.double().requires_grad_(True), f.double().requires_grad_(True)
    w = w.double()
    (_angles(a) * w).sum().backward()
    (direct(b) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9)


def test_rkd_hand_distance_value_and_batch_of_one():
    # student points 0, 1, 3 on a line: distances 1, 3, 2 -> mean 2 -> normalised .5, 1.5, 1
    # teacher points 0, 1, 2: distances 1, 2, 1 -> mean 4/3 -> .75, 1.5, .75
    # smooth L1 off-diagonal: |.25| -> .03125, 0, |.25| -> .03125, each twice; 9 entries (diag 0)
    s, t = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.0], [1.0], [2.0]])
    m = built("rkd", {"s": s}, {"t": t}, options={"distance_weight": 1.0, "angle_weight": 0.0})
    assert m(feat_sig({"s": s}, {"t": t}, 3)).item() == pytest.approx(4 * 0.03125 / 9)
    one = built("rkd", {"s": s[:1]}, {"t": t[:1]})
    assert one(feat_sig({"s": s[:1]}, {"t": t[:1]}, 1)).item() == 0.0


def test_pkt_against_loop_reference():
    eps = 1e-7

    def probs(f):
        B = f.shape[0]
        f = f.reshape(B, -1)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        c = np.array([[(f[i] @ f[j] + 1) / 2 for j in range(B)] for i in range(B)])
        return c / c.sum(axis=1, keepdims=True)

    s, t = rand(5, 3, 2, seed=29), rand(5, 4, seed=30)
    m = built("pkt", {"s": s}, {"t": t})
    ps, pt = probs(s.numpy()), probs(t.numpy())
    rows = [sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for j in range(5)) for i in range(5)]
    got = m(feat_sig({"s": s}, {"t": t}, 5)).item()
    assert got == pytest.approx(np.sum(rows) / 25, rel=1e-9)  # mean over all B*B entries (RepDistiller)


# --------------------------------------------------------------------------------------------------
# validation, building, gradients


def test_validate_term_rejects_unknown_option_key():
    with pytest.raises(ConfigError) as e:
        METHODS.get("ab").validate_term(TermConfig(method="ab", teacher_layers=["a"], student_layers=["b"],
                                                   options={"margn": 1.0}))
    assert e.value.field == "options.margn" and "margin" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        METHODS.get("kd").validate_term(TermConfig(method="kd", options={"alpha": 1}))
    assert e.value.field == "options.alpha"


def test_validate_term_rejects_bad_option_value():
    with pytest.raises(ConfigError) as e:
        METHODS.get("probe_kd").validate_term(TermConfig(method="probe_kd", teacher_layers=["x"],
                                                         options={"pooling": "median"}))
    assert e.value.field == "options.pooling" and e.value.value == "median"
    with pytest.raises(ConfigError) as e:
        METHODS.get("ab").validate_term(TermConfig(method="ab", teacher_layers=["a"], student_layers=["b"],
                                                   options={"margin": -1}))
    assert e.value.field == "options.margin"


@pytest.mark.parametrize("method,teacher,student,field", [
    ("kd", ["x"], [], "teacher_layers"),
    ("dkd", [], ["y"], "student_layers"),
    ("probe_kd", [], [], "teacher_layers"),
    ("probe_kd", ["a", "b"], [], "teacher_layers"),
    ("probe_kd", ["a"], ["b"], "student_layers"),
    ("fitnet", [], [], "teacher_layers"),
    ("at", ["a", "b"], ["c"], "student_layers"),
    ("sp", ["a"], ["c", "d"], "student_layers"),
    ("fsp", ["a"], ["c", "d"], "teacher_layers"),
    ("fsp", ["a", "b"], ["c"], "student_layers"),
])
def test_validate_term_rejects_wrong_layer_counts(method, teacher, student, field):
    with pytest.raises(ConfigError) as e:
        METHODS.get(method).validate_term(TermConfig(method=method, teacher_layers=teacher,
                                                     student_layers=student))
    assert e.value.field == field


def test_validate_term_accepts_good_terms_and_rejects_unused_temperature():
    METHODS.get("kd").validate_term(TermConfig(method="kd", temperature=2.0))
    METHODS.get("rkd").validate_term(TermConfig(method="rkd", teacher_layers="a", student_layers="b",
                                                options={"distance_weight": 10}))
    METHODS.get("fsp").validate_term(TermConfig(method="fsp", teacher_layers=["a", "b"],
                                                student_layers=["c", "d"]))
    with pytest.raises(ConfigError) as e:
        METHODS.get("fitnet").validate_term(TermConfig(method="fitnet", teacher_layers="a",
                                                       student_layers="b", temperature=2.0))
    assert e.value.field == "temperature"


def test_build_terms_weights_and_defaults():
    terms = [TermConfig(method="kd"),
             TermConfig(method="fitnet", weight=0.0, teacher_layers="a", student_layers="b"),
             TermConfig(method="rkd", weight=2.5, teacher_layers="a", student_layers="b")]
    out = build_terms(terms, 3.0)
    assert [w for _, w, _ in out] == [0.9, 0.0, 2.5]  # weight 0 is kept, not replaced by the default
    assert all(isinstance(m, Method) for _, _, m in out) and out[0][2].temperature == 3.0
    assert out[0][0] is terms[0]
    defaults = {n: METHODS.get(n).default_weight for n in ALL}
    assert defaults == {"kd": 0.9, "fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0, "pkt": 30000.0,
                        "dkd": 1.0, "fsp": 1.0, "ab": 1.0, "feature_l2": 1.0, "probe_kd": 0.9, "self_aux": 1.0}


def gradient_case(method):
    """A method instance, its signals, the student tensors and the teacher tensors (all leaves)."""
    B = 4
    s_logits, t_logits = rand(B, 5, seed=31).requires_grad_(), rand(B, 5, seed=32).requires_grad_()
    probe = rand(B, 5, seed=33).requires_grad_()
    s1, s2 = rand(B, 3, 8, seed=34).requires_grad_(), rand(B, 4, 4, seed=35).requires_grad_()
    t1, t2 = rand(B, 5, 8, seed=36).requires_grad_(), rand(B, 6, 4, seed=37).requires_grad_()
    s_feats, t_feats = {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}
    layers = {"none": {}, "teacher": {"teacher_layers": ["t1"]},
              "fsp": {"teacher_layers": ["t1", "t2"], "student_layers": ["s1", "s2"]},
              "pairs": {"teacher_layers": ["t1"], "student_layers": ["s1"]},
              "student": {"student_layers": ["s1", "s2"]}}[METHODS.get(method).layers]
    m = make(method, **layers).double()
    from kdray.core.methods import LOGITS

    m.build({LOGITS: s_logits.shape, **{k: v.shape for k, v in s_feats.items()}}, {k: v.shape for k, v in t_feats.items()})
    m = m.double()
    sig = Signals(student_logits=s_logits, teacher_logits=t_logits, student_features=s_feats,
                  teacher_features=t_feats, probe_logits={"t1": probe}, labels=torch.tensor([1, -1, 3, -1]))
    return m, sig, [s_logits, s1, s2], [t_logits, t1, t2, probe]


@pytest.mark.parametrize("method", ALL)
def test_gradients_reach_student_not_teacher(method):
    m, sig, student, teacher = gradient_case(method)
    loss = m(sig)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    assert all(x.grad is None for x in teacher)
    for p in m.parameters():  # adapters are trained
        assert p.grad is not None


def test_every_registered_method_is_tested():
    # kdray's own methods (a test may register its own, e.g. DIST in tests/helpers/dist_method.py)
    assert sorted(n for n in METHODS.names() if METHODS.get(n).__module__.startswith("kdray.")) == sorted(ALL)


def test_self_aux_heads_learn_from_labels_and_the_final_output():
    from kdray.config import TermConfig
    from kdray.core.methods import LOGITS, METHODS, Signals

    torch.manual_seed(0)
    term = TermConfig(method="self_aux", student_layers=["a", "b"])
    m = METHODS.get("self_aux")(term, temperature=2.0)
    m.build({"a": torch.Size([4, 3, 5]), "b": torch.Size([4, 6]), LOGITS: torch.Size([4, 7])}, {})
    fa, fb, final = torch.randn(4, 3, 5), torch.randn(4, 6), torch.randn(4, 7)
    y = torch.tensor([1, -1, 6, 0])  # one unlabelled example
    sig = Signals(student_logits=final, teacher_logits=None, student_features={"a": fa, "b": fb},
                  teacher_features={}, probe_logits={}, labels=y)
    got = m(sig)
    # re-derived: each head's CE on the labelled rows plus T^2 * KL(softmax(final/T) || softmax(head/T)), averaged
    T, expected = 2.0, 0.0
    for head, f in ((m.heads[0], fa.mean(2)), (m.heads[1], fb)):
        z = f @ head.weight.T + head.bias
        lab = y >= 0
        logp = z[lab] - z[lab].logsumexp(1, keepdim=True)
        ce = -logp[torch.arange(int(lab.sum())), y[lab]].mean()
        p_t = torch.softmax(final / T, 1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(z / T, 1))).sum(1).mean() * T * T
        expected += (ce + kl) / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert m.heads[0].weight.grad is not None and final.grad is None  # the final output is the (detached) target


def test_self_aux_needs_student_layers_and_no_teacher_layers():
    from kdray.config import TermConfig
    from kdray.core.methods import METHODS
    from kdray.errors import ConfigError

    cls = METHODS.get("self_aux")
    with pytest.raises(ConfigError, match="student_layers"):
        cls.validate_term(TermConfig(method="self_aux"))
    with pytest.raises(ConfigError, match="teacher_layers"):
        cls.validate_term(TermConfig(method="self_aux", teacher_layers=["x"], student_layers=["y"]))


# --------------------------------------------------------------------------------------------------
# traits and the pure losses (invariants, TRL style)


@pytest.mark.parametrize("method", ALL)
def test_traits_describe_every_method(method):
    cls = METHODS.get(method)
    assert cls.name == method  # set by the registry
    import inspect
    import re

    assert not re.search(r"^\s+name\s*[,=]", inspect.getsource(cls), re.M)  # no name string written on the class
    assert cls.kind in ("response", "feature", "relation", "self") and cls.paper and cls.notes
    assert cls.reads and cls.reads <= {"teacher logits", "teacher layers", "probes", "student layers"}
    assert cls.needs_teacher == (cls.kind != "self")
    assert cls.uses_teacher_logits == (method in ("kd", "dkd")) and cls.uses_probes == (method == "probe_kd")


def test_registering_sets_the_name_and_refuses_a_taken_one():
    from kdray.core.methods import MethodRegistry

    reg = MethodRegistry("method")

    @reg.register("mine")
    class Mine(Method):
        pass

    assert Mine.name == "mine" and reg.classes() == [Mine]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine")(type("Other", (Method,), {}))


def test_kd_loss_invariants():
    from kdray.core.methods import kd_loss

    s, t = rand(4, 6, seed=3), rand(4, 6, seed=4)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-12)  # zero when student equals teacher
    assert kd_loss(s + 5.0, t - 2.0, 3.0).item() == pytest.approx(kd_loss(s, t, 3.0).item())  # shift invariant
    # temperature scaling: kd(s, t, T) == T^2 kd(s/T, t/T, 1)
    assert kd_loss(s, t, 4.0).item() == pytest.approx(16 * kd_loss(s / 4, t / 4, 1.0).item())
    m = make("kd", 4.0)
    assert m(Signals(student_logits=s, teacher_logits=t)).item() == kd_loss(s, t, 4.0).item()


@pytest.mark.parametrize("loss", ["fitnet_loss", "feature_l2_loss", "at_loss", "sp_loss", "rkd_loss", "pkt_loss"])
def test_feature_and_relation_losses_are_zero_when_student_equals_teacher(loss):
    import kdray.core.methods as methods

    f = rand(5, 3, 8, seed=9)
    assert getattr(methods, loss)(f, f.clone()).item() == pytest.approx(0.0, abs=1e-9)


def test_fsp_and_dkd_losses_are_zero_when_student_equals_teacher():
    from kdray.core.methods import dkd_loss, fsp_loss

    a, b = rand(3, 4, 8, seed=1), rand(3, 5, 4, seed=2)
    assert fsp_loss(a, b, a, b).item() == pytest.approx(0.0, abs=1e-12)
    z = rand(3, 6, seed=5)
    assert dkd_loss(z, z, z.argmax(1), 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-9)


def test_mutual_learning_loss_is_labelled_ce_plus_kd_loss_and_dkd_sets_its_temperature():
    import torch.nn.functional as F

    from kdray.config import DistillConfig
    from kdray.core.methods import kd_loss
    from kdray.core.train import Distiller, mutual_learning_loss

    t, s, y = rand(4, 5, seed=6), rand(4, 5, seed=7), torch.tensor([1, -1, 3, -1])
    expected = F.cross_entropy(t[[0, 2]], y[[0, 2]]) + kd_loss(t, s, 2.0)
    assert mutual_learning_loss(t, y, s, 2.0).item() == pytest.approx(expected.item())
    d = Distiller(nn.Linear(3, 5), DistillConfig(temperature=1.0, terms=[{"method": "dkd", "temperature": 3.0}]))
    assert d.online_temperature() == 3.0  # not 1.0: dkd reads the teacher's logits at its temperature


def test_readme_methods_table_is_kdray_methods_markdown():
    """The README's table is generated: paste ``kdray methods --format markdown`` into its "### Methods" section.
    (A fresh process, so a method a test registered is not listed.)"""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "kdray.cli", "methods", "--format", "markdown"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.count("\n") == len(ALL) + 1 and all(f"| `{n}` |" in out for n in ALL)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert out in readme.split("### Methods", 1)[1]


def test_kdray_methods_json_and_table():
    import json

    from kdray.report.tables import methods_text

    rows = {r["method"]: r for r in json.loads(methods_text("json"))}
    assert rows["kd"]["kind"] == "response" and rows["kd"]["temperature"] and rows["kd"]["weight"] == 0.9
    assert rows["at"]["url"].startswith("https://arxiv.org/") and rows["self_aux"]["reads"] == "student layers"
    assert methods_text("table").splitlines()[0].split()[:3] == ["method", "kind", "reads"]
