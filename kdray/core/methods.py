"""Distillation terms: the losses that make a student imitate a teacher.

Each method is a small :class:`torch.nn.Module` registered in :data:`METHODS` under its config name
(``distill.terms[i].method``). A training step hands every term the same :class:`Signals` (logits,
captured layer outputs, probe logits, labels) and gets back one *unweighted* scalar loss; the caller
multiplies it by the term's weight (``term.weight``, or the method's reference ``default_weight``).

Life cycle of a term (see :func:`build_terms`):

1. ``cls.validate_term(term)`` checks the options and the number of layers (at config-load time);
2. ``cls(term, temperature)`` parses the options;
3. ``method.build(student_shapes, teacher_shapes)`` is called once with the shapes of the captured
   layer outputs of one batch, before the optimizer exists; it checks that the method can use those
   layers and creates the trainable adapters (connectors), which are submodules of the method;
4. ``method(signals)`` returns the loss of a batch.

Every term applies to all examples of a batch, labelled or not (distillation uses the unlabelled
transfer set). Teacher tensors are detached inside the methods, so no gradient ever reaches them.

Plain PyTorch only. Formulas and reference weights: RepDistiller / mdistiller, see the reference notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn

from kdray.config import Strict, TermConfig, config_error_from
from kdray.errors import ConfigError
from kdray.plugins import Registry

METHODS: Registry[type["Method"]] = Registry("method")


@dataclass
class Signals:
    """What one training step gives the terms (all for the same batch of B examples)."""

    student_logits: Tensor  # (B, C)
    teacher_logits: Optional[Tensor] = None  # (B, C)
    student_features: dict[str, Tensor] = field(default_factory=dict)  # module path -> its output
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    probe_logits: dict[str, Tensor] = field(default_factory=dict)  # teacher layer -> probe logits (B, C)
    labels: Optional[Tensor] = None  # (B,) long, -1 for unlabelled; None: all unlabelled


# --------------------------------------------------------------------------------------------------
# shared helpers

_RANK_TEXT = {2: "(B, D)", 3: "(B, C, L)", 4: "(B, C, H, W)"}


def _fmt(shape: torch.Size | tuple) -> str:
    """``(B, 25, 40)`` for a shape whose first dimension is the batch."""
    return "(" + ", ".join(["B", *map(str, tuple(shape)[1:])]) + ")"


def _ranks_text(ranks: tuple[int, ...]) -> str:
    names = [_RANK_TEXT[r] for r in ranks]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _connector(in_shape: torch.Size | tuple, out_shape: torch.Size | tuple) -> nn.Module:
    """A trainable map from ``in_shape``'s channels to ``out_shape``'s (identity when they agree).

    ``nn.Linear`` for (B, D), a 1x1 ``nn.Conv1d`` for (B, C, L), a 1x1 ``nn.Conv2d`` for (B, C, H, W).
    Spatial sizes are not touched (see :func:`_pool_to`).
    """
    c_in, c_out = in_shape[1], out_shape[1]
    if c_in == c_out:
        return nn.Identity()
    rank = len(in_shape)
    if rank == 2:
        return nn.Linear(c_in, c_out)
    if rank == 3:
        return nn.Conv1d(c_in, c_out, kernel_size=1)
    if rank == 4:
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    raise ValueError(f"no connector for outputs of shape {_fmt(in_shape)}")


def _pool_to(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger so both have the smaller spatial size.

    Works per spatial dimension; (B, D) tensors and equal sizes are returned unchanged.
    """
    if a.dim() < 3 or a.shape[2:] == b.shape[2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))
    pool = F.adaptive_avg_pool1d if a.dim() == 3 else F.adaptive_avg_pool2d
    a = a if tuple(a.shape[2:]) == size else pool(a, size)
    b = b if tuple(b.shape[2:]) == size else pool(b, size)
    return a, b


def _kl_rows(target_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-row KL(softmax(target_logits) || softmax(logits)), summed over the last dimension."""
    lt, ls = F.log_softmax(target_logits, dim=-1), F.log_softmax(logits, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _need(x: Optional[Tensor], what: str, method: str) -> Tensor:
    if x is None:
        raise ValueError(f"the {method} term needs {what}, but the training step gave none")
    return x


def _feature(features: dict[str, Tensor], path: str, side: str) -> Tensor:
    try:
        return features[path]
    except KeyError:
        raise KeyError(f"no captured {side} output for layer {path!r}; "
                       f"captured: {sorted(features)}") from None


LOGITS = "<logits>"  # key of the student's output shape among the student shapes given to Method.build


def _shape(shapes: dict[str, torch.Size], path: str, fld: str) -> torch.Size:
    if path not in shapes:
        raise ConfigError(fld, path, "a layer whose output was captured; captured: "
                          + ", ".join(sorted(shapes)))
    return torch.Size(shapes[path])


# --------------------------------------------------------------------------------------------------
# the base class


class Method(nn.Module):
    """Base of all distillation terms; subclasses set the class attributes and ``forward``."""

    name: ClassVar[str]
    default_weight: ClassVar[float]
    layers: ClassVar[Literal["none", "teacher", "pairs", "fsp", "student"]] = "none"
    needs_teacher: ClassVar[bool] = True
    uses_temperature: ClassVar[bool] = False
    # True: the term matches the student's logits to the teacher's at ``temperature`` (kd, dkd); the
    # online scheme's teacher step learns from the student at the temperature of such a term
    distils_logits: ClassVar[bool] = False

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
            raise ConfigError("temperature", term.temperature,
                              f"unset: {cls.name} does not use a temperature")
        t, s = term.teacher_layers, term.student_layers
        if cls.layers == "none":
            if t:
                raise ConfigError("teacher_layers", t, f"no layers: {cls.name} uses the logits only")
            if s:
                raise ConfigError("student_layers", s, f"no layers: {cls.name} uses the logits only")
        elif cls.layers == "teacher":
            if len(t) != 1:
                raise ConfigError("teacher_layers", t,
                                  f"exactly one teacher layer (the probed layer of {cls.name})")
            if s:
                raise ConfigError("student_layers", s,
                                  f"no student layers: {cls.name} uses the student's logits")
        elif cls.layers == "pairs":
            if not t:
                raise ConfigError("teacher_layers", t, "one or more teacher layers, paired by position "
                                                       "with student_layers")
            if len(s) != len(t):
                raise ConfigError("student_layers", s, f"{len(t)} student layer(s), one per teacher layer")
        elif cls.layers == "student":
            if t:
                raise ConfigError("teacher_layers", t, f"no teacher layers: {cls.name} distils the student into itself")
            if not s:
                raise ConfigError("student_layers", s, f"one or more student layers to attach {cls.name} heads to")
        elif cls.layers == "fsp":
            for fld, given, side in (("teacher_layers", t, "teacher"), ("student_layers", s, "student")):
                if len(given) != 2:
                    raise ConfigError(fld, given, f"exactly two {side} layers (FSP relates two layers)")

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


# --------------------------------------------------------------------------------------------------
# logit methods


@METHODS.register("kd")
class KD(Method):
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, times T^2."""

    name, default_weight, uses_temperature, distils_logits = "kd", 0.9, True, True

    def forward(self, sig: Signals) -> Tensor:
        T = self.temperature
        t = _need(sig.teacher_logits, "teacher logits", self.name).detach()
        return _kl_rows(t / T, sig.student_logits / T).mean() * T**2


@METHODS.register("self_aux")
class SelfAux(Method):
    """Deep self-distillation ("Be Your Own Teacher", Zhang et al. 2019): an auxiliary classifier head
    (mean over positions, then a linear layer) on each of ``student_layers`` learns from the labels (hard
    cross-entropy on labelled examples) and from the network's own final output (KD with temperature T on
    every example, the final logits detached). The heads are adapters: trained with the student, never saved
    with it. Needs no teacher. Loss: mean over heads of (CE + T^2 KL)."""

    name, default_weight, uses_temperature, layers, needs_teacher = "self_aux", 1.0, True, "student", False

    def build(self, student_shapes, teacher_shapes) -> None:
        num_classes = _shape(student_shapes, LOGITS, "student")[-1]
        self.heads = nn.ModuleList([nn.Linear(_shape(student_shapes, p, "student_layers")[1], num_classes)
                                    for p in self.student_layers])

    def forward(self, sig: Signals) -> Tensor:
        T = self.temperature
        final = sig.student_logits.detach()
        labelled = sig.labels >= 0 if sig.labels is not None else None
        total = sig.student_logits.new_zeros(())
        for head, p in zip(self.heads, self.student_layers):
            f = _feature(sig.student_features, p, "student")
            logits = head(f.flatten(2).mean(2) if f.dim() > 2 else f)
            ce = F.cross_entropy(logits[labelled], sig.labels[labelled]) if labelled is not None and labelled.any() \
                else logits.sum() * 0.0
            total = total + ce + _kl_rows(final / T, logits / T).mean() * T**2
        return total / len(self.heads)


@METHODS.register("probe_kd")
class ProbeKD(Method):
    """Probe-KD: KD whose soft targets are the logits of a probe fitted on one teacher layer.

    The options describe how the caller fits the probe (feature pooling, L2 penalty, iterations);
    the loss itself is :class:`KD` with ``sig.probe_logits[teacher_layers[0]]`` as the targets.
    """

    name, default_weight, layers, uses_temperature = "probe_kd", 0.9, "teacher", True

    class Options(Strict):
        pooling: Literal["mean", "max", "flatten", "first", "seq_mean"] = "mean"  # how the layer output becomes a vector
        l2: float = Field(1e-3, gt=0)  # L2 penalty of the (multinomial logistic) probe
        max_iter: int = Field(100, ge=1)  # optimizer iterations when fitting the probe

    def forward(self, sig: Signals) -> Tensor:
        T = self.temperature
        t = _feature(sig.probe_logits, self.teacher_layers[0], "probe").detach()
        return _kl_rows(t / T, sig.student_logits / T).mean() * T**2


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, batch mean, times T^2.

    TCKD is the KL between the binary (target, rest) distributions, NCKD the KL between the
    distributions over the non-target classes. The target is the label where there is one
    (``labels >= 0``) and the teacher's argmax elsewhere. (mdistiller's warm-up is not implemented.)
    """

    name, default_weight, uses_temperature, distils_logits = "dkd", 1.0, True, True

    class Options(Strict):
        alpha: float = Field(1.0, ge=0)  # weight of TCKD
        beta: float = Field(8.0, ge=0)  # weight of NCKD (2-6 on some teacher/student pairs)

    def forward(self, sig: Signals) -> Tensor:
        T = self.temperature
        t = _need(sig.teacher_logits, "teacher logits", self.name).detach() / T
        s = sig.student_logits / T
        target = t.argmax(1)
        if sig.labels is not None:
            target = torch.where(sig.labels >= 0, sig.labels, target)
        gt = F.one_hot(target, s.shape[1]).bool()
        B = s.shape[0]
        tckd = _kl_binary(t, gt, s)
        nckd = _kl_rows(t[~gt].view(B, -1), s[~gt].view(B, -1))
        return (self.opts.alpha * tckd + self.opts.beta * nckd).mean() * T**2


def _kl_binary(t: Tensor, gt: Tensor, s: Tensor) -> Tensor:
    """Per-row KL between the (target class, all other classes) probabilities of t and s."""

    def log_binary(x: Tensor) -> Tensor:
        lp = F.log_softmax(x, dim=1)
        return torch.stack([lp[gt], lp.masked_fill(gt, float("-inf")).logsumexp(1)], dim=1)

    lt, ls = log_binary(t), log_binary(s)
    return (lt.exp() * (lt - ls)).sum(1)


# --------------------------------------------------------------------------------------------------
# methods on pairs of layers


class _PairMethod(Method):
    """A loss on (student layer i, teacher layer i) pairs, reduced over the pairs by the mean, or by the
    sum where ``sum_pairs`` is set (each method's docstring says which, and why).

    Class switches: ``ranks`` the output ranks (with batch dim) allowed, None for any; ``pool`` pools
    the larger spatial map to the smaller; ``connect`` maps student channels to teacher channels
    with a trainable connector. Subclasses define ``pair_loss(s, t)``.
    """

    layers = "pairs"
    ranks: ClassVar[Optional[tuple[int, ...]]] = (2, 3, 4)
    pool: ClassVar[bool] = True
    connect: ClassVar[bool] = True
    sum_pairs: ClassVar[bool] = False  # True: sum over pairs instead of the mean

    def __init__(self, term: TermConfig, temperature: float):
        super().__init__(term, temperature)
        self.adapters = nn.ModuleList()
        self.built = False

    def build(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        adapters = []
        for sp, tp in zip(self.student_layers, self.teacher_layers):
            s = _shape(student_shapes, sp, "student_layers")
            t = _shape(teacher_shapes, tp, "teacher_layers")
            self._check_rank("student_layers", sp, s)
            self._check_rank("teacher_layers", tp, t)
            if (self.pool or self.connect) and len(s) != len(t):
                raise ConfigError("student_layers", sp, f"a layer with the same kind of output as teacher "
                                                        f"layer {tp} {_fmt(t)}; {sp} has shape {_fmt(s)}")
            adapters.append(_connector(s, t) if self.connect else nn.Identity())
        self.adapters = nn.ModuleList(adapters)
        self.built = True

    def _check_rank(self, fld: str, path: str, shape: torch.Size) -> None:
        if self.ranks is not None and len(shape) not in self.ranks:
            what = "has channels and positions " if self.ranks == (3, 4) else "is "
            raise ConfigError(fld, path, f"a layer whose output {what}{_ranks_text(self.ranks)}; "
                                         f"{path} has shape {_fmt(shape)}")

    def forward(self, sig: Signals) -> Tensor:
        if not self.built:
            raise RuntimeError(f"call build() on the {self.name} term before using it")
        losses = []
        for adapter, sp, tp in zip(self.adapters, self.student_layers, self.teacher_layers):
            s = _feature(sig.student_features, sp, "student")
            t = _feature(sig.teacher_features, tp, "teacher").detach()
            if self.pool:
                s, t = _pool_to(s, t)
            losses.append(self.pair_loss(adapter(s), t))
        total = torch.stack(losses).sum()
        return total if self.sum_pairs else total / len(losses)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@METHODS.register("fitnet")
class FitNet(_PairMethod):
    """FitNet hints: MSE (mean over elements) between the connected student and the teacher feature.

    Pairs: the mean. RepDistiller and mdistiller hint a single pair (``hint_layer``), where mean and sum
    agree; the mean keeps the reference weight 100 meaning the same strength when several pairs are hinted.
    """

    name, default_weight = "fitnet", 100.0

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return F.mse_loss(s, t)


@METHODS.register("feature_l2")
class FeatureL2(_PairMethod):
    """Squared L2 distance between per-example L2-normalised flattened (connected) student and
    teacher features (between 0 and 4 per example), batch mean.

    Pairs: the mean (a kdray method with no reference implementation: the loss stays in [0, 4]).
    """

    name, default_weight = "feature_l2", 1.0

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        s, t = F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1)
        return (s - t).pow(2).sum(1).mean()


@METHODS.register("ab")
class AB(_PairMethod):
    """Activation boundaries (Heo et al. 2019) on pre-activations, margin m.

    Per element: (s+m)^2 where s > -m and t <= 0; (s-m)^2 where s <= m and t > 0; else 0.
    Reduction: the mean over all elements (= sum / batch size / elements per example), so the loss
    does not grow with the layer size; the original code sums and divides by batch size and 1000.

    Pairs: the mean. RepDistiller sums its pairs with weights 2^(i-n+1) (the deepest 1), on its own
    per-element scale and as an initialisation stage; with this normalisation no reference weight carries
    over, so the default 1.0 is to be tuned and the mean keeps it independent of the number of pairs.
    """

    name, default_weight = "ab", 1.0

    class Options(Strict):
        margin: float = Field(1.0, gt=0)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        m = self.opts.margin
        on, off = t > 0, t <= 0
        loss = (s + m).pow(2) * (off & (s > -m)) + (s - m).pow(2) * (on & (s <= m))
        return loss.mean()


@METHODS.register("at")
class AT(_PairMethod):
    """Attention transfer (Zagoruyko & Komodakis 2017), summed over pairs.

    a = L2-normalise(flatten(mean over channels of f^2)), after pooling the larger spatial map to
    the smaller; loss = mean over batch and positions of (a_s - a_t)^2. Channel counts may differ.

    Pairs: the sum, as RepDistiller (``sum(loss_group)`` over its layer pairs) and mdistiller do; their
    weight 1000 is for that sum (with the mean, n pairs would get 1/n of the reference strength).
    """

    name, default_weight, sum_pairs = "at", 1000.0, True
    ranks, connect = (3, 4), False

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        return (_attention(s) - _attention(t)).pow(2).mean()


def _attention(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


class _Relational(_PairMethod):
    """Relational methods compare relations between the examples of a batch: features of any rank,
    flattened to (B, D), no pooling and no connector."""

    ranks, pool, connect = None, False, False


@METHODS.register("sp")
class SP(_Relational):
    """Similarity preserving (Tung & Mori 2019): G = f f^T with rows L2-normalised;
    ||G_t - G_s||_F^2 / B^2.

    Pairs: the sum, as RepDistiller (``sum(loss_group)``); its weight 3000 is for that sum.
    """

    name, default_weight, sum_pairs = "sp", 3000.0, True

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        B = s.shape[0]
        return (_similarity(t) - _similarity(s)).pow(2).sum() / B**2


def _similarity(f: Tensor) -> Tensor:
    f = f.flatten(1)
    return F.normalize(f @ f.t(), dim=1)


@METHODS.register("rkd")
class RKD(_Relational):
    """Relational KD (Park et al. 2019): ``distance_weight * distance + angle_weight * angle``.

    Distance: pairwise Euclidean distances divided by their mean over the non-diagonal pairs; smooth
    L1 (delta 1) averaged over the B x B matrix. Angle: cosines <e_ij, e_ik> of the unit difference
    vectors e_ij = (f_j - f_i)/|f_j - f_i|; smooth L1 averaged over the B x B x B tensor (degenerate
    entries are 0 for both models, as in RepDistiller). A batch of one example gives 0.

    Pairs: the mean. RepDistiller and mdistiller apply RKD to a single pair (the penultimate embedding),
    where mean and sum agree; the mean keeps the distance and angle weights per-pair strengths.
    """

    name, default_weight = "rkd", 1.0

    class Options(Strict):
        distance_weight: float = Field(25.0, ge=0)
        angle_weight: float = Field(50.0, ge=0)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        s, t = s.flatten(1), t.flatten(1)
        if s.shape[0] < 2:
            return s.sum() * 0.0
        dist = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
        angle = F.smooth_l1_loss(_angles(s), _angles(t))
        return self.opts.distance_weight * dist + self.opts.angle_weight * angle


def _normalised_distances(f: Tensor) -> Tensor:
    sq = f.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * f @ f.t()
    off = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    d = d2.clamp_min(1e-12).sqrt() * off  # clamp: no infinite gradient of sqrt at 0
    return d / d[off].mean().clamp_min(1e-12)


def _angles(f: Tensor) -> Tensor:
    """``[i, j, k] = <e_ij, e_ik>`` with ``e_ij = unit(f_j - f_i)``, 0 where ``j`` or ``k`` is ``i`` (or a
    duplicate of example ``i``), from the (B, B) Gram matrix instead of (B, B, D) difference vectors: with
    ``r_ij = 1 / |f_j - f_i|`` and ``a_ij = G_ij - |f_i|^2 / 2``, ``<e_ij, e_ik> = r_ij r_ik (G_jk - a_ij - a_ik)``.
    Computed in float64 on batch-centred features (angles do not change under translation), so the
    cancellation in the bracket stays small; about 30x faster than the difference vectors at D = 640, B = 100."""
    x = f.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    g = x @ x.t()
    sq = g.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * g  # |f_j - f_i|^2
    distinct = (d2 > 1e-10 * sq.mean().clamp_min(1e-300)) & ~torch.eye(len(x), dtype=torch.bool, device=f.device)
    r = torch.where(distinct, d2, 1.0).rsqrt() * distinct
    a = g - sq[:, None] / 2
    return (r[:, :, None] * r[:, None, :] * (g[None] - a[:, :, None] - a[:, None, :])).to(f.dtype)


@METHODS.register("pkt")
class PKT(_Relational):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018).

    Rows L2-normalised, cosine similarities mapped to [0, 1] by (c + 1) / 2, each row normalised to
    sum 1 (conditional probabilities); loss = mean over all B*B entries of t_ij log((t_ij+eps)/(s_ij+eps))
    (RepDistiller's reduction, which its reference weight 30000 was tuned for).

    Pairs: the mean. RepDistiller applies PKT to a single pair (the penultimate embedding), where mean and
    sum agree; the mean keeps the weight 30000 meaning the same strength for several pairs.
    """

    name, default_weight = "pkt", 30000.0
    eps: ClassVar[float] = 1e-7

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:
        p_s, p_t = self._probabilities(s), self._probabilities(t)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()

    @staticmethod
    def _probabilities(f: Tensor) -> Tensor:
        f = F.normalize(f.flatten(1), dim=1)
        c = (f @ f.t() + 1) / 2
        return c / c.sum(1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# FSP


@METHODS.register("fsp")
class FSP(Method):
    """Flow of solution procedure (Yim et al. 2017) between two layers of each model.

    Within each model the larger map of the two layers is pooled to the smaller spatial size; then
    G = f1 f2^T / positions, a (C1, C2) matrix per example. Student layers get 1x1 connectors to the
    teacher layers' channel counts. Loss: MSE (mean over batch and matrix entries) between the
    student's and the teacher's G. Default weight 1.0 (not a reference value: the FSP paper uses
    it as a pre-training stage; tune it).

    Pairs: none to reduce: a term takes exactly two layers per model, i.e. one FSP matrix. RepDistiller
    sums the MSEs of several matrices (consecutive stages); list one fsp term per matrix to do the same,
    since the terms of a loss are added.
    """

    name, default_weight, layers = "fsp", 1.0, "fsp"

    def __init__(self, term: TermConfig, temperature: float):
        super().__init__(term, temperature)
        self.adapters = nn.ModuleList()
        self.built = False

    def build(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        s = self._layer_shapes("student_layers", self.student_layers, student_shapes)
        t = self._layer_shapes("teacher_layers", self.teacher_layers, teacher_shapes)
        self.adapters = nn.ModuleList([_connector(si, ti) for si, ti in zip(s, t)])
        self.built = True

    @staticmethod
    def _layer_shapes(fld: str, paths: list[str], shapes: dict[str, torch.Size]) -> list[torch.Size]:
        out = [_shape(shapes, p, fld) for p in paths]
        for p, shape in zip(paths, out):
            if len(shape) not in (3, 4):
                raise ConfigError(fld, p, "a layer whose output has channels and positions (B, C, L) or "
                                          f"(B, C, H, W); {p} has shape {_fmt(shape)}")
        if len(out[0]) != len(out[1]):
            raise ConfigError(fld, paths[1], f"a layer with the same kind of output as {paths[0]} "
                                             f"{_fmt(out[0])}; {paths[1]} has shape {_fmt(out[1])}")
        return out

    def forward(self, sig: Signals) -> Tensor:
        if not self.built:
            raise RuntimeError("call build() on the fsp term before using it")
        s1, s2 = (a(_feature(sig.student_features, p, "student"))
                  for a, p in zip(self.adapters, self.student_layers))
        t1, t2 = (_feature(sig.teacher_features, p, "teacher").detach() for p in self.teacher_layers)
        return F.mse_loss(_fsp_matrix(s1, s2), _fsp_matrix(t1, t2))


def _fsp_matrix(f1: Tensor, f2: Tensor) -> Tensor:
    f1, f2 = _pool_to(f1, f2)
    a, b = f1.flatten(2), f2.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


# --------------------------------------------------------------------------------------------------


def build_terms(terms: list[TermConfig],
                default_temperature: float) -> list[tuple[TermConfig, float, Method]]:
    """(term, weight, method) for each term; weight is ``term.weight`` or the method's default."""
    out = []
    for term in terms:
        cls = METHODS.get(term.method)
        cls.validate_term(term)
        weight = cls.default_weight if term.weight is None else float(term.weight)
        out.append((term, weight, cls(term, default_temperature)))
    return out
