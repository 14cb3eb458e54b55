"""The experiment config: one YAML file describes teacher, student, data, distillation and training.

Everything is validated before any work starts. :func:`load_config` turns any problem (unknown key,
wrong type, out-of-range value, unknown method or model) into one :class:`~kdray.errors.ConfigError`
that names the field, the bad value and what is allowed; the CLI exits with code 2 on it.

Dotted overrides (``train.epochs=5``, ``distill.terms.0.weight=0.5``) are how both ``kdray train --set``
and the search (one override per searched dimension) derive configs from a base file.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdray.errors import ConfigError


def check_run_name(name: str) -> str:
    """A run or search name becomes a folder name and an MLflow name: not empty, no path separators."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise ValueError("a non-empty name of at most 200 characters without '/', '\\' or NUL (it names a folder)")
    return name


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are type-checked strictly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """A model by registry name (``mnist1d_cnn``) or import path (``package.module:factory``)."""

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Strict):
    name: str = "mnist1d"
    root: Optional[str] = None  # folder of file-based data sets (CIFAR, Hugging Face)
    label_fraction: float = Field(1.0, gt=0, le=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0  # which examples become validation / labelled
    batch_size: int = Field(100, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    augment: bool = False
    params: dict[str, Any] = Field(default_factory=dict)  # data-set specific, checked by its loader


class OptimConfig(Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    milestones: list[int] = Field(default_factory=list)  # epochs at which "step" multiplies lr by gamma
    gamma: float = Field(0.1, gt=0, le=1)


class TrainConfig(Strict):
    epochs: int = Field(20, ge=1)
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    device: str = "auto"
    max_grad_norm: Optional[float] = Field(None, gt=0)
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


class TeacherRecipe(Strict):
    """How kdray trains the teacher when no checkpoint is given (cached by a hash of this recipe)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    data: Optional[DataConfig] = None  # default: the experiment's data with every label
    seed: int = 0


class TeacherConfig(Strict):
    model: ModelSpec
    checkpoint: Optional[str] = None
    recipe: Optional[TeacherRecipe] = None
    weight: float = Field(1.0, gt=0)  # its share of the soft targets when there are extra_teachers

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if (self.checkpoint is None) == (self.recipe is None):
            raise ValueError("give exactly one of teacher.checkpoint (a file) or teacher.recipe (train it)")
        return self


class TermConfig(Strict):
    """One distillation term of the loss: method, weight, layers and method options."""

    method: str
    weight: Optional[float] = Field(None, ge=0)  # None: the method's reference weight
    temperature: Optional[float] = Field(None, gt=0)  # None: distill.temperature
    teacher_layers: list[str] = Field(default_factory=list)
    student_layers: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("teacher_layers", "student_layers", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class DistillConfig(Strict):
    scheme: Literal["offline", "online"] = "offline"
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    terms: list[TermConfig] = Field(default_factory=list)


class TeacherCacheConfig(Strict):
    """The teacher-output cache (:mod:`kdray.cache`), used by offline distillation without augmentation."""

    enabled: bool = True
    dtype: Literal["float32", "float16"] = "float32"  # of stored layer outputs (logits stay float32)
    # full layer outputs (all splits) above this many MB are stored in float16; still above it, not cached
    max_feature_mb: float = Field(2048.0, gt=0)


class ExportConfig(Strict):
    """Compressed variants of the trained student (:mod:`kdray.compress`), measured beside the float one."""

    sparsity: float = Field(0.0, ge=0, lt=1)  # share of conv/linear weights pruned by magnitude (0: none)
    finetune_epochs: int = Field(2, ge=0)  # fine-tuning under distillation after pruning
    quantize: bool = False  # also measure (and save) a dynamic int8 variant
    measure_latency: bool = False  # report latency_ms (one CPU thread, batch of 100) at the last epoch


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Optional[TeacherConfig] = None
    # more teachers: an ensemble (teacher i's layers are "i.<path>", the main teacher is 0); logit terms get
    # the weighted mean of their temperature-softened probabilities (mixed at distill.temperature)
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)
    student: ModelSpec
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs"
    cache_dir: Optional[str] = None  # default: the user cache directory (see kdray.paths)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    _name = field_validator("name")(classmethod(lambda cls, v: check_run_name(v)))

    def fingerprint(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hex digest of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------
# loading, overrides and error messages


def _field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<config>"


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for listing allowed keys)."""
    import typing

    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        for _ in range(3):  # unwrap Optional[...] and list[...]
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                break
            ann = args[0] if args else ann
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _allowed(err: dict, root: type[BaseModel]) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        owner = _model_at(err["loc"], root)
        keys = ", ".join(owner.model_fields) if owner else "see the config reference"
        return f"no such key here; known keys: {keys}"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return "a number " + bounds[kind].format(**ctx)
    if kind == "literal_error":
        return "one of " + ctx.get("expected", "")
    if kind == "missing":
        return "a value (this key is required)"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{kind.split('_')[0]} ({err['msg']})"
    return err["msg"].removeprefix("Value error, ")


def config_error_from(e: ValidationError, prefix: tuple = (), root: type[BaseModel] | None = None) -> ConfigError:
    """The first error of a pydantic ValidationError as a ConfigError; ``root`` is the validated model
    (default: ExperimentConfig), ``prefix`` the path of that model inside the whole config."""
    err = e.errors()[0]
    value = err.get("input") if err["type"] != "missing" else "<missing>"
    return ConfigError(_field_name(prefix + tuple(err["loc"])), value, _allowed(err, root or ExperimentConfig))


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of ``raw`` with dotted-path overrides applied (``a.b.0.c=value``).

    String values are parsed as YAML scalars/flow collections, so ``lr=1e-3`` gives a float.
    """
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for path, value in items:
        set_dotted(out, path, value)
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError("--set", text, "KEY=VALUE with a dotted key, e.g. train.epochs=5")
    key, val = text.split("=", 1)
    return key.strip(), yaml.safe_load(val)


def set_dotted(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(".".join(parts[: i + 1]), part, f"a list index below {len(node)}")
            key: Any = int(part)
        else:
            key = part
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def read_yaml(path: str | Path, what: str = "config") -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(what, str(path), "an existing YAML file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(what, str(path), f"valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(what, type(raw).__name__, "a YAML mapping at the top level")
    return raw


def parse_config(raw: dict, base_dir: str | Path | None = None) -> ExperimentConfig:
    """Validate a config dict; relative file paths resolve against ``base_dir``."""
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise config_error_from(e) from None
    for t in ([cfg.teacher] if cfg.teacher else []) + list(cfg.extra_teachers):
        if base_dir is not None and t.checkpoint and not Path(t.checkpoint).is_absolute():
            t.checkpoint = str((Path(base_dir) / t.checkpoint).resolve())
    check_rules(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> ExperimentConfig:
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_config(raw, base_dir=Path(path).parent)


def check_rules(cfg: ExperimentConfig) -> None:
    """Rules that span fields or need the registries (methods, models, data sets)."""
    from kdray.data import DATASETS, check_data_params
    from kdray.methods import METHODS
    from kdray.models import check_model_spec

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
