"""Teachers: loading from a checkpoint, training once from a recipe (cached), and teacher signals.

A *teacher signal* gives the training step the teacher's logits, hooked layer outputs and Probe-KD
probe predictions for a batch. :class:`PrecomputedTeacher` computes them once for the whole training
set (the default when inputs are not augmented: the teacher never runs per epoch);
:class:`LiveTeacher` runs the teacher on each batch (augmented inputs, online scheme).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from kdray import __version__
from kdray.config import DataConfig, DistillConfig, ExperimentConfig, ModelSpec, stable_hash
from kdray.errors import ConfigError
from kdray.hooks import FeatureHooks
from kdray.models import build_model
from kdray.paths import atomic_write_bytes, cache_dir
from kdray.probes import Probe, ProbeReport, ProbeSpec, accuracy as probe_accuracy, fit_probe
from kdray.train import Data, Distiller, TeacherOutputs, accuracy, fit, predict, resolve_device, seed_everything

log = logging.getLogger("kdray")

CHECKPOINT_FORMAT = "kdray-model-v1"

# --------------------------------------------------------------------------------------------------
# model files: weights plus what it takes to rebuild the model; loadable with weights_only=True


def model_checkpoint(model: nn.Module, spec: ModelSpec, num_classes: int, meta: dict | None = None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "kdray_version": __version__, "model": spec.model_dump(mode="json"),
            "num_classes": num_classes, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta or {}}


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, num_classes: int, meta: dict | None = None) -> Path:
    buf = io.BytesIO()
    torch.save(model_checkpoint(model, spec, num_classes, meta), buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def read_checkpoint(path: str | Path, field: str = "checkpoint") -> dict:
    """Load a weights-only file; a missing, corrupt or pickled-object file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, str(path), "an existing checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(field, str(path), f"a weights-only checkpoint (torch.save of a state_dict or a kdray "
                                            f"model file); loading failed: {first}") from None
    if not isinstance(obj, dict):
        raise ConfigError(field, str(path), "a checkpoint holding a dict (state_dict or kdray model file)")
    return obj


def load_model(path: str | Path, spec: ModelSpec | None = None, num_classes: int | None = None,
               field: str = "checkpoint") -> nn.Module:
    """Rebuild a model from a kdray model file (its own class count), or from a bare state_dict with ``spec``
    and ``num_classes``."""
    ckpt = read_checkpoint(path, field)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        spec = spec or ModelSpec.model_validate(ckpt["model"])
        num_classes = ckpt["num_classes"]
        state = ckpt["state_dict"]
    else:
        if spec is None or num_classes is None:
            raise ConfigError(field, str(path), "a kdray model file (a bare state_dict needs the model spec)")
        state = ckpt
    model = build_model(spec, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(field, str(path), f"weights matching model {spec.name!r} with {num_classes} classes: "
                                            f"{str(e).splitlines()[0]}") from None
    return model


# --------------------------------------------------------------------------------------------------
# getting the teacher


def recipe_key(cfg: ExperimentConfig) -> str:
    assert cfg.teacher is not None and cfg.teacher.recipe is not None
    recipe = cfg.teacher.recipe
    data = recipe.data or cfg.data.model_copy(update={"label_fraction": 1.0, "augment": False})
    return stable_hash({"model": cfg.teacher.model.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json", exclude={"progress"}),
                        "data": data.model_dump(mode="json"), "seed": recipe.seed, "format": CHECKPOINT_FORMAT})


def get_teacher(cfg: ExperimentConfig, num_classes: int, *, make_bundle: Callable[[DataConfig], Any]) -> tuple[nn.Module, dict]:
    """The frozen teacher of ``cfg`` and facts about it (source, test accuracy when trained here)."""
    assert cfg.teacher is not None
    if cfg.teacher.checkpoint:
        model = load_model(cfg.teacher.checkpoint, cfg.teacher.model, num_classes, "teacher.checkpoint")
        info = {"source": cfg.teacher.checkpoint}
        ckpt_meta = read_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint").get("meta", {})
        info.update({k: v for k, v in ckpt_meta.items() if isinstance(v, (int, float, str))})
        return model, info
    key = recipe_key(cfg)
    path = cache_dir(cfg.cache_dir) / "teachers" / f"{cfg.teacher.model.name.replace(':', '_')}-{key}.pt"
    if path.is_file():
        try:
            model = load_model(path, field="teacher cache")
            log.info("teacher: cached %s", path)
            return model, {"source": str(path), "cached": True, **read_checkpoint(path)["meta"]}
        except ConfigError as e:
            log.warning("teacher cache entry %s is unreadable (%s); training it again", path, e)
    recipe = cfg.teacher.recipe
    data_cfg = recipe.data or cfg.data.model_copy(update={"label_fraction": 1.0, "augment": False})
    bundle = make_bundle(data_cfg)
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    model = build_model(cfg.teacher.model, bundle.num_classes, "teacher.model").to(device)
    distiller = Distiller(model, DistillConfig(ce_weight=1.0))
    data = Data(bundle.x_train, bundle.y_train, bundle.x_val, bundle.y_val, data_cfg.batch_size,
                data_cfg.eval_batch_size, bundle.augment)
    log.info("teacher: training %s from its recipe (%d epochs), cached as %s", cfg.teacher.model.name,
             recipe.train.epochs, path.name)
    from kdray.progress import epoch_bar

    with epoch_bar(recipe.train.epochs, "teacher", recipe.train.progress) as bar:
        res = fit(distiller, data, recipe.train, seed=recipe.seed, progress=bar)
    distiller.close()
    test_acc = accuracy(predict(model, bundle.x_test.to(device), data_cfg.eval_batch_size), bundle.y_test.to(device))
    meta = {"teacher_test_acc": test_acc, "teacher_val_acc": res.history[-1]["val_acc"], "recipe_key": key,
            "num_classes": bundle.num_classes}
    save_model(path, model.cpu(), cfg.teacher.model, bundle.num_classes, meta)
    return model, {"source": str(path), "cached": False, **meta}


# --------------------------------------------------------------------------------------------------
# several teachers


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


def ensemble_mix(cfg: ExperimentConfig) -> tuple[list[float], float]:
    """The mixing weights (one per teacher, main teacher first) and temperature of ``cfg``."""
    assert cfg.teacher is not None
    return [t.weight for t in [cfg.teacher, *cfg.extra_teachers]], cfg.distill.temperature


def teacher_for(teacher: Optional[nn.Module], cfg: ExperimentConfig) -> Optional[nn.Module]:
    """``teacher`` as ``cfg`` uses it: an ensemble mixed with ``cfg``'s weights and temperature (a search
    prepares the ensemble once and may draw both per trial); any other teacher as it is."""
    return teacher.with_mix(*ensemble_mix(cfg)) if isinstance(teacher, TeacherEnsemble) else teacher


def ensemble_architecture(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The teacher's (or the ensemble's) architecture with fresh weights: enough for layer paths and shapes."""
    assert cfg.teacher is not None
    if not cfg.extra_teachers:
        return build_model(cfg.teacher.model, num_classes, "teacher.model")
    teachers = [cfg.teacher, *cfg.extra_teachers]
    members = [build_model(t.model, num_classes, f"extra_teachers[{i - 1}].model" if i else "teacher.model")
               for i, t in enumerate(teachers)]
    return TeacherEnsemble(members, *ensemble_mix(cfg))


def get_teachers(cfg: ExperimentConfig, num_classes: int, *, make_bundle: Callable[[DataConfig], Any]
                 ) -> tuple[nn.Module, dict]:
    """:func:`get_teacher` for the main teacher, or a :class:`TeacherEnsemble` of it and the extra teachers."""
    model, info = get_teacher(cfg, num_classes, make_bundle=make_bundle)
    if not cfg.extra_teachers:
        return model, info
    members, infos = [model], [info]
    for t in cfg.extra_teachers:
        m, i = get_teacher(cfg.model_copy(update={"teacher": t}), num_classes, make_bundle=make_bundle)
        members.append(m)
        infos.append(i)
    ens = TeacherEnsemble(members, *ensemble_mix(cfg))
    log.info("teacher: an ensemble of %d (weights %s, mixed at T=%g)", len(members),
             ", ".join(f"{w:.3g}" for w in ens.weights.tolist()), cfg.distill.temperature)
    return ens, {"source": " + ".join(str(i.get("source")) for i in infos), "members": len(members),
                 **{f"member{k}_test_acc": i["teacher_test_acc"] for k, i in enumerate(infos) if "teacher_test_acc" in i}}


# --------------------------------------------------------------------------------------------------
# teacher signals


@torch.no_grad()
def teacher_pass(model: nn.Module, x: torch.Tensor, layers: list[str], batch_size: int) -> tuple[torch.Tensor, dict]:
    """Logits and hooked outputs of a frozen teacher for all of ``x`` (eval mode, no grad)."""
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    logits = []
    model.eval()
    with FeatureHooks(model, layers) as hooks:
        for i in range(0, len(x), batch_size):
            logits.append(model(x[i:i + batch_size]))
            for p in layers:
                feats[p].append(hooks.outputs[p])
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
    return cat(logits), {p: cat(v) for p, v in feats.items()}


@dataclass
class PrecomputedTeacher:
    """Teacher outputs for every training example, indexed by example id."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_logits: dict[str, torch.Tensor] = field(default_factory=dict)

    def outputs(self, idx: torch.Tensor, x: torch.Tensor) -> TeacherOutputs:
        dev = x.device  # features may be stored in float16 (teacher cache): the losses get float32
        return TeacherOutputs(self.logits[idx].to(dev), {k: v[idx].to(dev, torch.float32) for k, v in self.features.items()},
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
        feats = dict(self._hooks.outputs)
        return TeacherOutputs(logits, feats, {p: probe(feats[p]) for p, probe in self.probes.items()})

    def close(self) -> None:
        self._hooks.__exit__(None, None, None)


def probe_specs(terms: Iterable[Any]) -> list[ProbeSpec]:
    """The probes that the probe_kd terms among ``terms`` (built methods, e.g. ``distiller.terms``) need."""
    specs: dict[str, ProbeSpec] = {}
    for i, m in enumerate(terms):
        if m.name != "probe_kd":
            continue
        s = ProbeSpec(m.teacher_layers[0], m.opts.pooling, m.opts.l2, m.opts.max_iter)
        if s.layer in specs and specs[s.layer] != s:
            raise ConfigError(f"distill.terms[{i}].options", m.opts.model_dump(),
                              f"the same probe options as the other probe_kd term on layer {s.layer}")
        specs[s.layer] = s
    return list(specs.values())


def fit_probes(specs: list[ProbeSpec], train_feats: dict[str, torch.Tensor], y_train: torch.Tensor,
               val_feats: dict[str, torch.Tensor], y_val: torch.Tensor, num_classes: int
               ) -> tuple[dict[str, Probe], list[ProbeReport]]:
    """Fit one probe per spec on the labelled training examples (``y_train >= 0``)."""
    probes, reports = {}, []
    lab = y_train >= 0
    for s in specs:
        probe = fit_probe(train_feats[s.layer][lab], y_train[lab], num_classes, s.pooling, s.l2, s.max_iter)
        probes[s.layer] = probe
        reports.append(ProbeReport(s.layer, s.pooling, probe.linear.in_features,
                                   probe_accuracy(probe, train_feats[s.layer][lab], y_train[lab]),
                                   probe_accuracy(probe, val_feats[s.layer], y_val)))
        log.info("probe on %s (%s pooling): train acc %.3f, val acc %.3f", s.layer, s.pooling,
                 reports[-1].train_acc, reports[-1].val_acc)
    return probes, reports
