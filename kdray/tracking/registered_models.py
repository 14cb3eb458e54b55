"""The best students of a search in the MLflow Model Registry, and ``kdray promote``.

A trial's student is rebuilt from its last checkpoint (a :class:`FinishedTrial` opens it): ``state.pt`` holds the distiller's state
dict, in which the student is under ``student.*`` (adapters under ``terms.*``, probes and teacher are
not in it and are not registered); the architecture comes from the trial's config. It is logged with
``mlflow.pytorch.log_model`` in the trial's child run ("pt2" / ``torch.export`` with a batch-of-2 input
example so the batch dimension stays dynamic; "pickle" plus the kdray code if export fails), then
registered as a new version of the search's registered model with tags describing the trial. The
registration of one search is all or nothing: a failure deletes the versions (and the registered
model) this call created. :func:`promote` moves aliases (``champion``) with checks and provenance tags;
:func:`list_models` is ``kdray models list``.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from kdray.core.checkpoint import STATE_FILE, load_state, student_weights
from kdray.core.compress import quantize_int8
from kdray.core.methods import build_terms
from kdray.core.train import term_names
from kdray.errors import ConfigError, KdrayError
from kdray.experiment.configs import parse_config
from kdray.experiment.space import _scalar, trial_raw
from kdray.models import build_model, count_parameters
from kdray.redact import mask
from kdray.tracking.client import connect, resolve_tracking_uri, use_tracking_uri

log = logging.getLogger("kdray")

CHALLENGER = "challenger"
MODEL_NAME = "student"  # the model's name inside its run
REGISTERED_TAG = "kdray.registered_model"  # on a trial's run: "<registered model>/<version>"


# --------------------------------------------------------------------------------------------------
# rebuilding a trial's student (plain PyTorch)


@dataclass
class FinishedTrial:
    """What registration needs of a trial, from whatever ran it (the search driver makes these from Tune's
    results): its searched values, its last metrics, and its last checkpoint opened as a local folder."""

    config: dict
    metrics: dict
    checkpoint: Callable[[], ContextManager[Path]]


def student_from_checkpoint(ckpt_dir: str | Path, cfg: Any, num_classes: int) -> nn.Module:
    """The trained student of a trial, in eval mode, from its checkpoint folder and its config."""
    weights = student_weights(load_state(ckpt_dir))
    if not weights:
        raise KdrayError(f"checkpoint {Path(ckpt_dir) / STATE_FILE} holds no student weights "
                         "(no 'distiller' keys under 'student.')")
    model = build_model(cfg.student, num_classes)
    model.load_state_dict(weights)
    return model.eval()


def trial_config(tracker: Any, values: dict) -> Any:

    return parse_config(trial_raw(tracker.space, tracker.base_raw, values), tracker.base_dir)


def describe_terms(cfg: Any) -> dict[str, str]:
    """Methods, layers, temperatures and weights of a config's distillation terms, as tag values."""
    built = build_terms(cfg.distill.terms, cfg.distill.temperature)
    names = term_names([t.method for t, _, _ in built])
    layers = [f"{n}: {','.join(t.teacher_layers) or '-'} -> {','.join(t.student_layers) or '-'}"
              for n, (t, _, _) in zip(names, built) if t.teacher_layers or t.student_layers]
    temps = [f"{n}={m.temperature:g}" for n, (_, _, m) in zip(names, built) if getattr(m, "uses_temperature", False)]
    weights = [f"ce={cfg.distill.ce_weight:g}"] + [f"{n}={w:g}" for n, (_, w, _) in zip(names, built)]
    return {"terms": "+".join(names) or "none (labels only)", "layers": "; ".join(layers) or "-",
            "temperature": "; ".join(temps) or "-", "weights": ", ".join(weights)}


# --------------------------------------------------------------------------------------------------
# MLflow


def _missing(e: BaseException) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def log_student(model: nn.Module, example: np.ndarray, run_id: str, uri: str) -> tuple[Any, str]:
    """Log ``model`` as an MLflow PyTorch model in run ``run_id``; (ModelInfo, serialization format)."""
    import mlflow
    from mlflow.models import infer_signature


    model = model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(example)).numpy()
    signature = infer_signature(example, out)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]
    with use_tracking_uri(uri):
        try:
            info = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, signature=signature,
                                            input_example=example, pip_requirements=reqs, serialization_format="pt2")
            return info, "pt2"
        except Exception as e:  # noqa: BLE001 - torch.export cannot trace every model
            log.warning("torch.export of the student failed (%s); logging it with pickle instead", str(e)[:200])
        import kdray

        info = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, signature=signature,
                                        input_example=example, pip_requirements=reqs, serialization_format="pickle",
                                        code_paths=[str(Path(kdray.__file__).parent)])
        return info, "pickle"


def register_trials(tracker: Any, trials: dict[str, FinishedTrial], table: pd.DataFrame, top: int, name: str,
                    example: np.ndarray, alias: str = CHALLENGER) -> list[dict]:
    """Register the students of the ``top`` best finished trials as versions of ``name``.

    The best becomes the newest version and gets ``alias`` (``challenger``). A trial already registered
    under ``name`` (a resumed search) keeps its version. All or nothing: on failure, the versions and the
    registered model created here are deleted and the error is raised.
    """

    # MLflow's SQL registry store looks logged models up through the global tracking URI
    with use_tracking_uri(tracker.uri):
        return _register_trials(tracker, trials, table, top, name, example, alias)


def _register_trials(tracker: Any, results: dict[str, FinishedTrial], table: pd.DataFrame, top: int, name: str, example: np.ndarray,
                     alias: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    space = tracker.space
    client = tracker.client
    metric = space.metric
    fin = table[table["status"] == "finished"] if not table.empty else table
    if fin.empty:
        log.warning("no finished trial: nothing to register")
        return []
    fin = fin.sort_values(metric, ascending=space.mode == "min", na_position="last").head(top)
    created_model = False
    created: list[str] = []  # versions, logged model ids and tagged runs made here: undone on failure
    logged: list[str] = []
    tagged: list[tuple[str, Optional[str]]] = []  # (run id, its tag before)
    out: list[dict] = []
    try:
        try:
            client.get_registered_model(name)
        except MlflowException as e:
            if not _missing(e):
                raise
            try:
                client.create_registered_model(name, tags={"kdray.search": space.name},
                                               description=f"students distilled by kdray search {space.name!r}")
                created_model = True
            except MlflowException as e2:  # registered meanwhile by another search
                if "ALREADY_EXISTS" not in str(getattr(e2, "error_code", "")):
                    raise
        for rank in range(len(fin), 0, -1):  # worst of the top first, so the best is the newest version
            row = fin.iloc[rank - 1]
            tid = str(row["trial_id"])
            run_id = tracker.children.get(tid) or tracker._child_for(tid)
            if run_id is None:
                raise KdrayError(f"trial {tid} has no MLflow run under parent {tracker.parent_run_id}")
            found = client.search_model_versions(f"name = '{_q(name)}' and run_id = '{run_id}'")
            fmt = "existing"
            if found:
                mv = max(found, key=lambda v: int(v.version))
            else:
                values = dict(results[tid].config or {})
                cfg = trial_config(tracker, values)
                with results[tid].checkpoint() as d:
                    student = student_from_checkpoint(d, cfg, tracker.num_classes)

                n_params = count_parameters(student)
                if cfg.export.quantize:  # the trial exported int8: that is the student to ship

                    student = quantize_int8(student)
                info, fmt = log_student(student, example, run_id, tracker.uri)
                logged.append(info.model_id)

                tags = {"teacher": tracker.teacher, "method": str(_scalar(values.get("method", "-"))),
                        **describe_terms(cfg), metric: _fmt(row.get(metric)), "val_acc": _fmt(row.get("val_acc")),
                        "test_acc": _fmt(row.get("test_acc")), "student_params": str(n_params),
                        "student": cfg.student.name, "parent_run_id": tracker.parent_run_id, "run_id": run_id,
                        "trial_id": tid, "search": space.name, "rank": str(rank), "serialization": fmt,
                        "variant": "int8" if cfg.export.quantize else "pruned" if cfg.export.sparsity else "float",
                        "trial_params": ", ".join(f"{k}={_scalar(v)}" for k, v in values.items())[:5000],
                        # compressed variants measured by the trial (export.sparsity / export.quantize)
                        **{k: _fmt(v) for k, v in (results[tid].metrics or {}).items()
                           if k.split("_")[0] in ("float", "pruned", "int8")}}
                mv = client.create_model_version(
                    name, source=info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags,
                    description=f"student of trial {tid} (rank {rank} by {metric}) of search {space.name!r}")
                created.append(str(mv.version))
                tagged.append((run_id, client.get_run(run_id).data.tags.get(REGISTERED_TAG)))
                client.set_tag(run_id, REGISTERED_TAG, f"{name}/{mv.version}")
            if rank == 1:
                client.set_registered_model_alias(name, alias, mv.version)
            out.append({"name": name, "version": str(mv.version), "trial_id": tid, "run_id": run_id, "rank": rank,
                        "alias": alias if rank == 1 else None, "format": fmt})
            log.info("registered %s version %s from trial %s%s", name, mv.version, tid,
                     f" (alias {alias})" if rank == 1 else "")
    except BaseException:
        _rollback(client, name, created, created_model, logged, tagged)
        raise
    return sorted(out, key=lambda r: r["rank"])


def _rollback(client: Any, name: str, versions: list[str], model: bool, logged: list[str],
              tagged: list[tuple[str, Optional[str]]]) -> None:
    for v in versions:
        with contextlib.suppress(Exception):
            client.delete_model_version(name, v)
    for model_id in logged:
        with contextlib.suppress(Exception):
            client.delete_logged_model(model_id)
    for run_id, before in tagged:
        with contextlib.suppress(Exception):
            if before is None:
                client.delete_tag(run_id, REGISTERED_TAG)
            else:
                client.set_tag(run_id, REGISTERED_TAG, before)
    if model:
        with contextlib.suppress(Exception):
            if not client.search_model_versions(f"name = '{_q(name)}'"):
                client.delete_registered_model(name)
    removed = ([f"version(s) {', '.join(versions)} of {name}"] if versions else []) + \
        ([f"the registered model {name}"] if model else [])
    if removed:
        log.warning("registration failed: removed %s", " and ".join(removed))


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.6g}" if isinstance(v, float) else str(v))


def _q(s: str) -> str:
    return str(s).replace("'", "\\'")


# --------------------------------------------------------------------------------------------------
# kdray promote


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
    model = registered_model(client, name, tracking_uri)
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{_q(name)}'")), key=int)
    aliases = dict(model.aliases or {})
    if version is not None:
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as e:
            if not _missing(e) and "INVALID_PARAMETER" not in str(getattr(e, "error_code", "")):
                raise
            raise ConfigError("--version", version, f"a version of {name}: {', '.join(versions) or 'none'}") from None
    else:
        from_alias = from_alias or CHALLENGER
        if from_alias not in aliases:
            raise ConfigError("--from-alias", from_alias, f"an alias of {name}: "
                                                          f"{', '.join(f'{a} (v{v})' for a, v in aliases.items()) or 'none set'}")
        mv = client.get_model_version(name, str(aliases[from_alias]))
    before = aliases.get(alias)
    if before is not None and str(before) != str(mv.version) and not force:
        current = client.get_model_version(name, str(before))
        new_v, old_v = _metric_tag(mv, metric), _metric_tag(current, metric)
        if new_v is not None and old_v is not None and new_v < old_v:
            raise ConfigError("--version" if version is not None else "--from-alias", version or from_alias,
                              f"a version whose {metric} is at least that of {name}@{alias} (version {before}, "
                              f"{metric} {old_v:.4f}; version {mv.version} has {new_v:.4f}); pass --force to "
                              f"promote it anyway")
    try:
        client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise ConfigError("--alias", alias, f"a valid alias name (not 'latest' or v<number>): "
                                            f"{str(e).splitlines()[0][:200]}") from None
    stamp = {f"kdray.{alias}.promoted_by": _who(), f"kdray.{alias}.promoted_at": _now(),
             f"kdray.{alias}.previous_version": str(before) if before is not None else "none"}
    if force:
        stamp[f"kdray.{alias}.forced"] = "true"
    for k, v in stamp.items():
        client.set_model_version_tag(name, str(mv.version), k, v)
    return mv, (str(before) if before is not None else None)


def registered_model(client: Any, name: str, tracking_uri: Optional[str]) -> Any:
    """The registered model ``name``, or a ConfigError listing the models that exist."""
    from mlflow.exceptions import MlflowException


    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _missing(e):
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
        for v in client.search_model_versions(f"name = '{_q(m.name)}'"):
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
