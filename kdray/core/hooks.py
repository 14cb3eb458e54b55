"""Intermediate layer outputs (or inputs) by module path (the dotted names of ``model.named_modules()``).

A layer is ``path`` or ``path:output`` (the module's output) or ``path:input`` (its first input tensor, e.g. the
pre-activation that enters a ReLU, as torchdistill's forward hooks capture). :class:`FeatureHooks` is a context
manager that registers forward hooks on the named modules, keeps their latest tensors in ``.outputs`` (keyed by
the layer as written) and removes every hook on exit, even after an exception.

Token sequences and their padding: a model that reads token ids knows which positions are real tokens. A kdray
wrapper that lays its batches out itself (``HFSequenceClassifier`` on the right, ``HFCausalLM`` on the left) keeps
the mask of its last forward in ``layout_mask`` (:func:`token_owner` finds it for a layer below it); for any other
model fed kdray's token ids, the mask is that of its input (real ids are >= 0). For a (B, T, D) output of such a
model, :class:`FeatureHooks` keeps the mask beside it in ``.masks`` and zeroes the padded positions, so poolings
(:func:`kdray.core.probes.pool`) and the losses that compare whole sequences see only the real tokens.
:func:`list_layers` runs one batch through a model and reports every module's path, type and output
shape and its place in the forward (what ``kdray layers`` prints); :func:`module_order` orders paths as a forward
of a sequentially built model produces them, without running it. :func:`check_paths` rejects a path that does not exist and names
the closest existing ones.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Optional

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


def token_owner(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The nearest module at or above ``path`` (``model`` itself included) that lays out token ids itself and keeps
    the mask of its last forward in ``layout_mask``; None when there is none."""
    modules = dict(model.named_modules())
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        m = modules.get(".".join(parts[:i]))
        if m is not None and hasattr(m, "layout_mask"):
            return m
    return None


def input_token_mask(inputs: Any) -> Optional[torch.Tensor]:
    """The real tokens of a forward's first input when it is kdray's token ids (padded with -1), else None."""
    x = first_tensor(inputs)
    if x is None or x.dim() != 2 or torch.is_floating_point(x) or x.dtype == torch.bool:
        return None
    return x >= 0


def sequence_mask(t: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``mask`` when ``t`` is a (B, T, D) token sequence of its shape, else None (a vector, a feature map...)."""
    if t is None or mask is None or t.dim() != 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(t.device)


def zero_padding(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if mask is None else t * mask.unsqueeze(-1).to(t.dtype)


class FeatureHooks:
    """Capture the outputs (``path``, ``path:output``) or inputs (``path:input``) of the modules at ``paths`` while
    the context is open; ``.masks[layer]`` is the token mask of a token sequence's real positions (or None), and
    the sequence's padded positions are zeroed (see the module docstring)."""

    def __init__(self, model: nn.Module, paths: Iterable[str], field: str = "layers"):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        check_paths(model, self.paths, field)
        self.outputs: dict[str, torch.Tensor] = {}
        self.masks: dict[str, Optional[torch.Tensor]] = {}
        self._input_mask: Optional[torch.Tensor] = None
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureHooks":
        modules = dict(self.model.named_modules())
        self._handles.append(self.model.register_forward_pre_hook(self._remember_input))
        for layer in self.paths:
            path, io = split_layer(layer)
            hook = self._hook(layer, io == "input", token_owner(self.model, path))
            self._handles.append(modules[path].register_forward_hook(hook))
        return self

    def _remember_input(self, _module: nn.Module, inputs: Any) -> None:
        self._input_mask = input_token_mask(inputs)

    def _hook(self, layer: str, of_input: bool, owner: Optional[nn.Module]):
        def hook(_module: nn.Module, inp: Any, out: Any) -> None:
            t = first_tensor(inp if of_input else out)
            mask = sequence_mask(t, owner.layout_mask if owner is not None else self._input_mask)
            self.outputs[layer] = zero_padding(t, mask) if t is not None else t
            self.masks[layer] = mask

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
    order: Optional[int] = None  # when its output came in the forward (a block before the stage it ends); None: unused


@torch.no_grad()
def list_layers(model: nn.Module, example: torch.Tensor, which: str = "model") -> list[LayerInfo]:
    """Every module path of ``model`` (in definition order) with its output shape on ``example`` (one batch) and
    its place in the forward. Only the shapes are kept, never the outputs (a large teacher's every-module outputs
    would take many times its blocks' memory)."""
    paths = module_paths(model)
    modules = dict(model.named_modules())
    shapes: dict[str, Optional[tuple[int, ...]]] = {}  # filled as the outputs come: the forward's order

    def keep_shape(path: str):
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            t = first_tensor(out)
            shapes.setdefault(path, tuple(t.shape) if t is not None else None)

        return hook

    handles = [modules[p].register_forward_hook(keep_shape(p)) for p in paths]
    try:
        _eval_forward(model, example)
    finally:
        for h in handles:
            h.remove()
    order = {p: i for i, p in enumerate(shapes)}
    return [LayerInfo(which, p, type(modules[p]).__name__, shapes.get(p),
                      sum(x.numel() for x in modules[p].parameters()), order.get(p)) for p in paths]


def module_order(model: nn.Module) -> dict[str, int]:
    """Each module path's place when every module comes after the modules inside it, in the order they are defined:
    the order a forward produces their outputs for a model that defines its modules in the order it runs them (as
    ``transformers`` models, ResNets and ``nn.Sequential`` do), found without running it."""
    order: dict[str, int] = {}

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)
        if path:
            order[path] = len(order)

    visit(model, "")
    return order


def _eval_forward(model: nn.Module, example: torch.Tensor) -> None:
    was_training = model.training
    model.eval()
    try:
        model(inputs_for(model, example))
    finally:
        model.train(was_training)


@torch.no_grad()
def output_shapes(model: nn.Module, example: torch.Tensor, paths: Iterable[str], field: str) -> dict[str, torch.Size]:
    """Output shapes at ``paths`` on one batch (checks the paths first)."""
    paths = list(paths)
    if not paths:
        return {}
    with FeatureHooks(model, paths, field) as hooks:
        _eval_forward(model, example)
    missing = [p for p in paths if hooks.outputs.get(p) is None]
    if missing:
        raise ConfigError(field, missing[0], "a module that outputs a tensor and runs in forward()")
    return {p: hooks.outputs[p].shape for p in paths}
