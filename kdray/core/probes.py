"""Probe-KD probes: lightweight classifiers fitted on frozen teacher hidden states.

A probe pools a layer's output to one vector per example (:func:`pool`, over the real tokens of a token
sequence), standardises it, and applies a multinomial logistic regression with an L2 penalty fitted on the
labelled training examples (:mod:`kdray.core.probe_fit`); the penalty is a number, or ``"auto"``: chosen per layer
by cross-validation on those examples. Its temperature-softened predictions then supervise the student (the
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

POOLINGS = ("auto", "mean", "max", "flatten", "first", "seq_mean", "last")
TOKEN_POOLINGS = ("seq_mean", "mean", "max", "first", "last")  # what each does to a token sequence: see pool_tokens


def is_token_output(x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether ``x`` is a (B, T, D) token sequence whose real tokens ``mask`` (B, T) marks."""
    return mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape)


def pool(x: torch.Tensor, how: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, ...) -> (B, D).

    A token sequence (B, T, D) with the mask (B, T) of its real tokens, in the layout the model computed it in
    (right padding for encoders, left for kdray's decoders: see :mod:`kdray.core.hooks`), is pooled over its real
    tokens only (:func:`pool_tokens`), so a sequence pools the same whatever the padding's length, side and batch.
    ``auto`` is the masked mean there (a decoder's probes resolve ``auto`` to ``last`` up-front:
    :func:`kdray.core.blocks.resolve_pooling`).

    Feature maps are (B, C, L) or (B, C, H, W): ``mean``/``max`` (and ``auto``) pool over the positions
    (dims >= 2). Token sequences without a mask (a model kdray does not know the padding of) are read as they
    come: ``first`` takes position 0, ``seq_mean`` averages over positions, ``last`` takes position -1.
    ``flatten`` keeps everything. (B, D) vectors pass through unchanged."""
    if x.dim() == 2:
        return x
    if how not in POOLINGS:
        raise ValueError(f"pooling {how!r}; allowed: {', '.join(POOLINGS)}")
    if how == "flatten":
        return x.flatten(1)
    if is_token_output(x, mask):
        return pool_tokens(x, "seq_mean" if how == "auto" else how, mask)
    if how == "first":
        return x[:, 0].flatten(1)
    if how == "last":
        return x[:, -1].flatten(1)
    if how in ("mean", "auto"):
        return x.flatten(2).mean(dim=2)
    if how == "max":
        return x.flatten(2).amax(dim=2)
    return x.mean(dim=1).flatten(1)  # seq_mean


def pool_tokens(x: torch.Tensor, how: str, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) over the real tokens (``mask`` True): ``seq_mean``/``mean`` their mean, ``max`` their maximum,
    ``first``/``last`` the first/last real token (wherever the padding is). A row without real tokens pools to 0."""
    m = mask.to(x.device, torch.bool)
    if how in ("seq_mean", "mean"):
        w = m.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1).clamp_min(1)
    if how == "max":
        out = x.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
        return torch.where(m.any(1, keepdim=True), out, torch.zeros_like(out))
    if how == "first":
        idx = m.to(torch.int8).argmax(1)
    elif how == "last":
        idx = x.shape[1] - 1 - m.flip(1).to(torch.int8).argmax(1)
    else:
        raise ValueError(f"pooling {how!r} of a token sequence; allowed: {', '.join(TOKEN_POOLINGS)}, flatten")
    return x[torch.arange(len(x), device=x.device), idx]


class Probe(nn.Module):
    """Standardise, then a linear layer; fitted by :func:`fit_probe`."""

    l2: Optional[float] = None  # the L2 strength it was fitted with (set by fit_probe)

    def __init__(self, dim: int, num_classes: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feature: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = pool(feature, self.pooling, mask).float()
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
