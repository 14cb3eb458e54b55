"""Teachers: loading from a checkpoint, training once from a recipe (cached), a model that loads its own trained
weights (a Hugging Face folder), and teacher ensembles.

A *teacher signal* gives the training step the teacher's logits, hooked layer outputs and Probe-KD
probe predictions for a batch. :class:`PrecomputedTeacher` computes them once for the whole training
set (the default when inputs are not augmented: the teacher never runs per epoch);
:class:`LiveTeacher` runs the teacher on each batch (augmented inputs, online scheme).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from kdray.config import DataConfig, DistillConfig, ExperimentConfig, ModelSpec, TeacherConfig, stable_hash
from kdray.core.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, save_model
from kdray.core.progress import epoch_bar
from kdray.core.signals import TeacherEnsemble
from kdray.core.train import Data, Distiller, accuracy, fit, predict, resolve_device, seed_everything
from kdray.errors import ConfigError, first_line
from kdray.models import build_model
from kdray.paths import cache_dir

log = logging.getLogger("kdray")


# --------------------------------------------------------------------------------------------------
# model files: weights plus what it takes to rebuild the model; loadable with weights_only=True


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
                                            f"{first_line(e)}") from None
    return model


# --------------------------------------------------------------------------------------------------
# getting the teacher


def recipe_key(cfg: ExperimentConfig) -> str:
    assert cfg.teacher is not None and cfg.teacher.recipe is not None
    recipe = cfg.teacher.recipe
    data = recipe.data or cfg.data.model_copy(update={"label_fraction": 1.0, "augment": False})
    return stable_hash({"model": cfg.teacher.model.model_dump(mode="json"), "train": recipe.train.result_fields(),
                        "data": data.model_dump(mode="json"), "seed": recipe.seed, "format": CHECKPOINT_FORMAT})


_LOADED: dict[str, nn.Module] = {}  # the last teacher with weights of its own, by spec


def own_weights_teacher(spec: ModelSpec, num_classes: int, field: str) -> nn.Module:
    """A teacher that loads its own weights (a Hugging Face folder), loaded once per process for the up-front
    checks and the run alike: a 15 GB teacher is read from disk once. Only the last one is kept."""
    key = stable_hash([spec.model_dump(mode="json"), num_classes])
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = build_model(spec, num_classes, field)
    return _LOADED[key]


def teacher_architecture(t: TeacherConfig, num_classes: int, field: str) -> nn.Module:
    """The model of teacher section ``t`` for checks of paths and shapes: fresh weights, unless it is a model with
    weights of its own (then the one the run will use)."""
    if t.checkpoint is None and t.recipe is None:
        return own_weights_teacher(t.model, num_classes, field)
    return build_model(t.model, num_classes, field)


def get_teacher(cfg: ExperimentConfig, num_classes: int, *, make_bundle: Callable[[DataConfig], Any]) -> tuple[nn.Module, dict]:
    """The frozen teacher of ``cfg`` and facts about it (source, test accuracy when trained here)."""
    assert cfg.teacher is not None
    if cfg.teacher.checkpoint is None and cfg.teacher.recipe is None:  # its own weights (checked by preflight)
        model = own_weights_teacher(cfg.teacher.model, num_classes, "teacher.model")
        log.info("teacher: %s with its own weights (%s)", cfg.teacher.model.name,
                 cfg.teacher.model.kwargs.get("path", "from its factory"))
        return model, {"source": str(cfg.teacher.model.kwargs.get("path", cfg.teacher.model.name))}
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
    getattr(model, "forget_fingerprint", lambda: None)()  # trained here: its folder no longer names its weights
    data = Data(bundle.teacher_x("train"), bundle.y_train, bundle.teacher_x("val"), bundle.y_val, data_cfg.batch_size,
                data_cfg.eval_batch_size, bundle.augment)
    log.info("teacher: training %s from its recipe (%d epochs), cached as %s", cfg.teacher.model.name,
             recipe.train.epochs, path.name)

    with epoch_bar(recipe.train.epochs, "teacher", recipe.train.progress) as bar:
        res = fit(distiller, data, recipe.train, seed=recipe.seed, progress=bar)
    distiller.close()
    test_acc = accuracy(predict(model, bundle.teacher_x("test").to(device), data_cfg.eval_batch_size),
                        bundle.y_test.to(device))
    meta = {"teacher_test_acc": test_acc, "teacher_val_acc": res.history[-1]["val_acc"], "recipe_key": key,
            "num_classes": bundle.num_classes}
    save_model(path, model.cpu(), cfg.teacher.model, bundle.num_classes, meta)
    return model, {"source": str(path), "cached": False, **meta}


# --------------------------------------------------------------------------------------------------
# several teachers


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
        return teacher_architecture(cfg.teacher, num_classes, "teacher.model")
    fields = ["teacher.model", *(f"extra_teachers[{i}].model" for i in range(len(cfg.extra_teachers)))]
    teachers = [cfg.teacher, *cfg.extra_teachers]
    return TeacherEnsemble([teacher_architecture(t, num_classes, f) for t, f in zip(teachers, fields)],
                           *ensemble_mix(cfg))


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


