"""The model-file format (``kdray-model-v1``): a weights-only dict of the model spec, the class count, the
state dict and facts about it. Written and read here only; :func:`kdray.experiment.teachers.load_model`
rebuilds the model."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from kdray import __version__
from kdray.config import ModelSpec
from kdray.errors import ConfigError, first_line
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
