"""The parts of the training step that are about the hardware: mixed precision (``train.precision``: autocast, a
gradient scaler for fp16), ``torch.compile`` of the student (``train.compile``), host-to-device copies through
pinned memory, and the epoch's loss parts kept on the device and read back once every few batches
(:class:`LossSums`). :mod:`kdray.core.train`'s loop uses them; plain PyTorch."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
from torch import nn

from kdray.errors import ConfigError, DivergedError

# --------------------------------------------------------------------------------------------------
# precision, compilation and host-to-device copies of the training step

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device, field: str = "train.precision") -> None:
    """A ConfigError unless ``device`` can train in ``precision``: fp32 anywhere; bf16 on the CPU or a CUDA device
    that supports it; fp16 (with a gradient scaler) on CUDA only."""
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(field, precision, f"fp32 or fp16: {torch.cuda.get_device_name(device)} has no bfloat16")
        return
    if device.type == "cpu" and precision == "bf16":
        return
    allowed = "fp32 or bf16" if device.type == "cpu" else "fp32"
    raise ConfigError(field, precision, f"{allowed} on the {device.type} device (fp16 needs CUDA; bf16 needs the "
                                        "CPU or a CUDA device that supports it)")


def check_compile(enabled: bool, device: torch.device, field: str = "train.compile") -> None:
    """A ConfigError when ``train.compile`` is on but torch.compile cannot work here: no TorchDynamo for this
    Python, or (on the CPU) no C++ compiler for its code generator."""
    if not enabled:
        return
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(field, True, "false: torch.compile is not supported by this Python/torch build")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++",
                                                                  "clang++")):
        raise ConfigError(field, True, "false, or install a C++ compiler (g++ or clang++; torch.compile generates "
                                       "C++ for the CPU)")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``; nothing at all for fp32 (so fp32 runs exactly as without it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


@contextlib.contextmanager
def compiled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """``model`` compiled in place (``nn.Module.compile``: the same parameters, state-dict keys and forward hooks)
    while the context is open; plain again afterwards (a copy of a compiled module would call the original)."""
    if not enabled:
        yield
        return
    model.compile()
    try:
        yield
    finally:
        model._compiled_call_impl = None  # what nn.Module.compile set


def rows_to(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``t`` on ``device``; from a host tensor to CUDA through pinned memory, non-blocking."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t[idx].to(device, non_blocking=True)
    pinned = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, idx, out=pinned).to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# the epoch's losses, kept on the device


class LossSums:
    """The batches' loss parts, kept where they were computed (one small stack per batch, no copy to the host)
    until :meth:`check` reads the pending ones back in one copy, sums them and looks for the first non-finite one.

    The sums are made on the host in batch order from the parts' own values, exactly as when every part was read
    back with ``float`` after every batch, so fp32 training reports the same means to the last bit."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.batches = 0
        self.sums: list[float] = []
        self.pending: list[torch.Tensor] = []

    def add(self, values: dict[str, torch.Tensor]) -> None:
        if not self.batches:
            self.names, self.sums = list(values), [0.0] * len(values)
        elif list(values) != self.names:
            raise ValueError(f"loss parts {list(values)} after {self.names}")
        self.pending.append(torch.stack([v if v.dim() == 0 else v.reshape(()) for v in values.values()]).detach())
        self.batches += 1

    def check(self, epoch: int) -> None:
        """Read the pending batches back (one copy); a DivergedError naming the first part that was inf or nan (of
        the earliest such batch)."""
        if not self.pending:
            return
        rows, self.pending = torch.stack(self.pending).tolist(), []
        for row in rows:
            for i, v in enumerate(row):
                if not math.isfinite(v):
                    raise DivergedError(epoch, self.names[i], v)
                self.sums[i] += v

    def means(self) -> dict[str, float]:
        """The mean of each part over the batches (``loss``, ``loss_<part>``), after a final :meth:`check`."""
        n = max(self.batches, 1)
        return {("loss" if k == "loss" else f"loss_{k}"): v / n for k, v in zip(self.names, self.sums)}
