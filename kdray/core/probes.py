"""Probe-KD probes: lightweight classifiers fitted on frozen teacher hidden states.

A probe pools a layer's output to one vector per example (:func:`pool`), standardises it, and applies
a multinomial logistic regression with an L2 penalty fitted by full-batch L-BFGS on the labelled
training examples. Its temperature-softened predictions then supervise the student (the
``probe_kd`` method), in place of or beside the teacher's own logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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

    def __init__(self, dim: int, num_classes: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        z = pool(feature, self.pooling).float()
        return self.linear((z - self.mean) / self.std)


@dataclass(frozen=True, order=True)
class ProbeSpec:
    """One probe: the teacher layer, how its output is pooled, and the fit's settings."""

    layer: str
    pooling: str
    l2: float
    max_iter: int

    @property
    def column(self) -> str:  # its name in the teacher cache
        return f"probe/{self.layer}/{self.pooling}/{self.l2:g}/{self.max_iter}"


@dataclass
class ProbeReport:
    layer: str
    pooling: str
    dim: int
    train_acc: float
    val_acc: float


def fit_probe(train_feats: torch.Tensor, train_y: torch.Tensor, num_classes: int, pooling: str = "mean",
              l2: float = 1e-3, max_iter: int = 100) -> Probe:
    """Fit a multinomial logistic regression (mean cross-entropy + l2/2 * ||W||^2) with L-BFGS."""
    z = pool(train_feats, pooling).float()
    probe = Probe(z.shape[1], num_classes, pooling).to(z.device)
    probe.mean.copy_(z.mean(0))
    probe.std.copy_(z.std(0).clamp_min(1e-6) if len(z) > 1 else torch.ones_like(z[0]))
    zs = (z - probe.mean) / probe.std
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe.linear(zs), train_y) + 0.5 * l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe.requires_grad_(False)
    return probe


@torch.no_grad()
def accuracy(probe: Probe, feats: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return (probe(feats).argmax(1) == y).float().mean().item()
