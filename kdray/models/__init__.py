"""Model zoo: small MNIST-1D networks, CIFAR ResNets and a Hugging Face text classifier wrapper.

Every model factory has the signature ``factory(num_classes: int, **kwargs) -> nn.Module`` and every
model's ``forward(x)`` returns logits of shape ``(B, num_classes)``. Models keep their layers as named
sub-modules (ReLUs included) so that distillation terms can hook intermediate outputs by module path
(``relu2``, ``layer3``, ``layer3.0.conv1``, ``model.bert.encoder.layer.0``).

A :class:`~kdray.config.ModelSpec` names a model either by registry name (``mnist1d_cnn``) or by an
import path ``package.module:factory``. :func:`check_model_spec` validates a spec cheaply (no weights
are built); :func:`build_model` builds it. Both raise :class:`~kdray.errors.ConfigError` naming the
field, the bad value and what is allowed.

Built-in models (module paths in brackets):

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
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from typing import Annotated, Any, Callable, Optional

import torch
from pydantic import ConfigDict, Field, ValidationError, create_model
from torch import nn

from kdray.config import ModelSpec, config_error_from
from kdray.errors import ConfigError
from kdray.plugins import Registry

__all__ = [
    "MODELS", "build_model", "check_model_spec", "count_parameters", "resolve_factory",
    "MNIST1DCNN", "MNIST1DMLP", "CifarResNet", "BasicBlock", "HFSequenceClassifier",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

PosInt = Annotated[int, Field(ge=1)]

HF_INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional transformers package)"


# ---------------------------------------------------------------------------------------------
# MNIST-1D models


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, 1, L); (B, 1, L) unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _conv_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DCNN(nn.Module):
    """Three Conv1d + ReLU layers (kernel ``kernel`` stride 1, kernel 3 stride 1, kernel 3 stride 2;
    "same" padding) and a linear head on the flattened last feature map."""

    def __init__(self, num_classes: int, channels: int = 32, kernel: int = 5, in_length: int = 40,
                 in_channels: int = 1):
        super().__init__()
        length = in_length
        layers = []
        for i, (c_in, k, stride) in enumerate([(in_channels, kernel, 1), (channels, 3, 1), (channels, 3, 2)], start=1):
            pad = k // 2
            length = _conv_len(length, k, stride, pad)
            if length < 1:
                raise ConfigError("kwargs.in_length", in_length, f"a length long enough for the three convs (kernel {kernel})")
            layers += [(f"conv{i}", nn.Conv1d(c_in, channels, k, stride=stride, padding=pad)), (f"relu{i}", nn.ReLU())]
        for name, mod in layers:
            self.add_module(name, mod)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_sequence(x)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(x))


class MNIST1DMLP(nn.Module):
    """``depth`` hidden Linear + ReLU layers (``fc1, relu1, ...``) and a linear ``head``."""

    def __init__(self, num_classes: int, hidden: int = 100, depth: int = 2, in_features: int = 40):
        super().__init__()
        self.depth = depth
        width = in_features
        for i in range(1, depth + 1):
            self.add_module(f"fc{i}", nn.Linear(width, hidden))
            self.add_module(f"relu{i}", nn.ReLU())
            width = hidden
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)


@MODELS.register("mnist1d_cnn")
def mnist1d_cnn(num_classes: int, channels: PosInt = 32, kernel: PosInt = 5, in_length: PosInt = 40) -> nn.Module:
    """The MNIST-1D teacher CNN (about 93-94% test accuracy on the default data)."""
    return MNIST1DCNN(num_classes, channels=channels, kernel=kernel, in_length=in_length)


@MODELS.register("mnist1d_cnn_small")
def mnist1d_cnn_small(num_classes: int, channels: PosInt = 8, kernel: PosInt = 5, in_length: PosInt = 40) -> nn.Module:
    """A narrow student CNN with the teacher's layout."""
    return MNIST1DCNN(num_classes, channels=channels, kernel=kernel, in_length=in_length)


@MODELS.register("mnist1d_mlp")
def mnist1d_mlp(num_classes: int, hidden: PosInt = 100, depth: PosInt = 2, in_features: PosInt = 40) -> nn.Module:
    """A student MLP (about 60-70% test accuracy on the default data)."""
    return MNIST1DMLP(num_classes, hidden=hidden, depth=depth, in_features=in_features)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (the CIFAR-style ResNets of He et al. as used by RepDistiller / CRD)


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN, plus a (1x1 conv + BN when the shape changes) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """Depth 6n+2: 3x3 stem conv, three stages of n BasicBlocks (strides 1, 2, 2), global pool, fc."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError("kwargs.depth", depth, "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int) -> nn.Module:
        return CifarResNet(depth, widths, num_classes)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet, depth {depth}, stem/stage widths {widths}."
    MODELS.register(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
# RepDistiller's "x4" variants: 32-channel stem, stages 64/128/256 (resnet8x4 ~1.2M, resnet32x4 ~7.4M params)
_register_resnet("resnet8x4", 8, (32, 64, 128, 256))
_register_resnet("resnet32x4", 32, (32, 64, 128, 256))


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.name", "hf_sequence_classifier", HF_INSTALL_HINT) from None
    return transformers


class HFSequenceClassifier(nn.Module):
    """``forward(input_ids)`` -> logits; the attention mask marks positions != ``pad_token_id``."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0):
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@MODELS.register("hf_sequence_classifier")
def hf_sequence_classifier(num_classes: int, *, path: str, config_only: bool = False,
                           pad_token_id: Optional[int] = None) -> nn.Module:
    """A ``transformers`` sequence classifier from a local folder or hub name.

    ``config_only`` builds a randomly initialised model from the folder's config. ``pad_token_id``
    defaults to the model config's pad token id, or 0 when it has none.
    """
    tf = _import_transformers()
    try:
        if config_only:
            config = tf.AutoConfig.from_pretrained(path, num_labels=num_classes)
            model = tf.AutoModelForSequenceClassification.from_config(config)
        else:
            model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("kwargs.path", path, f"a model folder or hub name transformers can load ({e})") from None
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    return HFSequenceClassifier(model, pad_token_id)


# ---------------------------------------------------------------------------------------------
# specs: check and build


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
    if spec.name == "hf_sequence_classifier" or factory is hf_sequence_classifier:
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"{field}.name", spec.name, HF_INSTALL_HINT)
    _check_kwargs(factory, spec.kwargs, field)


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
