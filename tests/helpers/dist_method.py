"""A distillation method defined outside kdray, for the extension test: DIST (Huang et al. 2022, "Knowledge
Distillation from A Stronger Teacher", arXiv:2205.10536), registered through the public registry when this
module is imported. Nothing in kdray names it.

A Ray worker imports it through ``runtime_env={"worker_process_setup_hook": "helpers.dist_method.setup"}`` with
this folder on the workers' ``PYTHONPATH`` (see tests/test_extension.py)."""
from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdray.config import Strict
from kdray.core.methods import METHODS, TEACHER_LOGITS, Method, Signals


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N,)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0) -> Tensor:
    """DIST: with ``p = softmax(z / T)`` of student and teacher (B, C)::

        T^2 * ( beta * (1 - mean_b pearson(p_s[b], p_t[b]))        # inter-class: each example's class scores
              + gamma * (1 - mean_c pearson(p_s[:, c], p_t[:, c])) ) # intra-class: each class over the batch

    as the official code (``DIST.forward``: ``tau**2`` times both relations); paper defaults beta = gamma = 1,
    T = 1 (ImageNet) or 4 (CIFAR-100).

    YAML: ``{method: dist, temperature: 4, options: {beta: 1, gamma: 1}}``
    """
    T = float(temperature)
    p_s, p_t = (student_logits / T).softmax(1), (teacher_logits.detach() / T).softmax(1)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.t(), p_t.t()).mean()
    return T * T * (beta * inter + gamma * intra)


class DIST(Method):
    """DIST (:func:`dist_loss`) on the teacher's logits."""

    kind, reads, default_weight, uses_temperature = "response", frozenset({TEACHER_LOGITS}), 1.0, True
    paper, url = "Huang et al. 2022", "https://arxiv.org/abs/2205.10536"
    notes = "Pearson correlation of softened probabilities: inter-class (per example) and intra-class (per class)"

    class Options(Strict):
        beta: float = Field(1.0, ge=0)  # weight of the inter-class relation
        gamma: float = Field(1.0, ge=0)  # weight of the intra-class relation

    def forward(self, sig: Signals) -> Tensor:
        if sig.teacher_logits is None:
            raise ValueError("the dist term needs teacher logits")
        return dist_loss(sig.student_logits, sig.teacher_logits, self.temperature, self.opts.beta, self.opts.gamma)


def setup() -> None:
    """Register DIST once in this process (the module may be imported under two names: ``helpers.dist_method``
    by pytest, ``tests.helpers.dist_method`` elsewhere)."""
    if "dist" not in METHODS:
        METHODS.register("dist")(DIST)


setup()
