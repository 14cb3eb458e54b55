"""Pydantic validation errors as one :class:`~kdray.errors.ConfigError` naming the field, the value and what
is allowed: the one translation every config, space and option model uses."""
from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import BaseModel, ValidationError

from kdray.config.schema import ExperimentConfig
from kdray.errors import ConfigError

FINITE = "a finite number (not inf or nan; YAML reads .inf, .nan and numbers beyond 1.8e308 as such)"


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


def config_error_from(e: ValidationError, prefix: tuple = (), root: type[BaseModel] | None = None,
                      explain: Optional[Callable[[dict], str]] = None) -> ConfigError:
    """The first error of a pydantic ValidationError as a ConfigError; ``root`` is the validated model
    (default: ExperimentConfig), ``prefix`` the path of that model inside the whole config (its parts may be
    dotted: ``("teacher.recipe.data", "params")``). ``explain(error)``, when given, says what is allowed in
    place of the default wording (a registry entry's parameters, in their own words)."""
    err = e.errors()[0]
    value = err.get("input") if err["type"] != "missing" else "<missing>"
    allowed = explain(err) if explain is not None else _allowed(err, root or ExperimentConfig)
    return ConfigError(_field_name(tuple(prefix) + tuple(err["loc"])), value, allowed)
