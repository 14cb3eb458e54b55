"""Probe-KD probes: lightweight classifiers fitted on frozen teacher hidden states.

A probe pools a layer's output to one vector per example (:func:`pool`), standardises it, and applies
a multinomial logistic regression with an L2 penalty fitted on the labelled training examples
(:mod:`kdray.core.probe_fit`); the penalty is a number, or ``"auto"``: chosen per layer by cross-validation on
those examples. Its temperature-softened predictions then supervise the student (the
``probe_kd`` method), in place of or beside the teacher's own logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import total_ordering
from typing import Optional, Union

import torch
from torch import nn

from kdray.core.probe_fit import AUTO, LinearProbe, fit_linear

log = logging.getLogger("kdray")

POOLINGS = ("mean", "max", "flatten", "first", "seq_mean", "last")


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, ...) -> (B, D).

    Feature maps are (B, C, L) or (B, C, H, W): ``mean``/``max`` pool over the positions (dims >= 2).
    Token sequences are (B, T, D): ``first`` takes token 0 (the [CLS] token), ``seq_mean`` averages
    over tokens, ``last`` takes the last position, which is the last real token of every prompt for a decoder-only
    model (kdray's ``hf_causal_lm`` lays its batches out padded on the left). ``flatten`` keeps everything.
    (B, D) vectors pass through unchanged."""
    if x.dim() == 2:
        return x
    if how == "flatten":
        return x.flatten(1)
    if how == "first":
        return x[:, 0].flatten(1)
    if how == "last":
        return x[:, -1].flatten(1)
    if how == "mean":
        return x.flatten(2).mean(dim=2)
    if how == "max":
        return x.flatten(2).amax(dim=2)
    if how == "seq_mean":
        return x.mean(dim=1).flatten(1)
    raise ValueError(f"pooling {how!r}; allowed: {', '.join(POOLINGS)}")


class Probe(nn.Module):
    """Standardise, then a linear layer; fitted by :func:`fit_probe`."""

    l2: Optional[float] = None  # the L2 strength it was fitted with (set by fit_probe)

    def __init__(self, dim: int, num_classes: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        z = pool(feature, self.pooling).float()
        return self.linear((z - self.mean) / self.std)


def l2_text(l2: Union[float, str]) -> str:
    return l2 if isinstance(l2, str) else f"{l2:g}"


@total_ordering
@dataclass(frozen=True)
class ProbeSpec:
    """One probe: the teacher layer, how its output is pooled, and the fit's settings (``l2``: a number, or
    ``"auto"``: chosen on the labelled training examples)."""

    layer: str
    pooling: str
    l2: Union[float, str]
    max_iter: int

    @property
    def column(self) -> str:  # its name in the teacher cache
        return f"probe/{self.layer}/{self.pooling}/{l2_text(self.l2)}/{self.max_iter}"

    def _key(self) -> tuple:  # "auto" sorts before the numbers
        auto = isinstance(self.l2, str)
        return self.layer, self.pooling, not auto, 0.0 if auto else float(self.l2), self.max_iter

    def __lt__(self, other: "ProbeSpec") -> bool:
        return self._key() < other._key()


@dataclass
class ProbeReport:
    layer: str
    pooling: str
    dim: int
    train_acc: float
    val_acc: float
    l2: Optional[float] = None  # the strength fitted (``l2: auto``: the one chosen); None when not recorded


def describe_l2(fitted: Optional[float], asked: Union[float, str, None] = None) -> str:
    """A probe's strength for people: ``0.0316 (auto)`` when chosen on data, ``0.001`` when fixed, ``-`` unknown."""
    return ("-" if fitted is None else f"{fitted:.3g}") + (" (auto)" if asked == AUTO else "")


def log_probe(report: ProbeReport, asked: Union[float, str]) -> None:
    """One line per fitted probe: its accuracies and its strength."""
    log.info("probe on %s (%s pooling): train acc %.3f, val acc %.3f, l2 %s", report.layer, report.pooling,
             report.train_acc, report.val_acc, describe_l2(report.l2, asked))


def fit_probe(train_feats: torch.Tensor, train_y: torch.Tensor, num_classes: int, pooling: str = "mean",
              l2: Union[float, str] = AUTO, max_iter: int = 100) -> Probe:
    """Fit a multinomial logistic regression (mean cross-entropy + l2/2 * ||W||^2, the intercept not penalised) on
    the pooled features standardised by their mean and standard deviation (:func:`~kdray.core.probe_fit.fit_linear`).
    ``l2="auto"``: the strength cross-validated on these examples; ``probe.l2`` says which."""
    z = pool(train_feats, pooling).float()
    return probe_of(fit_linear([z], train_y, num_classes, [l2], max_iter)[0], pooling)


def probe_of(fit: LinearProbe, pooling: str) -> Probe:
    """The probe module of fitted numbers (frozen)."""
    probe = Probe(fit.weight.shape[1], fit.weight.shape[0], pooling).to(fit.weight.device)
    with torch.no_grad():
        probe.mean.copy_(fit.mean)
        probe.std.copy_(fit.std)
        probe.linear.weight.copy_(fit.weight)
        probe.linear.bias.copy_(fit.bias)
    probe.l2 = fit.l2
    return probe.requires_grad_(False)


@torch.no_grad()
def accuracy(probe: Probe, feats: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return (probe(feats).argmax(1) == y).float().mean().item()
