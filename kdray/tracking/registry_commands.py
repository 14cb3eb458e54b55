"""The registered students of the MLflow Model Registry from the command line: :func:`promote` moves an alias
(``champion``) with checks and provenance tags (``kdray promote``); :func:`list_models` is ``kdray models list``.
Neither loads Ray, Optuna or a model."""
from __future__ import annotations

import datetime
import math
import os
from typing import Any, Optional

import pandas as pd

from kdray.errors import ConfigError, first_line
from kdray.redact import mask
from kdray.tracking.client import CHALLENGER, connect, not_found, quote, resolve_tracking_uri


def promote(name: str, alias: str, version: Optional[str] = None, from_alias: Optional[str] = None,
            tracking_uri: Optional[str] = None, force: bool = False,
            metric: str = "val_acc") -> tuple[Any, Optional[str]]:
    """Point ``alias`` of registered model ``name`` at ``version`` (or at the version ``from_alias``
    points to; default ``challenger``). Returns (the model version, the version the alias had before).

    A candidate whose ``metric`` tag (validation accuracy) is below that of the version ``alias`` points
    to now is refused unless ``force``. The promoted version gets tags saying who moved the alias, when,
    and from which version; nothing changes when a check fails.
    """
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    aliases = dict(registered_model(client, name, tracking_uri).aliases or {})
    if version is not None:
        mv, field, value = _version(client, name, version), "--version", version
    else:
        from_alias = from_alias or CHALLENGER
        if from_alias not in aliases:
            raise ConfigError("--from-alias", from_alias, f"an alias of {name}: "
                                                          f"{', '.join(f'{a} (v{v})' for a, v in aliases.items()) or 'none set'}")
        mv, field, value = client.get_model_version(name, str(aliases[from_alias])), "--from-alias", from_alias
    before = aliases.get(alias)
    if before is not None and str(before) != str(mv.version) and not force:
        _check_not_worse(client, name, alias, str(before), mv, metric, field, value)
    try:
        client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise ConfigError("--alias", alias, f"a valid alias name (not 'latest' or v<number>): "
                                            f"{first_line(e, 200)}") from None
    stamp = {f"kdray.{alias}.promoted_by": _who(), f"kdray.{alias}.promoted_at": _now(),
             f"kdray.{alias}.previous_version": str(before) if before is not None else "none"}
    if force:
        stamp[f"kdray.{alias}.forced"] = "true"
    for k, v in stamp.items():
        client.set_model_version_tag(name, str(mv.version), k, v)
    return mv, (str(before) if before is not None else None)


def _version(client: Any, name: str, version: str) -> Any:
    """Version ``version`` of ``name``, or a ConfigError listing its versions."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if not not_found(e) and "INVALID_PARAMETER" not in str(getattr(e, "error_code", "")):
            raise
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{quote(name)}'")), key=int)
    raise ConfigError("--version", version, f"a version of {name}: {', '.join(versions) or 'none'}")


def _check_not_worse(client: Any, name: str, alias: str, before: str, mv: Any, metric: str, field: str,
                     value: str) -> None:
    """A ConfigError when the candidate ``mv``'s ``metric`` tag is below that of the version ``alias`` holds."""
    current = client.get_model_version(name, before)
    new_v, old_v = _metric_tag(mv, metric), _metric_tag(current, metric)
    if new_v is not None and old_v is not None and new_v < old_v:
        raise ConfigError(field, value, f"a version whose {metric} is at least that of {name}@{alias} (version "
                                        f"{before}, {metric} {old_v:.4f}; version {mv.version} has {new_v:.4f}); "
                                        f"pass --force to promote it anyway")


def registered_model(client: Any, name: str, tracking_uri: Optional[str]) -> Any:
    """The registered model ``name``, or a ConfigError listing the models that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not not_found(e):
            raise
    names = [m.name for m in client.search_registered_models(max_results=20)]
    raise ConfigError("NAME", name, f"a registered model in {mask(resolve_tracking_uri(tracking_uri)[0])}"
                                    f"{': ' + ', '.join(names) if names else ' (none is registered)'}")


def _metric_tag(mv: Any, metric: str) -> Optional[float]:
    try:
        v = float((mv.tags or {}).get(metric, "nan"))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return os.environ.get("USER", "unknown")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def list_models(name: Optional[str] = None, tracking_uri: Optional[str] = None) -> pd.DataFrame:
    """One row per version of ``name`` (or of every registered model): aliases, key metrics, created."""
    client = connect(tracking_uri)
    models = ([registered_model(client, name, tracking_uri)] if name is not None
              else list(client.search_registered_models(max_results=1000)))
    rows = []
    for m in models:
        by_version: dict[str, list[str]] = {}
        for a, v in (m.aliases or {}).items():
            by_version.setdefault(str(v), []).append(a)
        for v in client.search_model_versions(f"name = '{quote(m.name)}'"):
            t = v.tags or {}
            rows.append({"model": m.name, "version": int(v.version),
                         "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
                         "val_acc": _num(t.get("val_acc")), "test_acc": _num(t.get("test_acc")),
                         "method": t.get("method", ""), "student_params": int(_num(t.get("student_params")) or 0) or None,
                         "search": t.get("search", ""),
                         "created": datetime.datetime.fromtimestamp(v.creation_timestamp / 1000,
                                                                    datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")})
    cols = ["model", "version", "aliases", "val_acc", "test_acc", "method", "student_params", "search", "created"]
    return pd.DataFrame(rows, columns=cols).sort_values(["model", "version"], ascending=[True, False],
                                                        ignore_index=True)


def _num(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
