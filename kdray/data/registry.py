"""The data-set registry: ``DATASETS``, what a loader returns (:class:`RawData`) and the base of a loader's
``data.params`` model. The loaders (:mod:`kdray.data.mnist1d`, :mod:`kdray.data.cifar`,
:mod:`kdray.data.hf_text`) register themselves here when :mod:`kdray.data` is imported."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict

from kdray.core.bundle import Augment
from kdray.plugins import Registry

DATASETS: Registry[Callable[..., "RawData"]] = Registry("dataset")


@dataclass
class RawData:
    """What a loader returns: full train and test sets, before validation split and label masking."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Optional[Augment]
    meta: dict = field(default_factory=dict)


class Params(BaseModel):
    """Base for a loader's ``data.params``: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


def register_dataset(name: str, params: type[Params], needs_root: Callable[[Any], bool] | bool = False,
                     root_hint: str = "") -> Callable:
    """Register ``loader(cfg, cache_dir=None) -> RawData`` with its params model and root rule."""

    def deco(fn: Callable[..., RawData]) -> Callable[..., RawData]:
        fn.params_model = params  # type: ignore[attr-defined]
        fn.needs_root = needs_root if callable(needs_root) else (lambda p, _v=needs_root: _v)  # type: ignore[attr-defined]
        fn.root_hint = root_hint  # type: ignore[attr-defined]
        return DATASETS.register(name)(fn)

    return deco
