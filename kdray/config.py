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
import math
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
    if kind == "finite_number":
        return FINITE
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


OVERRIDE_FORM = "KEY=VALUE with a dotted key and a YAML value, e.g. train.epochs=5"


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of ``raw`` with dotted-path overrides applied (``a.b.0.c=value``).

    String values are parsed as YAML scalars/flow collections, so ``lr=1e-3`` gives a float. A bad
    ``--set`` text is a ConfigError whose field is ``--set`` and whose value is that text.
    """
    out = copy.deepcopy(raw)
    if isinstance(overrides, dict):
        for path, value in overrides.items():
            set_dotted(out, path, value)
        return out
    for text in overrides:
        try:
            set_dotted(out, *_split_override(text))
        except ConfigError as e:
            raise ConfigError("--set", text, e.allowed) from None
    return out


def _split_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, VALUE parsed as YAML)."""
    if "=" not in text:
        raise ConfigError("--set", text, OVERRIDE_FORM)
    key, val = text.split("=", 1)
    try:
        return key.strip(), parse_yaml(val, "--set", text, "the value")
    except ConfigError as e:
        raise ConfigError("--set", text, f"{OVERRIDE_FORM}; the value must be {e.allowed}") from None


def set_dotted(tree: dict, path: str, value: Any) -> None:
    """Set ``tree[a][b][0]... = value`` for ``path`` ``a.b.0...``, creating missing mappings on the way."""
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(path, value, f"a dotted key of non-empty parts, e.g. train.optimizer.lr (not {path!r})")
    node: Any = tree
    for i, part in enumerate(parts):
        key = _child_key(node, parts[: i + 1])
        if i == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def _child_key(node: Any, parts: list[str]) -> Any:
    """The key of ``parts[-1]`` inside ``node`` (the value at ``parts[:-1]``): a list index or a mapping key."""
    part, parent = parts[-1], ".".join(parts[:-1])
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(".".join(parts), part, f"a list index below {len(node)} after {parent} (not {part!r})")
        return int(part)
    if not isinstance(node, dict):
        raise ConfigError(".".join(parts), part, f"a path through mappings and lists: {parent} is {node!r} "
                                                 f"({type(node).__name__}), it has no {part!r}")
    return part


# ---------------------------------------------------------------------------------------------
# reading YAML files: UTF-8 text of bounded size, no duplicate keys, no alias bombs, finite numbers

MAX_YAML_BYTES = 1_000_000  # configs and spaces are a few kB; anything this big is a wrong file
MAX_YAML_VALUES = 50_000  # values in one document, each use of an alias (*name) counting its anchor's values
FINITE = "a finite number (not inf or nan; YAML reads .inf, .nan and numbers beyond 1.8e308 as such)"
_MERGE_TAG = "tag:yaml.org,2002:merge"
NUL = b"\x00"  # never in YAML text: the mark of a binary file


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, but refusing duplicate keys at any depth (YAML keeps the last one silently)
    and documents over MAX_YAML_VALUES values, aliases expanded: a "billion laughs" stops within a few
    thousand nodes. Merge keys (``<<: *base``) are allowed; keys written beside them override the merged ones."""

    def __init__(self, text: str, what: str, shown: Any, source: str):
        super().__init__(text)
        self.what, self.shown, self.source, self.composed = what, shown, source, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.composed += 1
        if self.composed > MAX_YAML_VALUES:
            raise self._too_big(())
        return super().compose_node(parent, index)

    def construct_document(self, node: Any) -> Any:
        self._expanded_size(node, (), {}, set())
        return super().construct_document(node)

    def _too_big(self, path: tuple) -> ConfigError:
        return ConfigError(_field_name(path) if path else self.what, self.shown,
                           f"at most {MAX_YAML_VALUES:,} values (each use of a YAML alias *name counts the values of "
                           f"its anchor: this looks like an alias bomb or a wrong file)")

    def _expanded_size(self, node: Any, path: tuple, sizes: dict, active: set) -> int:
        """The number of values under ``node`` with aliases expanded, memoised per node (linear time)."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(_field_name(path) if path else self.what, self.shown,
                              "a value that does not contain itself (a YAML alias inside its own anchor)")
        active.add(id(node))
        total = 1
        for child_path, child in self._children(node, path):
            total += self._expanded_size(child, child_path, sizes, active)
            if total > MAX_YAML_VALUES:
                raise self._too_big(path)
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    def _children(self, node: Any, path: tuple) -> list[tuple[tuple, Any]]:
        """(path, node) of the values inside a mapping or sequence node; refuses duplicate mapping keys."""
        if isinstance(node, yaml.SequenceNode):
            return [(path + (i,), v) for i, v in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return []
        out, first_line = [], {}
        for k, v in node.value:
            if k.tag == _MERGE_TAG:  # merged keys live in this mapping's namespace
                out += [(path, k), (path, v)]
                continue
            key = self.construct_object(k) if isinstance(k, yaml.ScalarNode) else k  # complex keys: never equal
            if key in first_line:
                where = _field_name(path + (key,))
                raise ConfigError(where, key, f"each key once per mapping ({where!r} is at lines {first_line[key]} "
                                              f"and {k.start_mark.line + 1} of {self.source}; YAML would silently "
                                              f"keep the last)")
            first_line[key] = k.start_mark.line + 1
            out += [(path + (key,), k), (path + (key,), v)]
        return out


def parse_yaml(text: str, what: str, shown: Any, source: str) -> Any:
    """``text`` parsed like ``yaml.safe_load`` with the checks of :class:`_StrictLoader`; any problem is a
    ConfigError on field ``what`` with value ``shown`` (a file path, an override) naming the line."""
    try:
        return _load(_StrictLoader(text, what, shown, source))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1} of {source}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).replace('"<unicode string>"', source)
        raise ConfigError(what, shown, f"valid YAML ({problem}{where})") from None
    except RecursionError:
        raise ConfigError(what, shown, "YAML nested at most a few hundred levels deep") from None


def _load(loader: _StrictLoader) -> Any:
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A user's YAML file as a dict: an existing, readable UTF-8 text file of at most MAX_YAML_BYTES holding one
    mapping, with no duplicate keys, alias bombs or non-finite numbers. ``what`` names the file in errors."""
    p = Path(path)
    data = _read_bytes(p, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(what, str(path), f"UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}, line "
                                           f"{line}, is not UTF-8: save the file as UTF-8, not Latin-1 / "
                                           f"Windows-1252)") from None
    raw = parse_yaml(text, what, str(path), p.name)
    if raw is None:
        state = "empty" if not text.strip() else "only comments"
        raise ConfigError(what, str(path), f"a YAML mapping of settings (the file is {state})")
    if not isinstance(raw, dict):
        raise ConfigError(what, type(raw).__name__, "a YAML mapping at the top level")
    check_finite(raw)
    return raw


def _read_bytes(p: Path, what: str) -> bytes:
    """The bytes of a YAML text file; missing, directory, unreadable, huge and binary files are refused."""
    if p.is_dir():
        raise ConfigError(what, str(p), "a YAML file (this is a directory)")
    if not p.is_file():
        raise ConfigError(what, str(p), "an existing YAML file")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(what, str(p), f"a YAML file of at most {MAX_YAML_BYTES:,} bytes (this one has {size:,})")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(what, str(p), f"a readable YAML file ({e.strerror or e})") from None
    if NUL in data:
        raise ConfigError(what, str(p), f"a YAML text file (this one holds binary data: a NUL byte at position "
                                        f"{data.index(NUL)})")
    return data


def check_finite(tree: Any, path: tuple = ()) -> None:
    """Refuse inf and NaN anywhere in a config or space tree, free-form dicts (options, kwargs, params) included."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(_field_name(path), tree, FINITE)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        check_finite(v, path + (k,))


def parse_config(raw: dict, base_dir: str | Path | None = None) -> ExperimentConfig:
    """Validate a config dict; relative file paths resolve against ``base_dir``."""
    check_finite(raw)
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
