"""Model zoo: small MNIST-1D networks, CIFAR ResNets and a Hugging Face text classifier wrapper.

Every model factory has the signature ``factory(num_classes: int, **kwargs) -> nn.Module`` and every
model's ``forward(x)`` returns logits of shape ``(B, num_classes)``. Models keep their layers as named
sub-modules (ReLUs included) so that distillation terms can hook intermediate outputs by module path
(``relu2``, ``layer3``, ``layer3.0.conv1``, ``model.bert.encoder.layer.0``).

A :class:`~kdray.config.ModelSpec` names a model either by registry name (``mnist1d_cnn``) or by an
import path ``package.module:factory``. :func:`check_model_spec` validates a spec cheaply (no weights
are built); :func:`build_model` builds it. Both raise :class:`~kdray.errors.ConfigError` naming the
field, the bad value and what is allowed.

Built-in models (registered when this package is imported, from :mod:`kdray.models.mnist1d`,
:mod:`kdray.models.resnet` and :mod:`kdray.models.hf`; module paths in brackets):

- ``mnist1d_cnn`` / ``mnist1d_cnn_small``: three Conv1d layers (strides 1, 1, 2) and a linear head
  [``conv1 relu1 conv2 relu2 conv3 relu3 flatten fc``]; conv outputs are ``(B, C, L)`` with L = 40, 40, 20
  for the default length-40 input. Input ``(B, 40)`` or ``(B, 1, 40)``.
- ``mnist1d_mlp``: [``fc1 relu1 fc2 relu2 ... head``], input ``(B, 40)`` or ``(B, 1, 40)``.
- CIFAR ResNets as in RepDistiller (``resnet8 ... resnet110``, ``resnet8x4``, ``resnet32x4``):
  [``conv1 bn1 relu layer1 layer2 layer3 avgpool fc``]; each block ``layerK.i`` has
  ``conv1 bn1 relu1 conv2 bn2 [downsample] relu2`` where ``relu2`` acts on the residual sum
  (hook its input for the pre-activation). Input ``(B, 3, 32, 32)``.
- ``hf_sequence_classifier``: wraps ``AutoModelForSequenceClassification``; the inner model's
  paths are reachable under ``model.`` (needs the optional ``transformers`` dependency).
- ``hf_causal_lm``: wraps ``AutoModelForCausalLM`` as a multiple-choice classifier (the answer tokens' logits
  after each prompt, :mod:`kdray.models.hf_lm`); decoder blocks are ``model.model.layers.N``.

:func:`loads_weights` tells whether a spec's model comes with trained weights of its own (a Hugging Face folder),
and so is a teacher without a checkpoint or recipe.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any, Callable, Optional

from pydantic import ConfigDict, ValidationError, create_model
from torch import nn

from kdray.config import ModelSpec, config_error_from
from kdray.core.hf_package import check_transformers
from kdray.errors import ConfigError
# importing the built-in models registers them
from kdray.models.hf import HFSequenceClassifier, hf_sequence_classifier
from kdray.models.hf_lm import HFCausalLM, hf_causal_lm
from kdray.models.mnist1d import MNIST1DCNN, MNIST1DMLP
from kdray.models.registry import MODELS, PosInt
from kdray.models.resnet import BasicBlock, CifarResNet

__all__ = [
    "MODELS", "PosInt", "build_model", "check_model_spec", "count_parameters", "resolve_factory",
    "MNIST1DCNN", "MNIST1DMLP", "CifarResNet", "BasicBlock", "HFSequenceClassifier", "HFCausalLM", "loads_weights",
]


def _allowed_names() -> str:
    return "one of " + ", ".join(MODELS.names()) + ", or an import path package.module:factory"


def resolve_factory(name: str, field: str = "model") -> Callable[..., Any]:
    """The factory for a registry name or a ``package.module:attr`` import path."""
    where = f"{field}.name"
    if ":" not in name:
        if name not in MODELS:
            raise ConfigError(where, name, _allowed_names())
        return MODELS.get(name)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(where, name, "an import path of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(where, name, f"an importable module (importing {module_name!r} failed: {e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise ConfigError(where, name, f"an attribute of {module_name} (no {attr!r}; it has e.g. {', '.join(public)})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(where, name, "a callable factory or nn.Module class")
    return obj


def _signature(factory: Callable[..., Any]) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(factory, eval_str=True)
    except Exception:
        try:
            return inspect.signature(factory)
        except (TypeError, ValueError):
            return None


def _takes_num_classes(sig: Optional[inspect.Signature]) -> bool:
    if sig is None:
        return False
    p = sig.parameters.get("num_classes")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], field: str) -> None:
    sig = _signature(factory)
    if sig is None:
        return
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    shown = [n for n in accepted if n != "num_classes"] or ["(none)"]
    if not var_kw:
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(f"{field}.kwargs.{key}", kwargs[key], "one of the factory's keyword arguments: " + ", ".join(shown))
    supplied = set(kwargs) | ({"num_classes"} if _takes_num_classes(sig) else set())
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in supplied:
            raise ConfigError(f"{field}.kwargs.{n}", "<missing>", f"a value (the factory requires {n})")
    # type / range check of kwargs with plain annotations (int, float, bool, str, Annotated[...])
    fields: dict[str, Any] = {}
    for key in kwargs:
        p = params.get(key)
        if p is None or p.annotation is p.empty or isinstance(p.annotation, str):
            continue
        fields[key] = (p.annotation, ...)
    if not fields:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a kwarg that shadows a BaseModel attribute
            validator = create_model("_Kwargs", __config__=ConfigDict(strict=True, arbitrary_types_allowed=True), **fields)
    except Exception:  # annotations pydantic cannot handle: skip the type check
        return
    try:
        validator.model_validate({k: kwargs[k] for k in fields})
    except ValidationError as e:
        raise config_error_from(e, (field, "kwargs"), explain=lambda err: err["msg"]) from None


def check_model_spec(spec: ModelSpec, field: str) -> None:
    """Validate a model spec without building it: name or import path, kwargs names/types.

    ``field`` is the spec's place in the config (``student``, ``teacher.model``); errors name
    ``<field>.name`` or ``<field>.kwargs.<key>``.
    """
    factory = resolve_factory(spec.name, field)
    if factory in (hf_sequence_classifier, hf_causal_lm):
        check_transformers(f"{field}.name", spec.name)
    _check_kwargs(factory, spec.kwargs, field)


def loads_weights(spec: ModelSpec) -> bool:
    """Whether the model of ``spec`` loads trained weights of its own (its factory's ``loads_weights(kwargs)``)."""
    factory = resolve_factory(spec.name)
    check = getattr(factory, "loads_weights", None)
    return bool(check(spec.kwargs)) if callable(check) else False


def build_model(spec: ModelSpec, num_classes: int, field: str = "model") -> nn.Module:
    """Build the model a spec names; ``num_classes`` is passed when the factory takes it."""
    factory = resolve_factory(spec.name, field)
    _check_kwargs(factory, spec.kwargs, field)
    kwargs = dict(spec.kwargs)
    if "num_classes" not in kwargs and _takes_num_classes(_signature(factory)):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except ConfigError as e:
        if e.field.startswith("kwargs."):
            raise ConfigError(f"{field}.{e.field}", e.value, e.allowed) from None
        if e.field == "model.name":
            raise ConfigError(f"{field}.name", e.value, e.allowed) from None
        raise
    except TypeError as e:
        raise ConfigError(f"{field}.kwargs", spec.kwargs, f"arguments the factory {spec.name} accepts ({e})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{field}.name", spec.name, f"a factory returning a torch.nn.Module (it returned {type(model).__name__})")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
