"""Teacher signals: what the training step gets from the teacher (logits, layer outputs, probe predictions),
computed once (:class:`PrecomputedTeacher`) or live per batch (:class:`LiveTeacher`); teacher ensembles
and the probes fitted on a frozen teacher's layers."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from kdray.core.blocks import resolve_pooling
from kdray.core.hooks import FeatureHooks
from kdray.core.probes import Probe, ProbeReport, ProbeSpec
from kdray.core.probes import accuracy as probe_accuracy
from kdray.core.probes import fit_probe, log_probe, pool
from kdray.core.train import TeacherOutputs, in_model_dtype
from kdray.errors import ConfigError

log = logging.getLogger("kdray")


def mix_logits(member_logits: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, temperature: float
               ) -> torch.Tensor:
    """``T * log(sum_i w_i softmax(z_i / T))`` with ``w`` normalised to sum to 1: logits whose temperature-``T``
    softmax is exactly the weighted mean of the members' softened probabilities."""
    T = float(temperature)
    w = torch.as_tensor(weights, dtype=torch.float32, device=member_logits[0].device)
    w = w / w.sum()
    probs = sum(wi * torch.softmax(z.float() / T, dim=-1) for wi, z in zip(w, member_logits))
    return T * torch.log(probs.clamp_min(1e-12))


class TeacherEnsemble(nn.Module):
    """Teachers as one module: member ``i`` is the submodule named ``"i"`` (so its layers are ``"i.<path>"``
    for hooks, and its logits the output of layer ``"i"``); the output is :func:`mix_logits` of the members.

    The mixing weights and temperature are not part of the state dict (nor, so, of the teacher-cache
    fingerprint): the cache keeps every member's logits, and each run mixes them with its own weights and
    temperature, so a search can draw the weights without new cache entries (:meth:`with_mix`)."""

    def __init__(self, members: list[nn.Module], weights: Sequence[float], temperature: float):
        super().__init__()
        if len(weights) != len(members):
            raise ValueError(f"{len(members)} members but {len(weights)} weights")
        for i, m in enumerate(members):
            self.add_module(str(i), m)
        w = torch.tensor(list(weights), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.temperature = float(temperature)

    @property
    def member_paths(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def with_mix(self, weights: Sequence[float], temperature: float) -> "TeacherEnsemble":
        """The same members (shared, not copied) mixed with other weights and temperature."""
        return TeacherEnsemble(list(self.children()), weights, temperature).to(self.weights.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mix_logits([m(x) for m in self.children()], self.weights, self.temperature)


@dataclass
class TeacherPass:
    """A frozen teacher's logits and hooked outputs for every example, with the token masks of the outputs that
    are token sequences (None elsewhere: see :class:`kdray.core.hooks.FeatureHooks`)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    masks: dict[str, Optional[torch.Tensor]]

    def pooled(self, layer: str, pooling: str) -> torch.Tensor:
        x = self.features[layer]
        return pool(x, pooling, self.masks.get(layer)) if len(x) else x  # a split without examples: nothing to pool


def teacher_pass(model: nn.Module, x: torch.Tensor, layers: list[str], batch_size: int) -> TeacherPass:
    """Logits and hooked outputs of a frozen teacher for all of ``x`` (eval mode, ``torch.inference_mode``, the
    inputs in the teacher's dtype). The batches are joined outside inference mode: the results are ordinary
    tensors (a probe can be fitted on them)."""
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    masks: dict[str, list] = {p: [] for p in layers}
    logits = []
    model.eval()
    with FeatureHooks(model, layers) as hooks, torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits.append(model(in_model_dtype(model, x[i:i + batch_size])))
            for p in layers:
                feats[p].append(hooks.outputs[p])
                masks[p].append(hooks.masks.get(p))
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
    return TeacherPass(cat(logits), {p: cat(v) for p, v in feats.items()},
                       {p: cat(v) if v and v[0] is not None else None for p, v in masks.items()})


@dataclass
class PrecomputedTeacher:
    """Teacher outputs for every training example, indexed by example id."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_logits: dict[str, torch.Tensor] = field(default_factory=dict)

    def outputs(self, idx: torch.Tensor, x: torch.Tensor) -> TeacherOutputs:
        dev = x.device  # features may be stored in float16 (teacher cache): the losses get float32
        features = {k: v[idx].to(dev, torch.float32) for k, v in self.features.items()}
        return TeacherOutputs(self.logits[idx].to(dev), features,
                              {k: v[idx].to(dev) for k, v in self.probe_logits.items()})


class LiveTeacher:
    """Runs the teacher (and the probes) on each batch, without gradients."""

    def __init__(self, model: nn.Module, layers: list[str], probes: dict[str, Probe]):
        self.model, self.probes = model, probes
        self.layers = sorted(set(layers) | set(probes))
        self._hooks = FeatureHooks(model, self.layers).__enter__()

    @torch.no_grad()
    def outputs(self, idx: torch.Tensor, x: torch.Tensor) -> TeacherOutputs:
        logits = self.model(x)
        feats, masks = dict(self._hooks.outputs), self._hooks.masks
        return TeacherOutputs(logits, feats, {p: probe(feats[p], masks.get(p)) for p, probe in self.probes.items()})

    def close(self) -> None:
        self._hooks.__exit__(None, None, None)


def probe_specs(terms: Iterable[Any], teacher: nn.Module) -> list[ProbeSpec]:
    """The probes that the terms reading probes (``uses_probes``: their options give ``pooling``, ``l2`` and
    ``max_iter``) among ``terms`` (built methods, e.g. ``distiller.terms``) need, with the pooling ``auto``
    resolved for ``teacher``'s layer (:func:`kdray.core.blocks.resolve_pooling`)."""
    specs: dict[str, ProbeSpec] = {}
    for i, m in enumerate(terms):
        if not m.uses_probes:
            continue
        layer = m.teacher_layers[0]
        s = ProbeSpec(layer, resolve_pooling(teacher, layer, m.opts.pooling), m.opts.l2, m.opts.max_iter)
        if s.layer in specs and specs[s.layer] != s:
            raise ConfigError(f"distill.terms[{i}].options", m.opts.model_dump(),
                              f"the same probe options as the other {m.name} term on layer {s.layer}")
        specs[s.layer] = s
    return list(specs.values())


def fit_probes(specs: list[ProbeSpec], train: TeacherPass, y_train: torch.Tensor, val: TeacherPass,
               y_val: torch.Tensor, num_classes: int) -> tuple[dict[str, Probe], list[ProbeReport]]:
    """Fit one probe per spec on the labelled training examples (``y_train >= 0``; ``l2: auto``: its strength
    cross-validated on them), on the pooled outputs (token sequences pooled over their real tokens)."""
    probes, reports = {}, []
    lab = y_train >= 0
    for s in specs:
        z, zv = train.pooled(s.layer, s.pooling), val.pooled(s.layer, s.pooling)
        probe = fit_probe(z[lab], y_train[lab], num_classes, s.pooling, s.l2, s.max_iter)
        probes[s.layer] = probe
        reports.append(ProbeReport(s.layer, s.pooling, probe.linear.in_features,
                                   probe_accuracy(probe, z[lab], y_train[lab]), probe_accuracy(probe, zv, y_val),
                                   probe.l2))
        log_probe(reports[-1], s.l2)
    return probes, reports
