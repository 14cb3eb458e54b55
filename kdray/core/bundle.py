"""The data of a run as tensors: train (partly labelled), validation and test. Data sets (kdray.data) make
it; the training loop, the teacher signals and the cache read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TeacherView:
    """The teacher's own inputs for the bundle's examples (its prompt and tokenizer), split as the bundle is."""

    x_train: torch.Tensor
    x_val: torch.Tensor
    x_test: torch.Tensor


@dataclass
class DataBundle:
    """Train (partly labelled), validation and test tensors ready for training.

    ``y_train`` is -1 where an example is unlabelled (``labelled`` is False there); ``x_train`` keeps
    every training example so methods can use the unlabelled ones. ``fingerprint`` identifies the data
    and the split (not the augmentation). ``x_*`` are the student's inputs; the teacher reads ``teacher_view``
    where it has its own (:meth:`teacher_x`), e.g. a language model's prompts beside a small encoder's.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    labelled: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Optional[Augment]
    name: str
    fingerprint: str
    meta: dict = field(default_factory=dict)
    teacher_view: Optional[TeacherView] = None

    def teacher_x(self, split: str) -> torch.Tensor:
        """The teacher's inputs of ``split`` (train, val or test)."""
        return getattr(self.teacher_view if self.teacher_view is not None else self, f"x_{split}")

    @property
    def two_views(self) -> bool:
        return self.teacher_view is not None

    @property
    def n_labelled(self) -> int:
        return int(self.labelled.sum())


