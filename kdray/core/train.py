"""The training loop of one distillation run, in plain PyTorch (no Ray, no MLflow).

* :class:`Distiller` holds the student and the distillation terms (with their adapters) and computes
  the loss of one batch: ``ce_weight * CE(labelled) + sum(weight_i * term_i)``.
* :func:`fit` runs the seeded epoch loop: batches (sharded by rank for DDP), the teacher signal,
  optional online teacher updates, per-epoch evaluation, callbacks (for Ray Tune reporting and
  checkpointing) and resumption from a saved state.

The same :func:`fit` trains the teacher from a recipe (no teacher, no terms) and every student, on one
process or as a Ray Train worker.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdray.config import DistillConfig, OptimConfig, TrainConfig
from kdray.core.hooks import FeatureHooks
from kdray.core.methods import Signals, build_terms, kd_loss, labelled_ce
from kdray.errors import DivergedError

# --------------------------------------------------------------------------------------------------
# small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for all of ``x`` in eval mode (restores the train/eval mode afterwards)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
            torch.empty(0)
    finally:
        model.train(was)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan")


def term_names(methods: list[str]) -> list[str]:
    """Unique metric names for the terms: ``kd``, ``fitnet``, ``fitnet_2`` ..."""
    seen: dict[str, int] = {}
    out = []
    for m in methods:
        seen[m] = seen.get(m, 0) + 1
        out.append(m if seen[m] == 1 else f"{m}_{seen[m]}")
    return out


# --------------------------------------------------------------------------------------------------
# teacher signal interface (implemented in kdray.core.signals; a cache plugs in here)


@dataclass
class TeacherOutputs:
    logits: Optional[torch.Tensor]
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class TeacherSignal(Protocol):
    """Gives the teacher's outputs for a batch: ``idx`` are training-example indices, ``x`` the
    (possibly augmented) inputs. Live signals run the teacher on ``x``; precomputed ones index by ``idx``."""

    def outputs(self, idx: torch.Tensor, x: torch.Tensor) -> TeacherOutputs: ...


# --------------------------------------------------------------------------------------------------
# the loss of one batch


class Distiller(nn.Module):
    """Student + distillation terms; ``forward`` returns (total loss, {part: value}, student logits).

    The student's hooked layers are captured while the module is alive (call :meth:`close` to remove
    the hooks). Wrapping a Distiller in DDP synchronises the student and the adapters together.
    """

    def __init__(self, student: nn.Module, distill: DistillConfig):
        super().__init__()
        self.student = student
        built = build_terms(distill.terms, distill.temperature)
        self.ce_weight = distill.ce_weight
        self.temperature = distill.temperature
        self.names = term_names([t.method for t, _, _ in built])
        self.weights = [w for _, w, _ in built]
        self.terms = nn.ModuleList([m for _, _, m in built])
        self.student_layers = sorted({p for m in self.terms for p in m.student_layers})
        self.teacher_layers = sorted({p for m in self.terms for p in m.teacher_layers})
        self._hooks = FeatureHooks(student, self.student_layers, "student_layers").__enter__()

    def build(self, student_shapes: dict, teacher_shapes: dict) -> None:
        for i, m in enumerate(self.terms):
            m.build(student_shapes, teacher_shapes)

    def online_temperature(self) -> float:
        """The temperature of the online teacher's mutual-learning step: that of the first term that reads the
        teacher's logits at a temperature (``uses_teacher_logits`` and ``uses_temperature``), else
        ``distill.temperature``."""
        return next((m.temperature for m in self.terms if m.uses_teacher_logits and m.uses_temperature),
                    self.temperature)

    def close(self) -> None:
        self._hooks.__exit__(None, None, None)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: TeacherOutputs):
        logits = self.student(x)
        parts: dict[str, torch.Tensor] = {}
        ce = labelled_ce(logits, y)
        parts["ce"] = ce
        total = self.ce_weight * ce
        sig = Signals(student_logits=logits, teacher_logits=t.logits,
                      student_features=dict(self._hooks.outputs), teacher_features=t.features,
                      probe_logits=t.probe_logits, labels=y)
        for name, w, m in zip(self.names, self.weights, self.terms):
            value = m(sig)
            parts[name] = value
            total = total + w * value
        return total, parts, logits


# --------------------------------------------------------------------------------------------------
# the loop


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch (e.g. an early-stopping rule)."""


@dataclass
class Data:
    """What :func:`fit` trains on: training examples (y = -1 for unlabelled) and a validation split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    batch_size: int
    eval_batch_size: int
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    x_test: Optional[torch.Tensor] = None  # when given, the last epoch's metrics include test_acc
    y_test: Optional[torch.Tensor] = None
    teacher_test_pred: Optional[torch.Tensor] = None  # ... and test_teacher_agreement


@torch.no_grad()
def test_metrics(student: nn.Module, data: Data) -> dict[str, float]:
    """Final test accuracy (and agreement with the teacher's test predictions when known)."""
    device = next(student.parameters()).device
    logits = predict(student, data.x_test.to(device), data.eval_batch_size)
    out = {"test_acc": accuracy(logits, data.y_test.to(device))}
    if data.teacher_test_pred is not None:
        out["test_teacher_agreement"] = (logits.argmax(1).cpu() == data.teacher_test_pred.cpu()).float().mean().item()
    return out


@dataclass
class FitResult:
    history: list[dict[str, float]]
    stopped_early: bool
    state: dict[str, Any]


EpochCallback = Callable[[dict[str, float], Callable[[], dict[str, Any]]], None]


def fit(
    distiller: Distiller,
    data: Data,
    train: TrainConfig,
    *,
    seed: int,
    teacher: Optional[TeacherSignal] = None,
    online_teacher: Optional[nn.Module] = None,
    teacher_val_pred: Optional[torch.Tensor] = None,
    callbacks: tuple[EpochCallback, ...] = (),
    start_state: Optional[dict[str, Any]] = None,
    rank: int = 0,
    world_size: int = 1,
    module: Optional[nn.Module] = None,
    progress: Optional[Callable[[int, dict], None]] = None,
) -> FitResult:
    """Train ``distiller`` for ``train.epochs`` epochs.

    ``module`` is what is called for the forward pass (the Distiller itself, or a DDP wrapper of it).
    ``online_teacher`` (online scheme) is trained together with the student by mutual learning; the
    student's KD terms then see its detached outputs through ``teacher``.
    ``teacher_val_pred`` are the teacher's validation predictions, for the agreement metric.
    Each callback gets the epoch's metrics and a function returning the full training state
    (a ``torch.save``-able dict that ``start_state`` accepts to resume). Raise :class:`StopTraining`
    from a callback to stop.
    """
    module = module or distiller
    device = next(distiller.parameters()).device
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.optimizer)
    sched = make_scheduler(opt, train.optimizer, train.epochs)
    t_opt = make_optimizer(list(online_teacher.parameters()), train.optimizer) if online_teacher else None
    history: list[dict[str, float]] = []
    first_epoch = 1
    if start_state:
        distiller.load_state_dict(start_state["distiller"])
        opt.load_state_dict(start_state["optimizer"])
        sched.load_state_dict(start_state["scheduler"])
        if online_teacher is not None:
            online_teacher.load_state_dict(start_state["online_teacher"])
            t_opt.load_state_dict(start_state["teacher_optimizer"])
        history = list(start_state["history"])
        first_epoch = start_state["epoch"] + 1

    def state(epoch: int) -> dict[str, Any]:
        s = {"distiller": distiller.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": epoch, "history": history}
        if online_teacher is not None:
            s["online_teacher"] = online_teacher.state_dict()
            s["teacher_optimizer"] = t_opt.state_dict()
        return s

    n = len(data.x_train)
    per_rank = n // world_size
    stopped = False
    for epoch in range(first_epoch, train.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # same on every rank
        order = torch.randperm(n, generator=gen)[rank * per_rank:(rank + 1) * per_rank]
        sums: dict[str, float] = {}
        batches = 0
        distiller.train()
        if online_teacher is not None:
            online_teacher.train()
        for start in range(0, per_rank, data.batch_size):
            idx = order[start:start + data.batch_size]
            x = data.x_train[idx].to(device, non_blocking=True)
            y = data.y_train[idx].to(device, non_blocking=True)
            if data.augment is not None:
                x = data.augment(x, gen)
            t_out = teacher.outputs(idx, x) if teacher is not None else TeacherOutputs(None)
            loss, parts, s_logits = module(x, y, t_out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train.max_grad_norm:
                nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            if online_teacher is not None:
                parts["teacher"] = _online_teacher_step(online_teacher, t_opt, x, y, s_logits.detach(), distiller)
            values = {k: float(v.detach()) for k, v in parts.items()}
            values["loss"] = float(loss.detach())
            for k, v in values.items():
                if not math.isfinite(v):
                    raise DivergedError(epoch, k, v)
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        sched.step()
        metrics: dict[str, float] = {"epoch": epoch}
        metrics.update({("loss" if k == "loss" else f"loss_{k}"): v / max(batches, 1) for k, v in sums.items()})
        val_logits = predict(distiller.student, data.x_val.to(device), data.eval_batch_size)
        metrics["val_acc"] = accuracy(val_logits, data.y_val.to(device))
        metrics["val_loss"] = F.cross_entropy(val_logits, data.y_val.to(device)).item() if len(data.y_val) else math.nan
        if teacher_val_pred is not None and len(data.y_val):
            metrics["teacher_agreement"] = (val_logits.argmax(1).cpu() == teacher_val_pred.cpu()).float().mean().item()
        elapsed = time.perf_counter() - t0
        metrics["epoch_time_s"] = elapsed
        metrics["samples_per_s"] = per_rank * world_size / elapsed
        metrics["lr"] = opt.param_groups[0]["lr"]
        if epoch == train.epochs and data.x_test is not None:
            metrics.update(test_metrics(distiller.student, data))
        history.append(metrics)
        if progress is not None:
            progress(epoch, metrics)
        try:
            for cb in callbacks:
                cb(metrics, lambda e=epoch: state(e))
        except StopTraining:
            stopped = True
            break
    return FitResult(history, stopped, state(history[-1]["epoch"] if history else 0))


def mutual_learning_loss(t_logits: torch.Tensor, y: torch.Tensor, s_logits: torch.Tensor, T: float) -> torch.Tensor:
    """The online teacher's loss (deep mutual learning, Zhang et al. 2018, arXiv:1706.00384): CE on the labelled
    examples + :func:`~kdray.core.methods.kd_loss` with the student's logits as the soft targets."""
    return labelled_ce(t_logits, y) + kd_loss(t_logits, s_logits, T)


def _online_teacher_step(teacher: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         s_logits: torch.Tensor, distiller: Distiller) -> torch.Tensor:
    """Deep mutual learning: the teacher learns from the labels and from the student's soft outputs."""
    loss = mutual_learning_loss(teacher(x), y, s_logits, distiller.online_temperature())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()
