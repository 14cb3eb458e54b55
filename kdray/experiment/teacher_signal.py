"""The teacher signal of a run: what the runs of a search share (:class:`Prepared`: the data and the teacher),
and :func:`build`, which checks the layers against the real models on one batch, sets up the distiller and
the probes and chooses the signal: live, computed once in memory, or from the teacher cache
(:mod:`kdray.core.cache`, whose request for one run or a whole search space :func:`cache_request` makes)."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from kdray.config import ExperimentConfig
from kdray.core.bundle import DataBundle
from kdray.core.cache import CacheRequest, TeacherCache, get_cache
from kdray.core.hooks import output_shapes
from kdray.core.methods import TEACHER_LAYERS, build_terms
from kdray.core.probes import ProbeReport
from kdray.core.signals import (LiveTeacher, PrecomputedTeacher, TeacherEnsemble, fit_probes, mix_logits, probe_specs,
                                teacher_pass)
from kdray.core.train import Distiller, predict
from kdray.experiment.preflight import build_distiller
from kdray.experiment.teachers import teacher_for

log = logging.getLogger("kdray")


@dataclass
class Prepared:
    """Shared by all runs on the same data and teacher: built once per search."""
    bundle: DataBundle
    teacher: Optional[nn.Module]
    teacher_info: dict[str, Any]
    cache: Optional[TeacherCache] = None  # teacher outputs for every example (a search fills it up-front)


@dataclass
class Built:
    distiller: Distiller
    signal: Any  # a TeacherSignal, or None without a teacher
    online_teacher: Optional[nn.Module]
    probes: list[ProbeReport]
    teacher_val_pred: Optional[torch.Tensor]
    teacher_test_pred: Optional[torch.Tensor]
    int8: Optional[nn.Module] = None  # the dynamically quantized student, when cfg.export.quantize


def build(cfg: ExperimentConfig, prep: Prepared, device: torch.device) -> Built:
    """Check layers and shapes, build adapters, fit probes, choose the teacher signal."""
    b = prep.bundle
    n = min(len(b.x_train), cfg.data.batch_size)
    example, t_example = b.x_train[:n].to(device), b.teacher_x("train")[:n].to(device)
    teacher = teacher_for(prep.teacher.to(device), cfg) if prep.teacher is not None else None
    distiller = build_distiller(cfg, teacher, b.num_classes, example, b.name, t_example, b.two_views)
    if teacher is None:
        return Built(distiller, None, None, [], None, None)
    eval_bs = cfg.data.eval_batch_size
    same_classes = prep.teacher_info.get("teacher_classes") == b.num_classes
    specs = probe_specs(distiller.terms, teacher)
    if uses_cache(cfg, b) and (req := cache_request([cfg], prep, t_example)) is not None:
        cache = usable_cache(cfg, prep, req, device)
        signal, reports = cached_signal(cache, distiller, specs, teacher)
        val_pred, test_pred = [cached_logits(cache, s, teacher).argmax(1)
                               if same_classes and len(cache.arrays[s]["label"]) else None for s in ("val", "test")]
        return Built(distiller, signal, None, reports, val_pred, test_pred)
    teacher_val_pred = (predict(teacher, b.teacher_x("val").to(device), eval_bs).argmax(1).cpu()
                        if same_classes and len(b.x_val) else None)
    teacher_test_pred = predict(teacher, b.teacher_x("test").to(device), eval_bs).argmax(1).cpu() if same_classes \
        else None
    if cfg.distill.scheme == "online":
        teacher = copy.deepcopy(teacher).train().requires_grad_(True)  # the shared one stays frozen
        getattr(teacher, "forget_fingerprint", lambda: None)()
        return Built(distiller, LiveTeacher(teacher, distiller.teacher_layers, {}), teacher, [], teacher_val_pred,
                     teacher_test_pred)
    if b.augment is not None:
        log.info("teacher signal: live (inputs are augmented, so cached teacher outputs would not match)")
    probe_layers = [s.layer for s in specs]
    # augmented inputs: the teacher runs live, so only the probes' layers are needed up-front
    layers = sorted(set(probe_layers) if b.augment is not None else set(distiller.teacher_layers) | set(probe_layers))
    t0 = time.perf_counter()
    train = teacher_pass(teacher, b.teacher_x("train").to(device), layers, eval_bs)
    val = teacher_pass(teacher, b.teacher_x("val").to(device), probe_layers, eval_bs)
    probes, reports = fit_probes(specs, train, b.y_train.to(device), val, b.y_val.to(device), b.num_classes)
    if b.augment is not None:
        signal: Any = LiveTeacher(teacher, distiller.teacher_layers, probes)
    else:
        probe_logits = {p: probe(train.features[p], train.masks.get(p)) for p, probe in probes.items()}
        signal = PrecomputedTeacher(train.logits, {p: train.features[p] for p in feature_layers(distiller.terms)},
                                    probe_logits)
        log.info("teacher signal: computed once in memory for %d examples in %.2fs (not cached)", len(b.x_train),
                 time.perf_counter() - t0)
    return Built(distiller, signal, None, reports, teacher_val_pred, teacher_test_pred)


# --------------------------------------------------------------------------------------------------
# the teacher cache (kdray.core.cache) as the teacher signal


def uses_cache(cfg: ExperimentConfig, bundle: DataBundle) -> bool:
    """Whether runs of ``cfg`` read the teacher from the teacher cache (offline, inputs not augmented, cache on)."""
    return cfg.distill.scheme == "offline" and bundle.augment is None and cfg.teacher_cache.enabled


def feature_layers(terms: Iterable[Any]) -> list[str]:
    """Teacher layers whose full outputs a term reads (a term reading probes only needs its probe's output)."""
    return sorted({p for m in terms if TEACHER_LAYERS in m.reads for p in m.teacher_layers})


def cache_request(cfgs: list[ExperimentConfig], prep: Prepared, example: torch.Tensor) -> Optional[CacheRequest]:
    """What the offline runs of ``cfgs`` (one run, or every corner of a search space) need from the teacher,
    in float16 when float32 would exceed the feature budget; None when even float16 would (then each run
    computes the teacher's outputs in memory, uncached)."""

    members = tuple(prep.teacher.member_paths) if isinstance(prep.teacher, TeacherEnsemble) else ()
    # an ensemble: every member's logits
    req = CacheRequest(members, dtype=cfgs[0].teacher_cache.dtype, pooled_dtype=pooled_dtype(cfgs[0], prep.teacher))
    for cfg in cfgs:
        if cfg.distill.scheme == "offline":
            terms = [m for _, _, m in build_terms(cfg.distill.terms, cfg.distill.temperature)]
            req = req.union(CacheRequest(tuple(feature_layers(terms)), tuple(probe_specs(terms, prep.teacher)),
                                        req.dtype))
    return fit_budget(req, cfgs[0], prep, example)


def pooled_dtype(cfg: ExperimentConfig, teacher: Optional[nn.Module]) -> str:
    """``teacher_cache.pooled_dtype``; ``auto``: what the teacher asks for (``cache_pooled_dtype``: float16 for a
    language model's hidden states), else float32. Asked or forced, a float16 column that would overflow is stored
    in float32 with a warning (:func:`kdray.core.cache.storable`): the overflow shows only once the teacher has run,
    too late to refuse the config before any work, and float32 holds the same states exactly."""
    if cfg.teacher_cache.pooled_dtype != "auto":
        return cfg.teacher_cache.pooled_dtype
    members = list(teacher.children()) if isinstance(teacher, TeacherEnsemble) else [teacher]
    return "float16" if any(getattr(m, "cache_pooled_dtype", "") == "float16" for m in members) else "float32"


def fit_budget(req: CacheRequest, cfg: ExperimentConfig, prep: Prepared, example: torch.Tensor
               ) -> Optional[CacheRequest]:
    if not req.feature_layers or prep.teacher is None:
        return req
    b = prep.bundle
    n = len(b.x_train) + len(b.x_val) + len(b.x_test)  # example: the teacher's inputs
    shapes = output_shapes(prep.teacher, example[:2].to(next(prep.teacher.parameters()).device),
                           list(req.feature_layers), "teacher_layers")
    per_example = sum(math.prod(s[1:]) for s in shapes.values())
    budget = cfg.teacher_cache.max_feature_mb * 1e6
    size = lambda dtype: n * per_example * (2 if dtype == "float16" else 4)  # noqa: E731
    if size(req.dtype) <= budget:
        return req
    if size("float16") <= budget:
        log.info("teacher cache: full outputs of %s take %.0f MB in %s, over teacher_cache.max_feature_mb=%g: "
                 "storing them in float16", ", ".join(req.feature_layers), size(req.dtype) / 1e6, req.dtype,
                 cfg.teacher_cache.max_feature_mb)
        return CacheRequest(req.feature_layers, req.probes, "float16", req.pooled_dtype)
    log.info("teacher cache: full outputs of %s take %.0f MB even in float16, over teacher_cache.max_feature_mb=%g:"
             " not cached", ", ".join(req.feature_layers), size("float16") / 1e6, cfg.teacher_cache.max_feature_mb)
    return None


def usable_cache(cfg: ExperimentConfig, prep: Prepared, req: CacheRequest, device: torch.device) -> TeacherCache:
    if prep.cache is not None and prep.cache.covers(req):
        prep.cache = prep.cache.loaded()  # a reference to an entry on shared storage: read once, here
        return prep.cache
    return get_cache(prep.teacher, prep.bundle, req, cache_root=cfg.cache_dir, info=cache_info(cfg),
                     batch_size=cfg.data.eval_batch_size, device=device)


def cache_info(cfg: ExperimentConfig) -> dict:
    return {"teacher": {"model": cfg.teacher.model.name if cfg.teacher else ""},
            "data": {"config": cfg.data.model_dump(mode="json")}}


def cached_logits(cache: TeacherCache, split: str, teacher: Optional[nn.Module]) -> torch.Tensor:
    """The teacher's logits for ``split`` from the cache; an ensemble's mixed from its members' cached logits
    with the weights and temperature of this run."""
    if isinstance(teacher, TeacherEnsemble):
        return mix_logits([cache.tensor(split, f"feat/{p}") for p in teacher.member_paths], teacher.weights,
                          teacher.temperature)
    return cache.tensor(split, "logits")


def cached_signal(cache: TeacherCache, distiller: Distiller, specs: list, teacher: Optional[nn.Module] = None
                  ) -> tuple[PrecomputedTeacher, list]:
    probe_logits, reports = {}, []
    for spec in specs:
        logits, report = cache.probe(spec)
        probe_logits[spec.layer] = logits
        reports.append(report)
    signal = PrecomputedTeacher(cached_logits(cache, "train", teacher),
                                {p: cache.tensor("train", f"feat/{p}") for p in feature_layers(distiller.terms)},
                                probe_logits)
    log.info("teacher signal: from the teacher cache (entry %s, %s)", cache.key, "hit" if cache.hit else "built now")
    return signal, reports
