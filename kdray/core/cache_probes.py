"""The probes of a teacher-cache entry: fitted on its pooled columns (every spec at once, ``l2: auto`` strengths
cross-validated together), recorded in its manifest (:func:`probe_record`), read back (:func:`spec_of`,
:func:`probe_reports`) and put in the teacher's module order (:func:`in_module_order`). Plain PyTorch and NumPy;
:mod:`kdray.core.cache` owns the entries themselves."""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import numpy as np
import torch
from torch import nn

from kdray.core.hooks import module_order, split_layer
from kdray.core.probe_fit import fit_linear
from kdray.core.probes import Probe, ProbeReport, ProbeSpec, accuracy, probe_of


def probe_record(spec: ProbeSpec, report: ProbeReport) -> dict:
    """A probe as the manifest records it: its settings, dimension, accuracies and the strength it was fitted with."""
    return {**asdict(spec), "dim": report.dim, "train_acc": report.train_acc, "val_acc": report.val_acc,
            "l2_chosen": report.l2}


def spec_of(p: dict) -> ProbeSpec:
    return ProbeSpec(p["layer"], p["pooling"], p["l2"], p["max_iter"])


def probe_l2(p: dict) -> Optional[float]:
    """The strength a manifest's probe record was fitted with: ``l2_chosen`` (absent in entries written before
    ``l2: auto``), else its fixed ``l2``; None when unknown."""
    fixed = p.get("l2")
    return p.get("l2_chosen", None if isinstance(fixed, str) else fixed)


def report_of(p: dict) -> ProbeReport:
    return ProbeReport(p["layer"], p["pooling"], p["dim"], p["train_acc"], p["val_acc"], probe_l2(p))


def probe_reports(manifest: dict) -> list[ProbeReport]:
    return [report_of(p) for p in manifest.get("probes", [])]


def pooled_column(layer: str, pooling: str) -> str:
    return f"pool/{layer}/{pooling}"


def _labelled_pooled(arrays: dict, spec: ProbeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached pooled outputs of the spec's layer on the labelled training examples, and their labels."""
    y = torch.from_numpy(np.asarray(arrays["train"]["label"]))
    lab = y >= 0
    z = torch.from_numpy(np.array(arrays["train"][pooled_column(spec.layer, spec.pooling)], dtype=np.float32))
    return z[lab], y[lab]


def fit_cached_probe(arrays: dict, spec: ProbeSpec, num_classes: int) -> tuple[Probe, ProbeReport]:
    return fit_cached_probes(arrays, [spec], num_classes)[0]


def fit_cached_probes(arrays: dict, specs: list[ProbeSpec], num_classes: int) -> list[tuple[Probe, ProbeReport]]:
    """Fit ``specs`` on the cached pooled outputs of the labelled training examples, all together (the ``l2: auto``
    strengths cross-validated together): (probe, report) per spec."""
    out: dict[ProbeSpec, tuple[Probe, ProbeReport]] = {}
    yv = torch.from_numpy(np.asarray(arrays["val"]["label"]))
    for max_iter in sorted({s.max_iter for s in specs}):
        same = [s for s in specs if s.max_iter == max_iter]
        data = [_labelled_pooled(arrays, s) for s in same]
        y = data[0][1]
        fits = fit_linear([z for z, _ in data], y, num_classes, [s.l2 for s in same], max_iter)
        for spec, (z, _), fit in zip(same, data, fits):
            probe = probe_of(fit, spec.pooling)
            zv = torch.from_numpy(np.array(arrays["val"][pooled_column(spec.layer, spec.pooling)], dtype=np.float32))
            out[spec] = probe, ProbeReport(spec.layer, spec.pooling, z.shape[1], accuracy(probe, z, y),
                                           accuracy(probe, zv, yv), probe.l2)
    return [out[s] for s in specs]


def in_module_order(probes: list[dict], teacher: nn.Module) -> list[dict]:
    """The probe records sorted by their layer's place in the teacher (:func:`~kdray.core.hooks.module_order`: the
    order a forward produces the outputs of a model built in the order it runs), each with that ``depth`` (what
    tables and plots by layer follow)."""
    order = module_order(teacher)
    depth = {r["layer"]: order.get(split_layer(r["layer"])[0], len(order)) for r in probes}
    return sorted(({**r, "depth": depth[r["layer"]]} for r in probes), key=lambda r: (r["depth"], r["layer"]))
