"""The base of every distillation term: :class:`Method` with its traits, the :data:`METHODS` registry, the
:class:`Signals` a training step gives the terms, and the pure losses several methods share
(:func:`kd_loss`, :func:`labelled_ce`).

A method *describes itself* on the class: what it reads (``reads``: teacher logits, teacher layers, probes,
student layers), its ``kind`` (response, feature, relation, self), its ``paper`` and ``url``, its reference
``default_weight``, whether it ``uses_temperature``, and a one-line ``notes`` for the methods table. Its name
is the one it is registered under (``METHODS.register("kd")`` sets ``KD.name``). Code outside the methods asks
these traits (``m.uses_teacher_logits``, ``m.uses_probes``), never a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from kdray.config import Strict, TermConfig, config_error_from
from kdray.errors import ConfigError
from kdray.plugins import Registry

# what a method reads (``Method.reads``)
TEACHER_LOGITS, TEACHER_LAYERS, PROBES, STUDENT_LAYERS = "teacher logits", "teacher layers", "probes", "student layers"
TEACHER_SIGNALS = frozenset({TEACHER_LOGITS, TEACHER_LAYERS, PROBES})
Kind = Literal["response", "feature", "relation", "self"]
LayerArity = Literal["none", "teacher", "pairs", "fsp", "student"]
LOGITS = "<logits>"  # key of the student's output shape among the student shapes given to Method.build


class MethodRegistry(Registry["type[Method]"]):
    """The method registry: registering a class under a name also sets its ``name`` to that name."""

    def register(self, name: str) -> Callable[[type["Method"]], type["Method"]]:
        add = super().register(name)

        def deco(cls: type["Method"]) -> type["Method"]:
            add(cls)  # refuses a name taken before the class is touched
            cls.name = name
            return cls

        return deco

    def classes(self) -> list[type["Method"]]:
        """Every registered method class, by name."""
        return [self.get(n) for n in self.names()]


METHODS = MethodRegistry("method")


@dataclass
class Signals:
    """What one training step gives the terms (all for the same batch of B examples)."""

    student_logits: Tensor  # (B, C)
    teacher_logits: Optional[Tensor] = None  # (B, C)
    student_features: dict[str, Tensor] = field(default_factory=dict)  # layer ("path" or "path:input") -> tensor
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    probe_logits: dict[str, Tensor] = field(default_factory=dict)  # teacher layer -> probe logits (B, C)
    labels: Optional[Tensor] = None  # (B,) long, -1 for unlabelled; None: all unlabelled


# --------------------------------------------------------------------------------------------------
# pure losses shared by several methods


def kl_rows(target_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-row KL(softmax(target_logits) || softmax(logits)), summed over the last dimension."""
    lt, ls = F.log_softmax(target_logits, dim=-1), F.log_softmax(logits, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531)::

        T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))

    The gradient flows into ``student_logits`` only (the targets are detached). The one KD formula of kdray:
    ``kd`` (teacher logits), ``probe_kd`` (probe logits), ``self_aux`` (the network's own final output) and the
    online scheme's mutual-learning step (the student's logits as the teacher's targets) all call it.

    YAML: ``distill: {temperature: 4, terms: [{method: kd, weight: 0.9}]}``
    """
    T = float(temperature)
    return kl_rows(teacher_logits.detach() / T, student_logits / T).mean() * T * T


def labelled_ce(logits: Tensor, labels: Optional[Tensor]) -> Tensor:
    """Cross-entropy on the labelled rows (``labels >= 0``), batch mean; a zero joined to the graph when no
    row is labelled (so the loss still backpropagates, with zero gradients)."""
    if labels is None or not bool((labelled := labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], labels[labelled])


# --------------------------------------------------------------------------------------------------
# helpers of the term modules


def need(x: Optional[Tensor], what: str, method: str) -> Tensor:
    if x is None:
        raise ValueError(f"the {method} term needs {what}, but the training step gave none")
    return x


def feature(features: dict[str, Tensor], path: str, side: str) -> Tensor:
    try:
        return features[path]
    except KeyError:
        raise KeyError(f"no captured {side} output for layer {path!r}; captured: {sorted(features)}") from None


def shape_of(shapes: dict[str, torch.Size], path: str, fld: str) -> torch.Size:
    if path not in shapes:
        raise ConfigError(fld, path, "a layer whose output was captured; captured: " + ", ".join(sorted(shapes)))
    return torch.Size(shapes[path])


def fmt_shape(shape: torch.Size | tuple) -> str:
    """``(B, 25, 40)`` for a shape whose first dimension is the batch."""
    return "(" + ", ".join(["B", *map(str, tuple(shape)[1:])]) + ")"


# --------------------------------------------------------------------------------------------------
# the base class

_LAYER_RULES: dict[str, Callable[[str, list[str], list[str]], None]] = {}


def _layer_rule(arity: str):
    def deco(fn):
        _LAYER_RULES[arity] = fn
        return fn
    return deco


@_layer_rule("none")
def _no_layers(name: str, t: list[str], s: list[str]) -> None:
    if t:
        raise ConfigError("teacher_layers", t, f"no layers: {name} uses the logits only")
    if s:
        raise ConfigError("student_layers", s, f"no layers: {name} uses the logits only")


@_layer_rule("teacher")
def _one_teacher_layer(name: str, t: list[str], s: list[str]) -> None:
    if len(t) != 1:
        raise ConfigError("teacher_layers", t, f"exactly one teacher layer (the probed layer of {name})")
    if s:
        raise ConfigError("student_layers", s, f"no student layers: {name} uses the student's logits")


@_layer_rule("pairs")
def _layer_pairs(name: str, t: list[str], s: list[str]) -> None:
    if not t:
        raise ConfigError("teacher_layers", t, "one or more teacher layers, paired by position with student_layers")
    if len(s) != len(t):
        raise ConfigError("student_layers", s, f"{len(t)} student layer(s), one per teacher layer")


@_layer_rule("student")
def _student_layers(name: str, t: list[str], s: list[str]) -> None:
    if t:
        raise ConfigError("teacher_layers", t, f"no teacher layers: {name} distils the student into itself")
    if not s:
        raise ConfigError("student_layers", s, f"one or more student layers to attach {name} heads to")


@_layer_rule("fsp")
def _two_and_two(name: str, t: list[str], s: list[str]) -> None:
    for fld, given, side in (("teacher_layers", t, "teacher"), ("student_layers", s, "student")):
        if len(given) != 2:
            raise ConfigError(fld, given, f"exactly two {side} layers (FSP relates two layers)")


class Method(nn.Module):
    """Base of all distillation terms; subclasses set the traits and ``forward`` (which calls a pure loss).

    Derived traits (set for every subclass from ``reads``): ``uses_teacher_logits``, ``uses_probes``,
    ``needs_teacher`` (reads anything of a teacher); ``position_aligned`` (compares teacher and student features
    position by position, so both must read the same inputs: by default every ``feature`` method).
    """

    name: ClassVar[str] = ""  # set by METHODS.register
    kind: ClassVar[Kind] = "response"
    reads: ClassVar[frozenset[str]] = frozenset({TEACHER_LOGITS})
    layers: ClassVar[LayerArity] = "none"  # how many layers the term takes (validate_term)
    default_weight: ClassVar[float] = 1.0  # the reference weight
    uses_temperature: ClassVar[bool] = False
    paper: ClassVar[str] = ""  # short citation
    url: ClassVar[str] = ""  # arXiv or paper URL
    notes: ClassVar[str] = ""  # one line for the methods table
    uses_teacher_logits: ClassVar[bool] = True
    uses_probes: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    position_aligned: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "position_aligned" not in cls.__dict__:
            cls.position_aligned = cls.kind == "feature"
        cls.uses_teacher_logits = TEACHER_LOGITS in cls.reads
        cls.uses_probes = PROBES in cls.reads
        cls.needs_teacher = bool(cls.reads & TEACHER_SIGNALS)

    class Options(Strict):
        """Method-specific options (``terms[i].options``); none by default."""

    @classmethod
    def parse_options(cls, term: TermConfig) -> Strict:
        try:
            return cls.Options.model_validate(term.options)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "extra_forbidden":  # list this method's keys, not the config's
                known = ", ".join(cls.Options.model_fields) or "none"
                raise ConfigError(f"options.{err['loc'][0]}", err.get("input"),
                                  f"an option of {cls.name}; known options: {known}") from None
            raise config_error_from(e, prefix=("options",)) from None

    @classmethod
    def validate_term(cls, term: TermConfig) -> None:
        """Check ``term`` against this method; raise ConfigError with a field relative to the term."""
        cls.parse_options(term)
        if term.temperature is not None and not cls.uses_temperature:
            raise ConfigError("temperature", term.temperature, f"unset: {cls.name} does not use a temperature")
        _LAYER_RULES[cls.layers](cls.name, list(term.teacher_layers), list(term.student_layers))

    def __init__(self, term: TermConfig, temperature: float):
        super().__init__()
        self.opts = self.parse_options(term)
        self.teacher_layers: list[str] = list(term.teacher_layers)
        self.student_layers: list[str] = list(term.student_layers)
        self.temperature: float = float(term.temperature if term.temperature is not None else temperature)

    def build(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Check the layers' output shapes (with batch dim) and create adapters; nothing by default."""

    def forward(self, sig: Signals) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def build_terms(terms: list[TermConfig], default_temperature: float) -> list[tuple[TermConfig, float, Method]]:
    """(term, weight, method) for each term; weight is ``term.weight`` or the method's default."""
    out = []
    for term in terms:
        cls = METHODS.get(term.method)
        cls.validate_term(term)
        weight = cls.default_weight if term.weight is None else float(term.weight)
        out.append((term, weight, cls(term, default_temperature)))
    return out


def describe_methods() -> list[dict]:
    """The metadata of every registered method, one dict per method, by kind then name (what ``kdray methods``
    prints)."""
    layers = {"none": "—", "teacher": "1 teacher layer", "pairs": "pairs", "fsp": "2 + 2",
              "student": "student layers"}
    kinds, reads = ["response", "feature", "relation", "self"], [TEACHER_LOGITS, PROBES, TEACHER_LAYERS, STUDENT_LAYERS]
    classes = sorted(METHODS.classes(), key=lambda c: (kinds.index(c.kind) if c.kind in kinds else len(kinds), c.name))
    return [{"method": c.name, "kind": c.kind, "reads": ", ".join(r for r in reads if r in c.reads),
             "layers": layers[c.layers], "weight": c.default_weight, "temperature": c.uses_temperature,
             "paper": c.paper, "url": c.url, "notes": c.notes} for c in classes]
