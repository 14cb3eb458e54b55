"""Intermediate layer outputs (or inputs) by module path (the dotted names of ``model.named_modules()``).

A layer is ``path`` or ``path:output`` (the module's output) or ``path:input`` (its first input tensor, e.g. the
pre-activation that enters a ReLU, as torchdistill's forward hooks capture). :class:`FeatureHooks` is a context
manager that registers forward hooks on the named modules, keeps their latest tensors in ``.outputs`` (keyed by
the layer as written) and removes every hook on exit, even after an exception.
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


def inputs_for(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of ``model``'s parameters (a teacher shared between checks and a run may be on a GPU)."""
    p = next(model.parameters(), None)
    return x if p is None or x.device == p.device else x.to(p.device)


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


IO = ("output", "input")  # what a layer ``path:<io>`` captures of the module; output when no suffix


def split_layer(layer: str) -> tuple[str, str]:
    """``"relu2:input"`` -> ``("relu2", "input")``; ``"relu2"`` -> ``("relu2", "output")``. An unknown suffix is
    returned as it is (``check_paths`` refuses it)."""
    path, sep, io = layer.rpartition(":")
    return (path, io) if sep and io in IO else (layer, "output")


def check_paths(model: nn.Module, paths: Iterable[str], field: str) -> None:
    """Raise a ConfigError for the first layer whose path is not a module of ``model`` (``:input`` and ``:output``
    suffixes allowed)."""
    known = dict(model.named_modules())
    for layer in paths:
        path, _ = split_layer(layer)
        if ":" in path and path not in known:
            raise ConfigError(field, layer, "a module path, optionally followed by :input or :output "
                                            f"(not :{path.rpartition(':')[2]})")
        if path not in known or not path:
            close = difflib.get_close_matches(path, list(known), n=5, cutoff=0.4)
            hint = ", ".join(close) if close else ", ".join(module_paths(model)[:10])
            raise ConfigError(field, layer, f"a module path of the model; closest: {hint} "
                                           "(run `kdray layers CONFIG` for all)")


class FeatureHooks:
    """Capture the outputs (``path``, ``path:output``) or inputs (``path:input``) of the modules at ``paths`` while
    the context is open."""

    def __init__(self, model: nn.Module, paths: Iterable[str], field: str = "layers"):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        check_paths(model, self.paths, field)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureHooks":
        modules = dict(self.model.named_modules())
        for layer in self.paths:
            path, io = split_layer(layer)
            self._handles.append(modules[path].register_forward_hook(self._hook(layer, io == "input")))
        return self

    def _hook(self, layer: str, of_input: bool):
        def hook(_module: nn.Module, inp: Any, out: Any) -> None:
            self.outputs[layer] = first_tensor(inp if of_input else out)

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
            model(inputs_for(model, example))
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
            model(inputs_for(model, example))
    finally:
        model.train(was_training)
    missing = [p for p in paths if hooks.outputs.get(p) is None]
    if missing:
        raise ConfigError(field, missing[0], "a module that outputs a tensor and runs in forward()")
    return {p: hooks.outputs[p].shape for p in paths}
