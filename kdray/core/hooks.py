"""Intermediate layer outputs by module path (the dotted names of ``model.named_modules()``).

:class:`FeatureHooks` is a context manager that registers forward hooks on the named modules, keeps
their latest outputs in ``.outputs`` and removes every hook on exit, even after an exception.
:func:`list_layers` runs one batch through a model and reports every module's path, type and output
shape (what ``kdray layers`` prints). :func:`check_paths` rejects a path that does not exist and names
the closest existing ones.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from kdray.errors import ConfigError


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module "outputs": itself, the first tensor of a tuple/list, or of a ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers ModelOutput is an OrderedDict
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_paths(model: nn.Module, paths: Iterable[str], field: str) -> None:
    """Raise a ConfigError for the first path that is not a module of ``model``."""
    known = dict(model.named_modules())
    for path in paths:
        if path not in known or not path:
            close = difflib.get_close_matches(path, list(known), n=5, cutoff=0.4)
            hint = ", ".join(close) if close else ", ".join(module_paths(model)[:10])
            raise ConfigError(field, path, f"a module path of the model; closest: {hint} "
                                           "(run `kdray layers CONFIG` for all)")


class FeatureHooks:
    """Capture the outputs of the modules at ``paths`` while the context is open."""

    def __init__(self, model: nn.Module, paths: Iterable[str], field: str = "layers"):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        check_paths(model, self.paths, field)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureHooks":
        modules = dict(self.model.named_modules())
        for path in self.paths:
            self._handles.append(modules[path].register_forward_hook(self._hook(path)))
        return self

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            self.outputs[path] = first_tensor(out)

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class LayerInfo:
    model: str  # "teacher" or "student"
    path: str
    type: str
    shape: tuple[int, ...] | None  # output shape on the example batch; None when not a tensor / unused
    params: int


@torch.no_grad()
def list_layers(model: nn.Module, example: torch.Tensor, which: str = "model") -> list[LayerInfo]:
    """Every module path of ``model`` with its output shape on ``example`` (one batch)."""
    paths = module_paths(model)
    was_training = model.training
    model.eval()
    try:
        with FeatureHooks(model, paths) as hooks:
            model(example)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    out = []
    for p in paths:
        t = hooks.outputs.get(p)
        out.append(LayerInfo(which, p, type(modules[p]).__name__, tuple(t.shape) if t is not None else None,
                             sum(x.numel() for x in modules[p].parameters())))
    return out


@torch.no_grad()
def output_shapes(model: nn.Module, example: torch.Tensor, paths: Iterable[str], field: str) -> dict[str, torch.Size]:
    """Output shapes at ``paths`` on one batch (checks the paths first)."""
    paths = list(paths)
    if not paths:
        return {}
    was_training = model.training
    model.eval()
    try:
        with FeatureHooks(model, paths, field) as hooks:
            model(example)
    finally:
        model.train(was_training)
    missing = [p for p in paths if hooks.outputs.get(p) is None]
    if missing:
        raise ConfigError(field, missing[0], "a module that outputs a tensor and runs in forward()")
    return {p: hooks.outputs[p].shape for p in paths}
