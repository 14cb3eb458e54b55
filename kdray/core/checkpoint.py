"""The two checkpoint formats of kdray, written and read here only.

* The model file (``kdray-model-v1``): a weights-only dict of the model spec, the class count, the state dict
  and facts about it; :func:`kdray.experiment.teachers.load_model` rebuilds the model.
* The training state (``state.pt`` in a checkpoint folder, what a trial resumes from): the state dicts of the
  distiller (the student under ``student.*``, adapters under ``terms.*``), the optimizer and the LR scheduler
  (plus ``online_teacher`` and ``teacher_optimizer`` in the online scheme), the last ``epoch`` and the
  ``history`` of epoch metrics. :func:`training_state` makes it, :func:`restore_training_state` loads it
  back into the objects, :func:`save_state` / :func:`load_state` put it in a folder and take it out
  (weights only), :func:`student_weights` picks the student's state dict out of it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdray import __version__
from kdray.config import ModelSpec
from kdray.errors import ConfigError, KdrayError, first_line
from kdray.paths import atomic_write_bytes

CHECKPOINT_FORMAT = "kdray-model-v1"


def model_checkpoint(model: nn.Module, spec: ModelSpec, num_classes: int, meta: dict | None = None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "kdray_version": __version__, "model": spec.model_dump(mode="json"),
            "num_classes": num_classes, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta or {}}


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, num_classes: int, meta: dict | None = None) -> Path:
    buf = io.BytesIO()
    torch.save(model_checkpoint(model, spec, num_classes, meta), buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def read_checkpoint(path: str | Path, field: str = "checkpoint") -> dict:
    """Load a weights-only file; a missing, corrupt or pickled-object file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, str(path), "an existing checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ConfigError(field, str(path), f"a weights-only checkpoint (torch.save of a state_dict or a kdray "
                                            f"model file); loading failed: {first_line(e, 200)}") from None
    if not isinstance(obj, dict):
        raise ConfigError(field, str(path), "a checkpoint holding a dict (state_dict or kdray model file)")
    return obj


# --------------------------------------------------------------------------------------------------
# the training state (state.pt)

STATE_FILE = "state.pt"
STUDENT_PREFIX = "student."  # the student's keys in the distiller's state dict


def training_state(epoch: int, history: list[dict[str, float]], parts: dict[str, Optional[Any]]) -> dict[str, Any]:
    """The ``torch.save``-able state after ``epoch``: the state dict of each of ``parts`` (``distiller``,
    ``optimizer``, ``scheduler``, ``online_teacher``, ``teacher_optimizer``; None ones are left out)."""
    state = {name: obj.state_dict() for name, obj in parts.items() if obj is not None}
    return {**state, "epoch": epoch, "history": history}


def restore_training_state(state: dict[str, Any], parts: dict[str, Optional[Any]]) -> tuple[int, list[dict]]:
    """Load ``state`` into each of ``parts`` (None ones skipped); the epoch it ends with and its history."""
    for name, obj in parts.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    return state["epoch"], list(state["history"])


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``<folder>/state.pt``; its path."""
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state in ``<folder>/state.pt`` (weights only, on the CPU); a KdrayError when it is missing."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise KdrayError(f"checkpoint {folder} has no {STATE_FILE}")
    return torch.load(path, map_location="cpu", weights_only=True)


def student_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student's state dict in a training state (the distiller's keys under ``student.``)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.get("distiller", {}).items() if k.startswith(STUDENT_PREFIX)}
