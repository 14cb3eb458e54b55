"""Up-front checks against the real data, models, devices and folders: what the config schema cannot see.

Each check raises a :class:`~kdray.errors.ConfigError` naming the config field (or command-line option), the
bad value and what is allowed, before any work starts: no teacher trained, no cache entry written, no Ray
started, no MLflow run opened. :func:`kdray.run.check_experiment` and :func:`kdray.space.check_space` run
them for ``kdray train`` and ``kdray search``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdray.data import DataBundle
from kdray.errors import ConfigError, first_line


def check_device(name: str, field: str) -> None:
    """``cuda``/``cuda:N``/``mps`` only where this torch can reach such a device (``auto`` always works)."""
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= n:
            have = f"cuda:0 .. cuda:{n - 1}" if n else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(field, name, f"auto or cpu, or a device this machine has: it has {have}")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(field, name, "auto or cpu: torch here has no MPS device (torch.backends.mps.is_available() "
                                       "is False)")


def check_bundle(b: DataBundle, field: str, needs_labels: bool) -> None:
    """Training examples, labelled ones when the loss needs them, test examples and at least 2 classes."""
    n = len(b.x_train) + len(b.x_val)
    if len(b.x_train) == 0:
        raise ConfigError(f"{field}.val_fraction", f"0 training examples of {n}",
                          "a split that leaves training examples: a lower val_fraction or more examples")
    if needs_labels and b.n_labelled == 0:
        raise ConfigError(f"{field}.label_fraction", f"0 labelled examples of {len(b.x_train)}",
                          "a label_fraction that leaves labelled training examples")
    if len(b.x_test) == 0:
        raise ConfigError(f"{field}.params", "0 test examples", "data with a test split (test accuracy is measured "
                                                                "on it)")
    if b.num_classes < 2:
        raise ConfigError(f"{field}.params", f"{b.num_classes} class", "data with at least 2 classes (check "
                                                                       "label_map)")


def check_forward(model: nn.Module, example: torch.Tensor, field: str, num_classes: Optional[int] = None,
                  data_name: str = "") -> torch.Size:
    """Run ``model`` on two examples: a model whose input does not fit the data, or (``num_classes`` given)
    whose output classes differ from the data's, is refused naming ``<field>.kwargs`` (``field`` is the model
    spec's place: ``student``, ``teacher.model``). Returns the output shape."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example[:2])
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ConfigError(f"{field}.kwargs", f"inputs of shape {tuple(example.shape[1:])} from data set {data_name!r}",
                          f"a model whose forward accepts them (it failed: {first_line(e)}); set its kwargs (e.g. "
                          "in_length) to the data, or change data.params") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(field, f"output {shape}", "a model returning logits of shape (B, classes)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ConfigError(f"{field}.kwargs", f"{out.shape[1]} output classes",
                          f"{num_classes} classes (those of data set {data_name!r}): drop num_classes from its "
                          "kwargs, or match the data")
    return out.shape
