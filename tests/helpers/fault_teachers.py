"""A teacher whose Ray worker dies once in the middle of the teacher pass (tests/test_teacher_pass.py).

Reached by Ray Data actors through this folder on the workers' ``PYTHONPATH``. The first forward after ``after``
calls in any process kills that process (``os._exit``, as a killed worker) and leaves a marker file, so it dies
once only: the actor Ray restarts, and the driver's own passes, compute as the plain teacher does.
"""
import os
from pathlib import Path

import torch
from torch import nn


class DiesOnce(nn.Module):
    def __init__(self, teacher: nn.Module, marker: str, after: int):
        super().__init__()
        self.teacher, self.marker, self.after, self.calls = teacher, marker, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.teacher(x)
