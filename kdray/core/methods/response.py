"""Response methods: the student matches soft targets on the classes (teacher logits, or a probe's)."""
from __future__ import annotations

import math
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from kdray.config import Strict
from kdray.core.probes import AUTO, POOLINGS
from kdray.core.methods.base import METHODS, PROBES, TEACHER_LOGITS, Method, Signals, feature, kd_loss, kl_rows, need


@METHODS.register("kd")
class KD(Method):
    """Hinton KD: :func:`~kdray.core.methods.base.kd_loss` on the teacher's logits."""

    kind, reads, default_weight, uses_temperature = "response", frozenset({TEACHER_LOGITS}), 0.9, True
    paper, url = "Hinton et al. 2015", "https://arxiv.org/abs/1503.02531"
    notes = "KL of temperature-softened outputs, ×T², batch mean"

    def forward(self, sig: Signals) -> Tensor:
        return kd_loss(sig.student_logits, need(sig.teacher_logits, "teacher logits", self.name), self.temperature)


@METHODS.register("probe_kd")
class ProbeKD(Method):
    """Probe-KD: :func:`~kdray.core.methods.base.kd_loss` whose soft targets are the logits of a probe fitted
    on one teacher layer (``sig.probe_logits[teacher_layers[0]]``).

    The options describe how the caller fits the probe (feature pooling, L2 penalty, iterations). ``l2: auto``
    (the default) chooses the penalty per layer by stratified cross-validation on the labelled training examples
    (:mod:`kdray.core.probe_fit`); a number fixes it.

    YAML: ``{method: probe_kd, teacher_layers: [relu2], options: {pooling: mean}}``
    """

    kind, reads, layers, default_weight, uses_temperature = "response", frozenset({PROBES}), "teacher", 0.9, True
    paper, url = "kdray (linear probes: Alain & Bengio 2016)", "https://arxiv.org/abs/1610.01644"
    notes = "probe predictions as soft targets; options `pooling`, `l2` (default `auto`: cross-validated), `max_iter`"

    class Options(Strict):
        # how the layer output becomes a vector; auto: a decoder's last real token, an encoder's mean over real
        # tokens, a feature map's spatial mean (kdray.core.blocks.resolve_pooling)
        pooling: Literal[POOLINGS] = "auto"  # type: ignore[valid-type]
        # L2 penalty of the (multinomial logistic) probe: auto (cross-validated) or a number > 0
        l2: Union[Literal[AUTO], float] = AUTO  # type: ignore[valid-type]
        max_iter: int = Field(100, ge=1)  # optimizer iterations when fitting the probe

        @field_validator("l2", mode="before")
        @classmethod
        def _auto_or_positive(cls, v: Any) -> Any:
            if v == AUTO or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
                return v
            raise ValueError(f"{AUTO!r} (chosen by cross-validation) or a finite number > 0")

    def forward(self, sig: Signals) -> Tensor:
        return kd_loss(sig.student_logits, feature(sig.probe_logits, self.teacher_layers[0], "probe"), self.temperature)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """Decoupled KD, Zhao et al. 2022, "Decoupled Knowledge Distillation" (arXiv:2203.08679)::

        T^2 * mean_b (alpha * TCKD_b + beta * NCKD_b)

    TCKD is the KL between the binary (target class, all others) distributions of teacher and student,
    NCKD the KL between their distributions over the non-target classes, all at temperature T.
    Differs from mdistiller: no warm-up of the loss weight.

    YAML: ``{method: dkd, temperature: 4, options: {alpha: 1.0, beta: 8.0}}``
    """
    T = float(temperature)
    t, s = teacher_logits.detach() / T, student_logits / T
    gt = F.one_hot(target, s.shape[1]).bool()
    B = s.shape[0]
    nckd = kl_rows(t[~gt].view(B, -1), s[~gt].view(B, -1))
    return (alpha * _kl_binary(t, gt, s) + beta * nckd).mean() * T * T


def _kl_binary(t: Tensor, gt: Tensor, s: Tensor) -> Tensor:
    """Per-row KL between the (target class, all other classes) probabilities of t and s."""

    def log_binary(x: Tensor) -> Tensor:
        lp = F.log_softmax(x, dim=1)
        return torch.stack([lp[gt], lp.masked_fill(gt, float("-inf")).logsumexp(1)], dim=1)

    lt, ls = log_binary(t), log_binary(s)
    return (lt.exp() * (lt - ls)).sum(1)


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD (:func:`dkd_loss`). The target is the label where there is one (``labels >= 0``) and the
    teacher's argmax elsewhere (the transfer set is unlabelled)."""

    kind, reads, default_weight, uses_temperature = "response", frozenset({TEACHER_LOGITS}), 1.0, True
    paper, url = "Zhao et al. 2022", "https://arxiv.org/abs/2203.08679"
    notes = "Decoupled KD: α·TCKD + β·NCKD (α 1, β 8), ×T²; unlabelled examples use the teacher's argmax"

    class Options(Strict):
        alpha: float = Field(1.0, ge=0)  # weight of TCKD
        beta: float = Field(8.0, ge=0)  # weight of NCKD (2-6 on some teacher/student pairs)

    def forward(self, sig: Signals) -> Tensor:
        t = need(sig.teacher_logits, "teacher logits", self.name)
        target = t.argmax(1)
        if sig.labels is not None:
            target = torch.where(sig.labels >= 0, sig.labels, target)
        return dkd_loss(sig.student_logits, t, target, self.opts.alpha, self.opts.beta, self.temperature)
