"""A student whose training steps take a known time, so that fault-injection tests (tests/test_reliability.py)
can kill a process *during* an epoch instead of racing epochs of a few milliseconds.

Reached through the import path ``slow_models:slow_mlp`` (the tests put this folder on ``PYTHONPATH``, which
the search driver and its Ray workers inherit). The delay is a sleep (no CPU used) in training mode only;
evaluation and the shape checks before a search run at full speed.
"""
import time

import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            time.sleep(self.delay_s)
        return x


def slow_mlp(num_classes: int, delay_s: float = 0.05, hidden: int = 16, in_features: int = 40) -> nn.Module:
    return nn.Sequential(Slow(delay_s), nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
