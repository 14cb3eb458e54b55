"""The experiment config: one YAML file describes teacher, student, data, distillation and training.

Everything is validated before any work starts. :func:`load_config` turns any problem (unknown key,
wrong type, out-of-range value, unknown method or model) into one :class:`~kdray.errors.ConfigError`
that names the field, the bad value and what is allowed; the CLI exits with code 2 on it.

Dotted overrides (``train.epochs=5``, ``distill.terms.0.weight=0.5``) are how both ``kdray train --set``
and the search (one override per searched dimension) derive configs from a base file.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def check_run_name(name: str) -> str:
    """A run or search name becomes a folder name and an MLflow name: not empty, no path separators."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise ValueError("a non-empty name of at most 200 characters without '/', '\\' or NUL (it names a folder)")
    return name


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are type-checked strictly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    # the student's forward and loss terms under autocast in this dtype (fp16 adds a gradient scaler); the
    # device must support it (checked before any work: kdray.core.train.check_precision)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the student for the epoch loop (hooks on it still work)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    def result_fields(self) -> dict[str, Any]:
        """The fields that decide what training produces (a teacher recipe's cache key): not ``progress`` or
        ``compile``, and ``precision`` only when not fp32 (so keys made before it existed still hold)."""
        skip = {"progress", "compile"} | ({"precision"} if self.precision == "fp32" else set())
        return self.model_dump(mode="json", exclude=skip)


class TeacherRecipe(Strict):
    """How kdray trains the teacher when no checkpoint is given (cached by a hash of this recipe)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    data: Optional[DataConfig] = None  # default: the experiment's data with every label
    seed: int = 0


class TeacherConfig(Strict):
    """A teacher: its model, and where its weights come from: a ``checkpoint`` file, a ``recipe`` to train it, or
    neither when the model loads trained weights of its own (``hf_causal_lm``, a fine-tuned Hugging Face folder;
    checked against the model registry by :mod:`kdray.experiment.preflight`)."""

    model: ModelSpec
    checkpoint: Optional[str] = None
    recipe: Optional[TeacherRecipe] = None
    weight: float = Field(1.0, gt=0)  # its share of the soft targets when there are extra_teachers

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.checkpoint is not None and self.recipe is not None:
            raise ValueError("give at most one of teacher.checkpoint (a file) or teacher.recipe (train it)")
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
    """The teacher-output cache (:mod:`kdray.core.cache`), used by offline distillation without augmentation."""

    enabled: bool = True
    dtype: Literal["float32", "float16"] = "float32"  # of stored layer outputs (logits stay float32)
    # full layer outputs (all splits) above this many MB are stored in float16; still above it, not cached
    max_feature_mb: float = Field(2048.0, gt=0)
    # of the pooled outputs that probes read: auto is float16 for language-model teachers (hf_causal_lm), else float32;
    # a float16 column whose values exceed float16's range (65504) is stored in float32 instead, with a warning
    pooled_dtype: Literal["auto", "float32", "float16"] = "auto"
    # Ray actors that run the teacher pass (kdray.search.teacher_pass): N, or "auto" (one per GPU of the
    # cluster, else 1); 1 runs it in this process, as without Ray
    workers: int | Literal["auto"] = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError("a whole number of Ray actors (1 or more), or 'auto' (one per GPU of the cluster, else 1)")
        return v


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


# ---------------------------------------------------------------------------------------------
# reading YAML files: UTF-8 text of bounded size, no duplicate keys, no alias bombs, finite numbers


