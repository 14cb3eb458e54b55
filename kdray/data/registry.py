"""The data-set registry: ``DATASETS``, what a loader returns (:class:`RawData`) and the base of a loader's
``data.params`` model. The loaders (:mod:`kdray.data.mnist1d`, :mod:`kdray.data.cifar`,
:mod:`kdray.data.hf_text`, :mod:`kdray.data.multiple_choice`) register themselves here when :mod:`kdray.data` is imported."""
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
    # the teacher's own inputs for the same examples (another prompt or tokenizer), when they differ from x_*
    teacher_x_train: Optional[torch.Tensor] = None
    teacher_x_test: Optional[torch.Tensor] = None
    # inputs that depend on which training examples are labelled (few-shot prompts): called with their indices
    with_labelled: Optional[Callable[[list[int]], "RawData"]] = None


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
