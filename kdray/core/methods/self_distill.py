"""Self-distillation: the student learns from itself (no teacher)."""
from __future__ import annotations

from torch import Tensor, nn

from kdray.core.methods.base import (LOGITS, METHODS, STUDENT_LAYERS, Method, Signals, feature, kd_loss, labelled_ce,
                                     shape_of)


def self_aux_loss(head_logits: list[Tensor], final_logits: Tensor, labels: Tensor | None, temperature: float
                  ) -> Tensor:
    """Deep self-distillation, Zhang et al. 2019, "Be Your Own Teacher" (arXiv:1905.08094)::

        mean_heads ( CE(head, labels on labelled rows) + kd_loss(head, final.detach(), T) )

    YAML: ``{method: self_aux, student_layers: [relu1, relu2], temperature: 3}``
    """
    final = final_logits.detach()
    total = sum(labelled_ce(z, labels) + kd_loss(z, final, temperature) for z in head_logits)
    return total / len(head_logits)


@METHODS.register("self_aux")
class SelfAux(Method):
    """:func:`self_aux_loss` with an auxiliary classifier head (mean over positions, then a linear layer) on each
    of ``student_layers``. The heads are adapters: trained with the student, never saved with it."""

    kind, reads, layers, default_weight, uses_temperature = "self", frozenset({STUDENT_LAYERS}), "student", 1.0, True
    paper, url = "Zhang et al. 2019", "https://arxiv.org/abs/1905.08094"
    notes = ("deep self-distillation: an auxiliary head per student layer learns from labels and the network's own "
             "final output; needs no teacher")

    def build(self, student_shapes, teacher_shapes) -> None:
        num_classes = shape_of(student_shapes, LOGITS, "student")[-1]
        self.heads = nn.ModuleList([nn.Linear(shape_of(student_shapes, p, "student_layers")[1], num_classes)
                                    for p in self.student_layers])

    def forward(self, sig: Signals) -> Tensor:
        logits = []
        for head, p in zip(self.heads, self.student_layers):
            f = feature(sig.student_features, p, "student")
            logits.append(head(f.flatten(2).mean(2) if f.dim() > 2 else f))
        return self_aux_loss(logits, sig.student_logits, sig.labels, self.temperature)
