"""Distillation terms: the losses that make a student imitate a teacher.

Each method is a small :class:`torch.nn.Module` registered in :data:`METHODS` under its config name
(``distill.terms[i].method``), beside a pure loss function (``kd_loss``, ``dkd_loss``, ``at_loss`` ...) that
can be called and tested alone. A training step hands every term the same :class:`Signals` (logits, captured
layer outputs, probe logits, labels) and gets back one *unweighted* scalar loss; the caller multiplies it by
the term's weight (``term.weight``, or the method's reference ``default_weight``).

Life cycle of a term (see :func:`build_terms`):

1. ``cls.validate_term(term)`` checks the options and the number of layers (at config-load time);
2. ``cls(term, temperature)`` parses the options;
3. ``method.build(student_shapes, teacher_shapes)`` is called once with the shapes of the captured
   layer outputs of one batch, before the optimizer exists; it checks that the method can use those
   layers and creates the trainable adapters (connectors), which are submodules of the method;
4. ``method(signals)`` returns the loss of a batch.

Every term applies to all examples of a batch, labelled or not (distillation uses the unlabelled
transfer set). Teacher tensors are detached inside the losses, so no gradient ever reaches them.

Adding a method: subclass :class:`Method` (or :class:`PairMethod`), set its traits, write ``forward`` (calling
a pure loss), and register it with ``@METHODS.register("name")`` in any module imported before the config
is read. Families: :mod:`.response`, :mod:`.feature`, :mod:`.relation`, :mod:`.self_distill`.
"""
from kdray.core.methods.base import (LOGITS, METHODS, PROBES, STUDENT_LAYERS, TEACHER_LAYERS, TEACHER_LOGITS, Method,
                                     MethodRegistry, Signals, build_terms, describe_methods, kd_loss, kl_rows,
                                     labelled_ce)
from kdray.core.methods.feature import (AB, AT, FSP, FeatureL2, FitNet, ab_loss, at_loss, feature_l2_loss, fitnet_loss,
                                        fsp_loss)
from kdray.core.methods.pairs import PairMethod
from kdray.core.methods.relation import PKT, RKD, SP, RelationalMethod, angles, pkt_loss, rkd_loss, sp_loss
from kdray.core.methods.response import DKD, KD, ProbeKD, dkd_loss
from kdray.core.methods.self_distill import SelfAux, self_aux_loss

_angles = angles  # the name tests and notes used before the split

__all__ = ["AB", "AT", "DKD", "FSP", "KD", "LOGITS", "METHODS", "PKT", "PROBES", "RKD", "SP", "STUDENT_LAYERS",
           "TEACHER_LAYERS", "TEACHER_LOGITS", "FeatureL2", "FitNet", "Method", "MethodRegistry", "PairMethod",
           "ProbeKD", "RelationalMethod", "SelfAux", "Signals", "ab_loss", "angles", "at_loss", "build_terms",
           "describe_methods", "dkd_loss", "feature_l2_loss", "fitnet_loss", "fsp_loss", "kd_loss", "kl_rows",
           "labelled_ce", "pkt_loss", "rkd_loss", "self_aux_loss", "sp_loss"]
