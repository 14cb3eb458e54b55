"""The best students of a search registered in the MLflow Model Registry (:func:`register_trials`).

A trial's student is rebuilt from its last checkpoint (a :class:`FinishedTrial` opens it): ``state.pt`` holds
the distiller's state dict, in which the student is under ``student.*`` (adapters under ``terms.*``, probes and teacher are
not in it and are not registered); the architecture comes from the trial's config. It is logged with
``mlflow.pytorch.log_model`` in the trial's child run ("pt2" / ``torch.export`` with a batch-of-2 input
example so the batch dimension stays dynamic; "pickle" plus the kdray code if export fails), then
registered as a new version of the search's registered model with tags describing the trial. The
registration of one search is all or nothing: a failure deletes the versions (and the registered
model) this call created (:class:`Registration`). ``kdray promote`` and ``kdray models list`` are in
:mod:`kdray.tracking.registry_commands`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
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
from kdray.errors import KdrayError, first_line
from kdray.experiment.configs import parse_config
from kdray.experiment.space import _scalar, trial_raw
from kdray.models import build_model, count_parameters
from kdray.tracking.client import CHALLENGER, not_found, quote, use_tracking_uri

log = logging.getLogger("kdray")

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


def token_signature(out: np.ndarray) -> Any:
    """The signature of a student reading token ids: (batch, tokens) int64 of any length (kdray pads with -1) to
    (batch, choices) float32."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
                          Schema([TensorSpec(np.dtype(out.dtype), (-1, out.shape[1]))]))


def log_student(model: nn.Module, example: np.ndarray, run_id: str, uri: str) -> tuple[Any, str]:
    """Log ``model`` as an MLflow PyTorch model in run ``run_id``; (ModelInfo, serialization format)."""
    import mlflow
    from mlflow.models import infer_signature


    model = model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(example)).numpy()
    tokens = example.ndim == 2 and np.issubdtype(example.dtype, np.integer)
    signature = token_signature(out) if tokens else infer_signature(example, out)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]
    if tokens and "transformers" in sys.modules:
        reqs.append(f"transformers=={sys.modules['transformers'].__version__}")
    with use_tracking_uri(uri):
        try:
            if tokens:  # torch.export would fix the sequence length of the example
                raise ValueError("token ids of any length: logged with pickle")
            info = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, signature=signature,
                                            input_example=example, pip_requirements=reqs, serialization_format="pt2")
            return info, "pt2"
        except Exception as e:  # noqa: BLE001 - torch.export cannot trace every model
            log.log(logging.INFO if tokens else logging.WARNING, "torch.export of the student not used (%s); logging "
                    "it with pickle instead", first_line(e, 200))
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
    space = tracker.space
    fin = table[table["status"] == "finished"] if not table.empty else table
    if fin.empty:
        log.warning("no finished trial: nothing to register")
        return []
    fin = fin.sort_values(space.metric, ascending=space.mode == "min", na_position="last").head(top)
    # MLflow's SQL registry store looks logged models up through the global tracking URI
    with use_tracking_uri(tracker.uri):
        reg = Registration(tracker, trials, name, example)
        try:
            reg.find_or_create_model()
            # worst of the top first, so that the best is the newest version
            out = [reg.register(rank, fin.iloc[rank - 1], alias if rank == 1 else None)
                   for rank in range(len(fin), 0, -1)]
        except BaseException:
            reg.roll_back()
            raise
    return sorted(out, key=lambda r: r["rank"])


class Registration:
    """One all-or-nothing registration of a search's students as versions of registered model ``name``: what it
    creates (the registered model, logged models, versions, run tags) is kept so that :meth:`roll_back` can
    undo it."""

    def __init__(self, tracker: Any, trials: dict[str, FinishedTrial], name: str, example: np.ndarray):
        self.tracker, self.trials, self.name, self.example = tracker, trials, name, example
        self.client = tracker.client
        self.created_model = False
        self.versions: list[str] = []
        self.logged: list[str] = []  # logged model ids
        self.tagged: list[tuple[str, Optional[str]]] = []  # (run id, its tag before)

    def find_or_create_model(self) -> None:
        from mlflow.exceptions import MlflowException

        space = self.tracker.space
        try:
            self.client.get_registered_model(self.name)
            return
        except MlflowException as e:
            if not not_found(e):
                raise
        try:
            self.client.create_registered_model(self.name, tags={"kdray.search": space.name},
                                                description=f"students distilled by kdray search {space.name!r}")
            self.created_model = True
        except MlflowException as e:  # registered meanwhile by another search
            if "ALREADY_EXISTS" not in str(getattr(e, "error_code", "")):
                raise

    def register(self, rank: int, row: pd.Series, alias: Optional[str]) -> dict:
        """The version of the trial in ``row`` (its existing one, or a new one), ``alias`` pointed at it."""
        tid = str(row["trial_id"])
        run_id = self.tracker.trial_run_id(tid)
        if run_id is None:
            raise KdrayError(f"trial {tid} has no MLflow run under parent {self.tracker.parent_run_id}")
        found = self.client.search_model_versions(f"name = '{quote(self.name)}' and run_id = '{run_id}'")
        if found:
            mv, fmt = max(found, key=lambda v: int(v.version)), "existing"
        else:
            mv, fmt = self.log_student(tid, run_id, rank, row)
            self.tag_run(run_id, str(mv.version))
        if alias:
            self.client.set_registered_model_alias(self.name, alias, mv.version)
        log.info("registered %s version %s from trial %s%s", self.name, mv.version, tid,
                 f" (alias {alias})" if alias else "")
        return {"name": self.name, "version": str(mv.version), "trial_id": tid, "run_id": run_id, "rank": rank,
                "alias": alias, "format": fmt}

    def log_student(self, tid: str, run_id: str, rank: int, row: pd.Series) -> tuple[Any, str]:
        """(a new model version, its serialization): the trial's student, as it exported it, logged in its run."""
        t = self.tracker
        values = dict(self.trials[tid].config or {})
        cfg = trial_config(t, values)
        with self.trials[tid].checkpoint() as d:
            student = student_from_checkpoint(d, cfg, t.num_classes)
        n_params = count_parameters(student)
        if cfg.export.quantize:  # the trial exported int8: that is the student to ship
            student = quantize_int8(student)
        info, fmt = log_student(student, self.example, run_id, t.uri)
        self.logged.append(info.model_id)
        tags = {"teacher": t.teacher, "method": str(_scalar(values.get("method", "-"))), **describe_terms(cfg),
                **row_tags(row, t.space.metric), "student_params": str(n_params), "student": cfg.student.name,
                "parent_run_id": t.parent_run_id, "run_id": run_id, "trial_id": tid, "search": t.space.name,
                "rank": str(rank), "serialization": fmt,
                "variant": "int8" if cfg.export.quantize else "pruned" if cfg.export.sparsity else "float",
                "trial_params": ", ".join(f"{k}={_scalar(v)}" for k, v in values.items())[:5000],
                # compressed variants measured by the trial (export.sparsity / export.quantize)
                **{k: _fmt(v) for k, v in (self.trials[tid].metrics or {}).items()
                   if k.split("_")[0] in ("float", "pruned", "int8")}}
        mv = self.client.create_model_version(
            self.name, source=info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags,
            description=f"student of trial {tid} (rank {rank} by {t.space.metric}) of search {t.space.name!r}")
        self.versions.append(str(mv.version))
        return mv, fmt

    def tag_run(self, run_id: str, version: str) -> None:
        """Tag the trial's run with ``<registered model>/<version>`` (its tag before is kept for the rollback)."""
        self.tagged.append((run_id, self.client.get_run(run_id).data.tags.get(REGISTERED_TAG)))
        self.client.set_tag(run_id, REGISTERED_TAG, f"{self.name}/{version}")

    def roll_back(self) -> None:
        """Delete the versions, logged models and registered model made here; restore the runs' tags."""
        client, name = self.client, self.name
        for v in self.versions:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, v)
        for model_id in self.logged:
            with contextlib.suppress(Exception):
                client.delete_logged_model(model_id)
        for run_id, before in self.tagged:
            with contextlib.suppress(Exception):
                if before is None:
                    client.delete_tag(run_id, REGISTERED_TAG)
                else:
                    client.set_tag(run_id, REGISTERED_TAG, before)
        if self.created_model:
            with contextlib.suppress(Exception):
                if not client.search_model_versions(f"name = '{quote(name)}'"):
                    client.delete_registered_model(name)
        removed = ([f"version(s) {', '.join(self.versions)} of {name}"] if self.versions else []) + \
            ([f"the registered model {name}"] if self.created_model else [])
        if removed:
            log.warning("registration failed: removed %s", " and ".join(removed))


def row_tags(row: pd.Series, metric: str) -> dict[str, str]:
    """The trial's search metric, validation and test accuracy from its row of the trials table, as tag values."""
    return {metric: _fmt(row.get(metric)), "val_acc": _fmt(row.get("val_acc")), "test_acc": _fmt(row.get("test_acc"))}


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.6g}" if isinstance(v, float) else str(v))
