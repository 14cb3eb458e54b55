"""Feature methods: the student's intermediate layers imitate the teacher's (hints, attention, activation
boundaries, FSP matrices). Formulas and reference weights: RepDistiller / mdistiller."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdray.config import Strict, TermConfig
from kdray.core.methods.base import (METHODS, STUDENT_LAYERS, TEACHER_LAYERS, Method, Signals, feature, fmt_shape,
                                     shape_of)
from kdray.core.methods.pairs import PairMethod, connector, pool_to
from kdray.errors import ConfigError


def fitnet_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNet hints, Romero et al. 2015 (arXiv:1412.6550): ``mean((connector(s) - t)^2)`` over all elements.

    YAML: ``{method: fitnet, teacher_layers: [relu3], student_layers: [relu3], weight: 100}``
    """
    return F.mse_loss(student, teacher.detach())


@METHODS.register("fitnet")
class FitNet(PairMethod):
    """FitNet hints (:func:`fitnet_loss`) on the connected student feature.

    Pairs: the mean. RepDistiller and mdistiller hint a single pair (``hint_layer``), where mean and sum
    agree; the mean keeps the reference weight 100 meaning the same strength when several pairs are hinted.
    """

    default_weight, paper, url = 100.0, "Romero et al. 2015", "https://arxiv.org/abs/1412.6550"
    notes = "MSE between adapted student and teacher features"

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return fitnet_loss(s, t)


def feature_l2_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_b |n(s_b) - n(t_b)|^2`` with ``n`` the L2-normalisation of the flattened feature (in [0, 4]).
    A kdray method with no reference paper.

    YAML: ``{method: feature_l2, teacher_layers: [relu3], student_layers: [relu3]}``
    """
    s, t = F.normalize(student.flatten(1), dim=1), F.normalize(teacher.detach().flatten(1), dim=1)
    return (s - t).pow(2).sum(1).mean()


@METHODS.register("feature_l2")
class FeatureL2(PairMethod):
    """:func:`feature_l2_loss` on the connected student feature. Pairs: the mean (the loss stays in [0, 4])."""

    default_weight, paper = 1.0, "kdray"
    notes = "squared L2 between L2-normalised feature maps"

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return feature_l2_loss(s, t)


def ab_loss(student: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """Activation boundaries, Heo et al. 2019 (arXiv:1811.03233), on pre-activations, margin m. Per element::

        (s + m)^2  where s > -m and t <= 0;   (s - m)^2  where s <= m and t > 0;   else 0

    Reduced by the mean over all elements (so the loss does not grow with the layer size); the original code
    sums and divides by batch size and 1000.

    YAML: ``{method: ab, teacher_layers: ["relu2:input"], student_layers: ["relu2:input"], options: {margin: 1}}``
    """
    t, m = teacher.detach(), margin
    on, off = t > 0, t <= 0
    return ((student + m).pow(2) * (off & (student > -m)) + (student - m).pow(2) * (on & (student <= m))).mean()


@METHODS.register("ab")
class AB(PairMethod):
    """:func:`ab_loss` on the connected student pre-activations (hook ``path:input`` of an activation).

    Pairs: the mean. RepDistiller sums its pairs with weights 2^(i-n+1) (the deepest 1), on its own
    per-element scale and as an initialisation stage; with this normalisation no reference weight carries
    over, so the default 1.0 is to be tuned and the mean keeps it independent of the number of pairs.
    """

    default_weight, paper, url = 1.0, "Heo et al. 2019", "https://arxiv.org/abs/1811.03233"
    notes = "activation boundaries, margin `m`, on pre-activations (hook e.g. `relu2:input`)"

    class Options(Strict):
        margin: float = Field(1.0, gt=0)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return ab_loss(s, t, self.opts.margin)


def attention_map(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Attention transfer, Zagoruyko & Komodakis 2017 (arXiv:1612.03928)::

        a(f) = normalise(flatten(mean_c f^2));   loss = mean_{b, positions} (a(s) - a(t))^2

    on maps of equal spatial size (the caller pools the larger); channel counts may differ.

    YAML: ``{method: at, teacher_layers: [relu2, relu3], student_layers: [relu2, relu3], weight: 1000}``
    """
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


@METHODS.register("at")
class AT(PairMethod):
    """:func:`at_loss`, after pooling the larger spatial map to the smaller; summed over pairs.

    Pairs: the sum, as RepDistiller (``sum(loss_group)`` over its layer pairs) and mdistiller do; their
    weight 1000 is for that sum (with the mean, n pairs would get 1/n of the reference strength).
    """

    default_weight, sum_pairs, ranks, connect = 1000.0, True, (3, 4), False
    paper, url = "Zagoruyko & Komodakis 2017", "https://arxiv.org/abs/1612.03928"
    notes = "attention transfer: normalised channel-mean of f², larger map pooled; summed over pairs"

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return at_loss(s, t)


def fsp_matrix(f1: Tensor, f2: Tensor) -> Tensor:
    """``f1 f2^T / positions`` per example, after pooling the larger map to the smaller: (B, C1, C2)."""
    f1, f2 = pool_to(f1, f2)
    a, b = f1.flatten(2), f2.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(s1: Tensor, s2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """Flow of solution procedure, Yim et al. 2017 (CVPR): ``mean((G(s1, s2) - G(t1, t2))^2)`` with ``G`` the
    :func:`fsp_matrix` of two layers of one model.

    YAML: ``{method: fsp, teacher_layers: [relu1, relu2], student_layers: [relu1, relu2]}``
    """
    return F.mse_loss(fsp_matrix(s1, s2), fsp_matrix(t1.detach(), t2.detach()))


@METHODS.register("fsp")
class FSP(Method):
    """:func:`fsp_loss` between two layers of each model; student layers get 1x1 connectors to the teacher
    layers' channel counts. Default weight 1.0 (not a reference value: the FSP paper uses it as a pre-training
    stage; tune it).

    Pairs: none to reduce: a term takes exactly two layers per model, i.e. one FSP matrix. RepDistiller
    sums the MSEs of several matrices (consecutive stages); list one fsp term per matrix to do the same,
    since the terms of a loss are added.
    """

    kind, reads, layers, default_weight = "feature", frozenset({TEACHER_LAYERS, STUDENT_LAYERS}), "fsp", 1.0
    paper = "Yim et al. 2017"
    url = "https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html"
    notes = "FSP (Gram) matrices between two layers, MSE"

    def __init__(self, term: TermConfig, temperature: float):
        super().__init__(term, temperature)
        self.adapters = nn.ModuleList()
        self.built = False

    def build(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        s = self._layer_shapes("student_layers", self.student_layers, student_shapes)
        t = self._layer_shapes("teacher_layers", self.teacher_layers, teacher_shapes)
        self.adapters = nn.ModuleList([connector(si, ti) for si, ti in zip(s, t)])
        self.built = True

    @staticmethod
    def _layer_shapes(fld: str, paths: list[str], shapes: dict[str, torch.Size]) -> list[torch.Size]:
        out = [shape_of(shapes, p, fld) for p in paths]
        for p, shape in zip(paths, out):
            if len(shape) not in (3, 4):
                raise ConfigError(fld, p, "a layer whose output has channels and positions (B, C, L) or "
                                          f"(B, C, H, W); {p} has shape {fmt_shape(shape)}")
        if len(out[0]) != len(out[1]):
            raise ConfigError(fld, paths[1], f"a layer with the same kind of output as {paths[0]} "
                                             f"{fmt_shape(out[0])}; {paths[1]} has shape {fmt_shape(out[1])}")
        return out

    def forward(self, sig: Signals) -> Tensor:
        if not self.built:
            raise RuntimeError(f"call build() on the {self.name} term before using it")
        s1, s2 = (a(feature(sig.student_features, p, "student")) for a, p in zip(self.adapters, self.student_layers))
        t1, t2 = (feature(sig.teacher_features, p, "teacher") for p in self.teacher_layers)
        return fsp_loss(s1, s2, t1, t2)
