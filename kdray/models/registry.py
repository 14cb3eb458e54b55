"""The model registry ``MODELS`` (``factory(num_classes, **kwargs) -> nn.Module``); the built-in models
(:mod:`kdray.models.mnist1d`, :mod:`kdray.models.resnet`, :mod:`kdray.models.hf`) register themselves here
when :mod:`kdray.models` is imported."""
from __future__ import annotations

from typing import Annotated, Callable

from pydantic import Field
from torch import nn

from kdray.plugins import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

PosInt = Annotated[int, Field(ge=1)]
