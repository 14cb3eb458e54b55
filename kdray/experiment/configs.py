"""An experiment config as a run needs it: the schema (kdray.config) plus the rules that span fields or need
the registries of methods, models and data sets. :func:`load_config` and :func:`parse_config` are what
every command and trial uses."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdray.config import ExperimentConfig, apply_overrides, check_finite, config_error_from, read_yaml
from kdray.core.methods import METHODS
from kdray.data import DATASETS, check_data_params
from kdray.errors import ConfigError
from kdray.models import check_model_spec


def parse_config(raw: dict, base_dir: str | Path | None = None) -> ExperimentConfig:
    """Validate a config dict; relative checkpoint paths resolve against ``base_dir``."""
    check_finite(raw)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise config_error_from(e) from None
    for t in ([cfg.teacher] if cfg.teacher else []) + list(cfg.extra_teachers):
        if base_dir is not None and t.checkpoint and not Path(t.checkpoint).is_absolute():
            t.checkpoint = str((Path(base_dir) / t.checkpoint).resolve())
    default_tokenizer(cfg)
    check_rules(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> ExperimentConfig:
    raw = absolute_paths(apply_overrides(read_yaml(path), overrides))
    return parse_config(raw, base_dir=Path(path).parent)


# folders named in a config besides checkpoints: data, model and tokenizer folders (a hub name stays as it is)
PATH_KEYS = {("data", "root"), ("data", "params", "tokenizer"), ("data", "params", "teacher_tokenizer"),
             ("data", "params", "student_tokenizer"), ("kwargs", "path"), ("kwargs", "tokenizer")}


def absolute_paths(raw: Any, at: tuple[str, ...] = ()) -> Any:
    """``raw`` with every relative data, model or tokenizer folder that exists from the working directory made
    absolute, so a search's trials (which run elsewhere) find them: a folder is read where the user ran kdray."""
    if isinstance(raw, dict):
        return {k: absolute_paths(v, at + (str(k),)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [absolute_paths(v, at) for v in raw]
    if isinstance(raw, str) and any(at[-len(k):] == k for k in PATH_KEYS) and raw and not Path(raw).is_absolute() \
            and Path(raw).expanduser().exists():
        return str(Path(raw).expanduser().resolve())
    return raw


def default_tokenizer(cfg: ExperimentConfig) -> None:
    """A multiple-choice data set and its language models agree on their tokenizers: the teacher's prompts are
    tokenised by the teacher's own tokenizer unless the config names one (``data.params.teacher_tokenizer``), and
    the main teacher and the student, as ``hf_causal_lm``, read their answer tokens from the tokenizer of the view
    they read (the teacher's, or the student's ``student_tokenizer``), unless their ``kwargs.tokenizer`` says
    otherwise. An extra teacher keeps its own tokenizer; preflight refuses it unless it is the teacher view's
    (:func:`kdray.experiment.preflight.check_teacher_tokenizers`)."""
    if cfg.data.name != "multiple_choice":
        return
    params = cfg.data.params
    if not params.get("teacher_tokenizer") and cfg.teacher is not None:
        kwargs = cfg.teacher.model.kwargs
        if kwargs.get("tokenizer") or kwargs.get("path"):
            params = cfg.data.params = {**params, "teacher_tokenizer": kwargs.get("tokenizer") or kwargs["path"]}
    views = [(cfg.teacher.model, params.get("teacher_tokenizer"))] if cfg.teacher is not None else []
    views.append((cfg.student, params.get("student_tokenizer") or params.get("teacher_tokenizer")))
    for spec, tokenizer in views:
        if spec.name == "hf_causal_lm" and tokenizer and not spec.kwargs.get("tokenizer") \
                and tokenizer != spec.kwargs.get("path"):
            spec.kwargs = {**spec.kwargs, "tokenizer": tokenizer}


def check_rules(cfg: ExperimentConfig) -> None:
    """Rules that span fields or need the registries (methods, models, data sets)."""
    if cfg.data.name not in DATASETS:
        raise ConfigError("data.name", cfg.data.name, "one of " + ", ".join(DATASETS.names()))
    check_data_params(cfg.data, "data")
    if cfg.teacher and cfg.teacher.recipe and cfg.teacher.recipe.data:
        check_data_params(cfg.teacher.recipe.data, "teacher.recipe.data")
    check_model_spec(cfg.student, "student")
    if cfg.teacher:
        check_model_spec(cfg.teacher.model, "teacher.model")
    if cfg.extra_teachers and cfg.teacher is None:
        raise ConfigError("extra_teachers", f"{len(cfg.extra_teachers)} teacher(s)", "a main teacher section as well")
    for i, t in enumerate(cfg.extra_teachers):
        check_model_spec(t.model, f"extra_teachers[{i}].model")
        if t.recipe and t.recipe.data:
            check_data_params(t.recipe.data, f"extra_teachers[{i}].recipe.data")
    total = cfg.distill.ce_weight
    for i, term in enumerate(cfg.distill.terms):
        where = f"distill.terms[{i}]"
        if term.method not in METHODS:
            raise ConfigError(f"{where}.method", term.method, "one of " + ", ".join(METHODS.names()))
        cls = METHODS.get(term.method)
        try:
            cls.validate_term(term)
        except ConfigError as e:
            raise ConfigError(f"{where}.{e.field}", e.value, e.allowed) from None
        total += cls.default_weight if term.weight is None else term.weight
    if cfg.teacher is None and any(METHODS.get(t.method).needs_teacher for t in cfg.distill.terms):
        raise ConfigError("teacher", None, "a teacher section when distill.terms has a term that needs one "
                                           "(all but self_aux)")
    if cfg.distill.scheme == "online" and (cfg.teacher is None or not cfg.distill.terms):
        raise ConfigError("distill.scheme", "online", "offline, unless there is a teacher and at least one term")
    if total <= 0:
        raise ConfigError("distill", "all loss weights are 0", "at least one of ce_weight or a term weight > 0")
