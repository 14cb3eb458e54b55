"""Search space files: which dimensions a search explores, and how a trial's values become a config.

A space YAML names a base experiment config and the dimensions to search:

* ``methods`` — the method dimension. Each entry is a list of term templates (the trial's
  ``distill.terms``); any value inside a template may be a dimension, and those dimensions exist only
  when that method is drawn (conditional, Optuna define-by-run). ``pair`` in a template sets
  ``teacher_layers`` and ``student_layers`` together from a ``[teacher, student]`` choice.
* ``params`` — other dimensions by dotted config path (``train.optimizer.lr``, ``distill.ce_weight``).

A dimension is ``{choice: [...]}``, ``{float: [low, high], log: bool, step: x}`` or
``{int: [low, high], log: bool}``; anything else is a constant. :func:`check_space` validates the whole
space before a trial starts: every value against the config rules and every layer against the real
model architectures on one batch.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from kdray.config import ExperimentConfig, Strict, check_run_name, config_error_from, read_yaml, set_dotted
from kdray.core.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from kdray.errors import ConfigError
from kdray.experiment.configs import absolute_paths, load_config, parse_config
from kdray.experiment.preflight import check_data, check_devices, check_models, check_teacher_sources
from kdray.experiment.teachers import ensemble_architecture, load_model

DIM_KEYS = {"choice", "float", "int", "log", "step"}


class Dim(Strict):
    choice: Optional[list[Any]] = None
    float_: Optional[tuple[float, float]] = Field(None, alias="float")
    int_: Optional[tuple[int, int]] = Field(None, alias="int")
    log: bool = False
    step: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> "Dim":
        kinds = [k for k in (self.choice, self.float_, self.int_) if k is not None]
        if len(kinds) != 1:
            raise ValueError("a dimension has exactly one of choice, float or int")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one option")
        rng = self.float_ or self.int_
        if rng is not None:
            if rng[0] >= rng[1]:
                raise ValueError(f"range [{rng[0]}, {rng[1]}] needs low < high")
            if self.log and rng[0] <= 0:
                raise ValueError(f"a log range needs low > 0, got {rng[0]}")
        return self

    def corners(self) -> list[Any]:
        """The values checked before the search: every choice, or both ends of a range."""
        return list(self.choice) if self.choice is not None else list(self.float_ or self.int_)

    def suggest(self, trial: Any, name: str) -> Any:
        if self.choice is not None:
            encoded = [_encode(c) for c in self.choice]
            return _decode(trial.suggest_categorical(name, encoded))
        if self.int_ is not None:
            return trial.suggest_int(name, self.int_[0], self.int_[1], log=self.log)
        return trial.suggest_float(name, self.float_[0], self.float_[1], log=self.log, step=self.step)


def _encode(v: Any) -> Any:
    """Optuna choices must be scalars: lists/dicts travel as JSON strings."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else "json:" + json.dumps(v)


def _decode(v: Any) -> Any:
    return json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v


# the only teacher settings a search may vary: the mixing weights of an ensemble (kdray.core.signals.TeacherEnsemble
# mixes cached member outputs per trial, so the teachers themselves stay shared)
MIX_WEIGHT = re.compile(r"teacher\.weight|extra_teachers\.\d+\.weight")


def is_dim(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and set(v) <= DIM_KEYS and bool({"choice", "float", "int"} & set(v))


class SearchSettings(Strict):
    """Defaults for ``kdray search`` options (the command line overrides them)."""
    num_trials: int = Field(16, ge=1)
    concurrency: int = Field(2, ge=1)
    max_epochs: Optional[int] = Field(None, ge=1)  # default: the base config's train.epochs
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2, gt=1)
    searcher: Literal["tpe", "random"] = "tpe"
    tpe_startup_trials: int = Field(10, ge=1)  # random trials before TPE models the space (Optuna's default)
    seed: int = 0
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(1, ge=0)  # retries of a failed trial, from its last checkpoint
    # a trial checkpoints at ASHA's rungs, after its last epoch, and after any epoch that ends this long or longer
    # after its previous checkpoint (0: after every epoch); epochs longer than this are all checkpointed
    checkpoint_every_s: float = Field(0.5, ge=0)
    reuse_actors: bool = True  # one trial process runs trial after trial (Tune's actor reuse)
    # trials to run first (known-good settings): parameter name -> value; dimensions left out are sampled
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)


OBJECTIVE_METRICS = ("student_params", "latency_ms", "student_gzip_bytes", "val_acc", "test_acc",
                     *(f"{v}_{m}" for v in ("float", "pruned", "int8")
                       for m in ("size_bytes", "gzip_bytes", "latency_ms", "test_acc")))


class Objective(Strict):
    """A further objective of a multi-objective search (the first is the space's ``metric``)."""
    metric: Literal[OBJECTIVE_METRICS]  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "min"


class SearchSpace(Strict):
    name: str
    base: str  # experiment config, relative to the space file
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    # more objectives make a multi-objective search: Optuna samples for the Pareto front (no ASHA)
    objectives: list[Objective] = Field(default_factory=list)
    methods: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    search: SearchSettings = Field(default_factory=SearchSettings)
    registered_model: Optional[str] = None  # MLflow registered model name (default "<experiment>-student")

    _name = field_validator("name")(classmethod(lambda cls, v: check_run_name(v)))

    def model_name(self, experiment: Optional[str] = None) -> str:
        """The MLflow registered model its students go to: ``registered_model``, else ``<experiment>-student``
        (the MLflow experiment, by default the space's name). Refused (ConfigError) when MLflow would refuse it,
        naming the field it comes from."""
        if self.registered_model is not None:
            name, field = self.registered_model, "registered_model"
        else:
            name, field = f"{experiment or self.name}-student", "--experiment" if experiment else "name"
        if not name.strip() or name.strip() in (".", "..") or any(c in name for c in "/:"):
            raise ConfigError(field, name, "an MLflow registered model name: not empty, without '/' or ':'")
        return name

    @model_validator(mode="after")
    def _model_name(self) -> "SearchSpace":
        self.model_name()
        return self

    @property
    def metrics(self) -> list[str]:
        return [self.metric] + [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [self.mode] + [o.mode for o in self.objectives]


# --------------------------------------------------------------------------------------------------
# the dimensions of a space


def _walk(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) for every leaf of a template; dimensions are leaves."""
    if is_dim(tree) or not isinstance(tree, (dict, list)):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, path + (k,))
    else:
        for i, v in enumerate(tree):
            yield from _walk(v, path + (i,))


def _field(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def dimensions(space: SearchSpace) -> dict[str, tuple[str, Dim]]:
    """Every dimension: trial parameter name -> (field in the space file, parsed Dim).

    Names: ``method``, ``<method>.<term index>.<key path>`` and the dotted config paths of ``params``.
    """
    dims: dict[str, tuple[str, Dim]] = {}

    def parse(field: str, raw: dict) -> Dim:
        try:
            return Dim.model_validate(raw)
        except ValidationError as e:
            err = config_error_from(e, root=Dim)
            raise ConfigError(field, raw, err.allowed) from None

    if space.methods:
        dims["method"] = ("methods", Dim(choice=list(space.methods)))
    for m, terms in space.methods.items():
        for path, value in _walk(terms):
            if is_dim(value):
                name = ".".join([m, *map(str, path)])
                dims[name] = (f"methods.{m}{_field(path)}", parse(f"methods.{m}{_field(path)}", value))
    for key, value in space.params.items():
        if key.split(".")[0] in ("data", "teacher", "extra_teachers", "cache_dir", "output_dir") and \
                not MIX_WEIGHT.fullmatch(key):
            raise ConfigError(f"params.{key}", value, "a student, distill or train setting, or a teacher's share of "
                                                      "an ensemble (teacher.weight, extra_teachers.N.weight): one "
                                                      "search shares one data set and one set of teachers")
        if is_dim(value):
            dims[key] = (f"params.{key}", parse(f"params.{key}", value))
    return dims


class DefineByRun:
    """The Optuna define-by-run function: method first, then only that method's dimensions.

    A class, not a closure, so Ray can pickle the searcher's state for ``--resume``.
    """

    def __init__(self, space: SearchSpace):
        self.space = space
        self.dims = dimensions(space)

    def __call__(self, trial: Any) -> None:
        method = self.dims["method"][1].suggest(trial, "method") if "method" in self.dims else None
        for name, (_, dim) in self.dims.items():
            if name != "method" and (name in self.space.params or name.split(".")[0] == method):
                dim.suggest(trial, name)
        return None


def trial_raw(space: SearchSpace, base_raw: dict, values: dict[str, Any]) -> dict:
    """The experiment config dict of a trial: the base with the drawn values applied."""
    raw = copy.deepcopy(base_raw)
    raw["name"] = space.name
    if space.methods:
        method = values["method"]
        terms = copy.deepcopy(space.methods[method])
        for path, leaf in list(_walk(terms)):
            if is_dim(leaf):
                _set_path(terms, path, _decode(values[".".join([method, *map(str, path)])]))
        for term in terms:
            pair = term.pop("pair", None) if isinstance(term, dict) else None
            if pair is not None:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ConfigError(f"methods.{method}.pair", pair, "a [teacher_layer, student_layer] pair")
                term["teacher_layers"], term["student_layers"] = [pair[0]], [pair[1]]
        raw.setdefault("distill", {})["terms"] = terms
    for key, value in space.params.items():
        set_dotted(raw, key, _decode(values[key]) if is_dim(value) else value)
    return raw


def _set_path(tree: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------------
# loading and checking


def load_space(path: str | Path) -> tuple[SearchSpace, dict, Path]:
    """The parsed space, the base config dict, and the base config's folder."""
    raw = read_yaml(path, "search space")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise config_error_from(e, root=SearchSpace) from None
    base_path = (Path(path).parent / space.base).resolve()
    if not base_path.is_file():
        raise ConfigError("base", space.base, f"an experiment config file (looked for {base_path})")
    base_raw = absolute_paths(read_yaml(base_path, "base"))
    check_searchable(space, dimensions(space))  # dimension syntax errors surface in dimensions()
    return space, base_raw, base_path.parent


def check_searchable(space: SearchSpace, dims: dict[str, tuple[str, Dim]]) -> None:
    """Refuse an empty space (every trial would be the same config) and ``params`` that contradict ``methods``."""
    if space.methods:
        for key, value in space.params.items():
            if key == "distill" or key == "distill.terms" or key.startswith("distill.terms."):
                raise ConfigError(f"params.{key}", value, "a setting outside distill.terms: each entry of `methods` "
                                                          "sets the trial's terms (put term values, searched or not, "
                                                          "in the method's template)")
    varies = [n for n, (_, d) in dims.items()
              if d.choice is None or len({json.dumps(c, sort_keys=True, default=str) for c in d.choice}) > 1]
    if not varies:
        raise ConfigError("methods", list(space.methods), "a space with something to search: two or more methods, or "
                                                          "a dimension ({choice: [2+ values]}, {float: [low, high]}, "
                                                          "{int: [low, high]}) in a method's template or under params;"
                                                          " this space gives every trial the same config")


def initial_points(space: SearchSpace) -> list[dict[str, Any]]:
    """``search.points_to_evaluate`` checked against the dimensions and encoded as Optuna parameters."""
    dims = dimensions(space)
    points = []
    for i, point in enumerate(space.search.points_to_evaluate):
        field = f"search.points_to_evaluate[{i}]"
        method = point.get("method")
        owned = {n for n in dims if n == "method" or n in space.params or n.split(".")[0] == method}
        out = {}
        for name, value in point.items():
            if name not in owned:
                raise ConfigError(field, name, f"a dimension of this space{' for method ' + repr(method) if method else ''}:"
                                               f" {', '.join(sorted(owned)) or 'none'}")
            dim = dims[name][1]
            if dim.choice is not None:
                ok = value in dim.choice
                allowed = f"one of {dim.choice}"
            else:
                low, high = dim.float_ or dim.int_
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
                      and (dim.int_ is None or float(value).is_integer()))
                allowed = f"{'an integer' if dim.int_ else 'a number'} in [{low}, {high}]"
            if not ok:
                raise ConfigError(f"{field}.{name}", value, allowed)
            out[name] = _encode(value)
        points.append(out)
    return points


def corner_values(space: SearchSpace) -> Iterator[tuple[str, dict[str, Any]]]:
    """Trial values covering every choice and both ends of every range, one dimension at a time
    (the others at their first value): (field being varied, values)."""
    dims = dimensions(space)
    first = {n: d.corners()[0] for n, (_, d) in dims.items()}
    methods = list(space.methods) or [None]
    for m in methods:
        base = dict(first, method=m) if m is not None else dict(first)
        owned = [n for n in dims if n != "method" and (n in space.params or n.split(".")[0] == m)]
        yield (f"methods.{m}" if m else "params"), base
        for n in owned:
            for v in dims[n][1].corners():
                yield dims[n][0], dict(base, **{n: _encode(v)})
    for i, point in enumerate(initial_points(space)):
        yield f"search.points_to_evaluate[{i}]", dict(first, **point)


def choice_combinations(space: SearchSpace, base_raw: dict, base_dir: Path, limit: int = 1000
                        ) -> list[ExperimentConfig]:
    """The trial configs of every combination of each method's choice dimensions (ranges at their low
    end): all the layer / pooling / pairing combinations trials can draw, e.g. to cache what they need."""
    import itertools

    dims = dimensions(space)
    first = {n: _encode(d.corners()[0]) for n, (_, d) in dims.items()}
    out: list[ExperimentConfig] = []
    for m in list(space.methods) or [None]:
        owned = [n for n in dims if n != "method" and dims[n][1].choice is not None
                 and (n in space.params or (m is not None and n.split(".")[0] == m))]
        options = [[_encode(c) for c in dims[n][1].choice] for n in owned]
        for combo in itertools.islice(itertools.product(*options), limit):
            values = dict(first, **dict(zip(owned, combo)), **({"method": m} if m is not None else {}))
            out.append(parse_config(trial_raw(space, base_raw, values), base_dir))
    return out


def check_space(space: SearchSpace, base_raw: dict, base_dir: Path, trial_gpus: float = 0) -> list[ExperimentConfig]:
    """Validate every corner of the space (config rules; then devices, data, models and layers on one batch of
    real inputs, as :func:`kdray.experiment.preflight.check_experiment` does for one run). ``trial_gpus`` > 0: trials run where
    GPUs are, so their ``train.device`` is not checked against this machine.

    Returns the parsed configs of the corners, the first corner first. Raises ConfigError naming the space
    field.
    """

    checked: list[ExperimentConfig] = []
    for field, values in corner_values(space):
        try:
            cfg = parse_config(trial_raw(space, base_raw, values), base_dir)
        except ConfigError as e:
            raise ConfigError(f"{field} -> {e.field}", e.value, e.allowed) from None
        checked.append(cfg)
    first = checked[0]
    if trial_gpus == 0 and first.train.device.startswith("cuda"):
        raise ConfigError("train.device", first.train.device, "auto or cpu: the trials get no GPU "
                                                              "(--gpus-per-worker 0)")
    check_devices(first, student=False)
    check_teacher_sources(first)
    bundle = check_data(first)
    example = bundle.x_train[: min(8, len(bundle.x_train))]
    teacher = ensemble_architecture(first, bundle.num_classes) if first.teacher else None
    loaded = _checkpoint_teacher(first, bundle.num_classes)
    teacher = loaded if loaded is not None else teacher
    seen = set()
    for cfg in checked:
        key = json.dumps([cfg.student.model_dump(), cfg.distill.model_dump()], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_models(cfg, teacher, bundle, example)
        except ConfigError as e:
            raise ConfigError(f"{e.field} (trial values {_describe(cfg)})", e.value, e.allowed) from None
    return checked


def _checkpoint_teacher(cfg: ExperimentConfig, num_classes: int) -> Any:
    """Teacher checkpoints read before any tracking, Ray or cache work, so that a missing, corrupt or pickled file
    stops the search here. A single teacher from a checkpoint is returned as loaded (None otherwise): the layer
    checks then see its real output classes (a teacher of other classes than the data cannot do logit KD)."""

    extra = list(getattr(cfg, "extra_teachers", None) or [])
    for i, t in enumerate(extra):
        if getattr(t, "checkpoint", None):
            read_checkpoint(t.checkpoint, f"extra_teachers[{i}].checkpoint")
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        return None
    own = read_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint").get("format") == CHECKPOINT_FORMAT
    model = load_model(cfg.teacher.checkpoint, cfg.teacher.model, None if own else num_classes, "teacher.checkpoint")
    return None if extra else model


def _describe(cfg: ExperimentConfig) -> str:
    return "; ".join(f"{t.method} t={t.teacher_layers} s={t.student_layers}" for t in cfg.distill.terms) or "no terms"


def _scalar(v: Any) -> Any:
    v = _decode(v)
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def configs_of_file(path: str, cache_dir: str | None = None) -> list:
    """The experiment config at ``path``, or for a search space every config its trials can draw."""
    if cache_dir:
        os.environ["KDRAY_CACHE_DIR"] = cache_dir
    raw = read_yaml(path)
    if isinstance(raw, dict) and "base" in raw:
        space, base_raw, base_dir = load_space(path)
        return (check_space(space, base_raw, base_dir, trial_gpus=space.search.gpus_per_worker)
                + choice_combinations(space, base_raw, base_dir))
    return [load_config(path)]
