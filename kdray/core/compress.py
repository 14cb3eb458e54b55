"""Compressed students: magnitude pruning (with a short fine-tune under distillation, done by the caller)
and dynamic int8 quantization, with the numbers users pick a student by: accuracy, size on disk and
measured CPU latency.

Plain PyTorch: :func:`prune_magnitude` puts global L1 pruning masks on the weights of the convolutions and
linear layers (the masks keep pruned weights at zero while fine-tuning), :func:`make_pruning_permanent`
folds them in, :func:`quantize_int8` applies ``torch.ao.quantization.quantize_dynamic`` to the Linear and
LSTM layers (weights int8, activations quantized on the fly), and :func:`measure` reports size (plain and
gzipped) and latency.
"""
from __future__ import annotations

import copy
import gzip
import io
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
QUANTIZABLE = {nn.Linear, nn.LSTM}


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def prune_magnitude(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the ``sparsity`` share of all conv/linear weights with the smallest magnitude (one global
    threshold), in place, as masks that stay applied during fine-tuning."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity}: allowed 0 <= sparsity < 1")
    params = prunable_weights(model)
    if sparsity > 0 and params:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    return model


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    for m, name in prunable_weights(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            prune.remove(m, name)
    return model


def sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamically quantized copy (int8 weights of Linear/LSTM layers); convolutions stay float."""
    with warnings.catch_warnings():  # eager-mode quantization is deprecated in favour of torchao, still works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), QUANTIZABLE,
                                                      dtype=torch.qint8)


def _saved(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.getvalue()


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it (what a weights file costs on disk)."""
    return len(_saved(model))


def gzip_bytes(model: nn.Module) -> int:
    """Bytes of that file gzipped (level 9): what a pruned student's zeros save in storage and download,
    where the dense file itself does not shrink."""
    return len(gzip.compress(_saved(model), compresslevel=9, mtime=0))


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, reps: int = 50, warmup: int = 10) -> float:
    """Median wall time of one forward pass on batch ``x`` on one CPU thread, in milliseconds."""
    model = model.cpu().eval()
    x = x.cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: comparable between variants and machines, no thread-pool noise
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model = model.cpu().eval()
    correct = sum(int((model(x[i:i + batch].cpu()).argmax(1) == y[i:i + batch].cpu()).sum())
                  for i in range(0, len(x), batch))
    return correct / max(len(x), 1)


def measure(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, batch: int = 100) -> dict[str, float]:
    """Test accuracy, size on disk (plain and gzipped), CPU latency of one batch and weight sparsity."""
    return {"test_acc": accuracy(model, x_test, y_test), "size_bytes": size_bytes(model),
            "gzip_bytes": gzip_bytes(model),
            "latency_ms": latency_ms(model, x_test[:batch]), "sparsity": sparsity_of(model)}
