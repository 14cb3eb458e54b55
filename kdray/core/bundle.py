"""The data of a run as tensors: train (partly labelled), validation and test. Data sets (kdray.data) make
it; the training loop, the teacher signals and the cache read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class DataBundle:
    """Train (partly labelled), validation and test tensors ready for training.

    ``y_train`` is -1 where an example is unlabelled (``labelled`` is False there); ``x_train`` keeps
    every training example so methods can use the unlabelled ones. ``fingerprint`` identifies the data
    and the split (not the augmentation).
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

    @property
    def n_labelled(self) -> int:
        return int(self.labelled.sum())


