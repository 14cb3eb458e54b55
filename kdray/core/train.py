"""The training loop of one distillation run, in plain PyTorch (no Ray, no MLflow).

* :class:`Distiller` holds the student and the distillation terms (with their adapters) and computes
  the loss of one batch: ``ce_weight * CE(labelled) + sum(weight_i * term_i)``.
* :func:`fit` runs the seeded epoch loop of a :class:`Trainer` (``fit -> train_epoch -> train_batch``,
  then ``evaluate`` and ``end_epoch``): batches (sharded by rank for DDP), the teacher signal, optional
  online teacher updates, per-epoch evaluation, callbacks (for Ray Tune reporting and checkpointing) and
  resumption from a saved state.

The same :func:`fit` trains the teacher from a recipe (no teacher, no terms) and every student, on one
process or as a Ray Train worker.
"""
from __future__ import annotations

import contextlib
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
from kdray.core.checkpoint import restore_training_state, training_state
from kdray.core.hooks import FeatureHooks
from kdray.core.methods import Signals, build_terms, kd_loss, labelled_ce
from kdray.core.step import LossSums, autocast, check_compile, check_precision, compiled, rows_to

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


def in_model_dtype(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of ``model``'s parameters when both are floating point (a bfloat16 teacher gets bfloat16
    inputs), else as it is."""
    dtype = next((p.dtype for p in model.parameters()), None)
    return x.to(dtype) if dtype is not None and dtype.is_floating_point and x.is_floating_point() else x


def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for all of ``x`` in eval mode, under ``torch.inference_mode`` with inputs in the model's dtype
    (restores the train/eval mode afterwards). The batches are joined outside inference mode, so the result is
    an ordinary tensor."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [model(in_model_dtype(model, x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)
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
        """Under autocast the student runs in low precision; the terms get every signal in float32 (softmax, KL
        and the feature losses in float32; a no-op in fp32)."""
        logits = self.student(x)
        parts: dict[str, torch.Tensor] = {}
        ce = labelled_ce(logits.float(), y)
        parts["ce"] = ce
        total = self.ce_weight * ce
        sig = Signals(student_logits=logits.float(), teacher_logits=_f32(t.logits),
                      student_features=_all_f32(self._hooks.outputs), teacher_features=_all_f32(t.features),
                      probe_logits=_all_f32(t.probe_logits), labels=y)
        for name, w, m in zip(self.names, self.weights, self.terms):
            value = m(sig)
            parts[name] = value
            total = total + w * value
        return total, parts, logits


def _f32(v: Any) -> Any:
    """A floating-point tensor in float32 (the same tensor when it already is); anything else as it is."""
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _all_f32(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _f32(v) for k, v in values.items()}


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


class Trainer:
    """The epoch loop in named steps, mdistiller's ``train -> train_epoch -> train_iter``: :meth:`fit` runs
    :meth:`train_epoch` for every epoch, which runs :meth:`train_batch` (forward under :meth:`autocast`, then
    :meth:`step`) on every batch of this rank's shard and keeps its losses on the device (:class:`LossSums`, whose
    divergence check is read every :attr:`check_every` batches); :meth:`evaluate` measures the epoch and
    :meth:`end_epoch` reports it to the progress bar and the callbacks. A variant overrides one step. See
    :func:`fit` for the arguments."""

    def __init__(self, distiller: Distiller, data: Data, train: TrainConfig, *, seed: int,
                 teacher: Optional[TeacherSignal] = None, online_teacher: Optional[nn.Module] = None,
                 teacher_val_pred: Optional[torch.Tensor] = None, callbacks: tuple[EpochCallback, ...] = (),
                 rank: int = 0, world_size: int = 1, module: Optional[nn.Module] = None,
                 progress: Optional[Callable[[int, dict], None]] = None):
        self.distiller, self.data, self.train, self.seed = distiller, data, train, seed
        self.teacher, self.online_teacher, self.teacher_val_pred = teacher, online_teacher, teacher_val_pred
        self.callbacks, self.rank, self.world_size, self.progress = callbacks, rank, world_size, progress
        self.module = module or distiller
        self.device = next(distiller.parameters()).device
        check_precision(train.precision, self.device)
        check_compile(train.compile, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.params = [p for p in distiller.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, train.optimizer)
        self.sched = make_scheduler(self.opt, train.optimizer, train.epochs)
        self.t_opt = make_optimizer(list(online_teacher.parameters()), train.optimizer) if online_teacher else None
        self.history: list[dict[str, float]] = []
        self.first_epoch = 1
        self.per_rank = len(data.x_train) // world_size

    # the training state (its format: kdray.core.checkpoint)

    def _parts(self) -> dict[str, Any]:
        return {"distiller": self.distiller, "optimizer": self.opt, "scheduler": self.sched,
                "online_teacher": self.online_teacher, "teacher_optimizer": self.t_opt}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue after the epoch that ``state`` (from :meth:`state`) ends with."""
        epoch, self.history = restore_training_state(state, self._parts())
        self.first_epoch = epoch + 1

    def state(self, epoch: int) -> dict[str, Any]:
        return training_state(epoch, self.history, self._parts())

    # the steps

    def fit(self) -> FitResult:
        """Every epoch from ``first_epoch`` on (the student compiled meanwhile when ``train.compile``)."""
        stopped = False
        with compiled(self.distiller.student, self.train.compile):
            for epoch in range(self.first_epoch, self.train.epochs + 1):
                t0 = time.perf_counter()
                losses = self.train_epoch(epoch)
                metrics = {"epoch": epoch, **losses, **self.evaluate(epoch, t0)}
                if not self.end_epoch(epoch, metrics):
                    stopped = True
                    break
        return FitResult(self.history, stopped, self.state(self.history[-1]["epoch"] if self.history else 0))

    check_every = 32  # batches between two reads of the divergence check (and one at the end of the epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's shard of a seeded permutation (the same on every rank), then the LR
        schedule's step; the mean of each loss (``loss``, ``loss_<part>``). The losses stay on the device
        (:class:`LossSums`); the divergence check reads them every :attr:`check_every` batches and at the end."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # same on every rank
        order = torch.randperm(len(self.data.x_train), generator=gen)
        order = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        sums = LossSums()
        self.distiller.train()
        if self.online_teacher is not None:
            self.online_teacher.train()
        for start in range(0, self.per_rank, self.data.batch_size):
            sums.add(self.train_batch(order[start:start + self.data.batch_size], gen))
            if sums.batches % self.check_every == 0:
                sums.check(epoch)
        sums.check(epoch)
        self.sched.step()
        return sums.means()

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One optimiser step on the examples ``idx`` (and the online teacher's); the batch's loss parts and
        ``loss``, on the device (:class:`LossSums` detaches them)."""
        x, y = rows_to(self.data.x_train, idx, self.device), rows_to(self.data.y_train, idx, self.device)
        if self.data.augment is not None:
            x = self.data.augment(x, gen)
        t_out = self.teacher.outputs(idx, x) if self.teacher is not None else TeacherOutputs(None)
        with self.autocast():
            loss, parts, s_logits = self.module(x, y, t_out)
        self.step(self.opt, loss, self.params, self.train.max_grad_norm)
        if self.online_teacher is not None:
            with self.autocast():
                t_loss = online_teacher_loss(self.online_teacher, x, y, s_logits.detach(), self.distiller)
            parts["teacher"] = t_loss
            self.step(self.t_opt, t_loss, [])
        self.scaler.update()
        return {**parts, "loss": loss}

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' autocast of ``train.precision`` (none for fp32)."""
        return autocast(self.train.precision, self.device)

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter],
             max_norm: Optional[float] = None) -> None:
        """Backward and one step of ``opt`` through the gradient scaler (a pass-through unless fp16), gradients
        of ``params`` clipped to ``max_norm`` when given."""
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if max_norm:
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(opt)

    def evaluate(self, epoch: int, t0: float) -> dict[str, float]:
        """Validation accuracy, loss and agreement with the teacher (the student under the training's autocast);
        the epoch's time (since ``t0``, a ``time.perf_counter()``), throughput and LR; on the last epoch the test
        metrics when the data has a test split."""
        data, device = self.data, self.device
        with self.autocast():
            val_logits = predict(self.distiller.student, data.x_val.to(device), data.eval_batch_size).float()
        y_val = data.y_val.to(device)
        metrics = {"val_acc": accuracy(val_logits, y_val),
                   "val_loss": F.cross_entropy(val_logits, y_val).item() if len(data.y_val) else math.nan}
        if self.teacher_val_pred is not None and len(data.y_val):
            agree = val_logits.argmax(1).cpu() == self.teacher_val_pred.cpu()
            metrics["teacher_agreement"] = agree.float().mean().item()
        elapsed = time.perf_counter() - t0
        metrics.update(epoch_time_s=elapsed, samples_per_s=self.per_rank * self.world_size / elapsed,
                       lr=self.opt.param_groups[0]["lr"])
        if epoch == self.train.epochs and data.x_test is not None:
            metrics.update(test_metrics(self.distiller.student, data))
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record the epoch, show it, hand it to the callbacks; False when one raised :class:`StopTraining`."""
        self.history.append(metrics)
        if self.progress is not None:
            self.progress(epoch, metrics)
        try:
            for cb in self.callbacks:
                cb(metrics, lambda e=epoch: self.state(e))
        except StopTraining:
            return False
        return True


def fit(distiller: Distiller, data: Data, train: TrainConfig, *, seed: int,
        start_state: Optional[dict[str, Any]] = None, trainer: type[Trainer] = Trainer, **options: Any) -> FitResult:
    """Train ``distiller`` for ``train.epochs`` epochs (with ``trainer``, :class:`Trainer` or a variant of it).

    ``options`` are the Trainer's: ``module`` is what is called for the forward pass (the Distiller itself, or
    a DDP wrapper of it); ``teacher`` gives the teacher's outputs of a batch; ``online_teacher`` (online scheme)
    is trained together with the student by mutual learning, the student's KD terms then see its detached
    outputs through ``teacher``; ``teacher_val_pred`` are the teacher's validation predictions, for the
    agreement metric; ``rank`` / ``world_size`` shard the batches; ``progress(epoch, metrics)`` shows them.
    Each callback gets the epoch's metrics and a function returning the full training state
    (a ``torch.save``-able dict, :func:`kdray.core.checkpoint.training_state`, that ``start_state`` accepts to
    resume). Raise :class:`StopTraining` from a callback to stop.
    """
    t = trainer(distiller, data, train, seed=seed, **options)
    if start_state:
        t.resume(start_state)
    return t.fit()


def mutual_learning_loss(t_logits: torch.Tensor, y: torch.Tensor, s_logits: torch.Tensor, T: float) -> torch.Tensor:
    """The online teacher's loss (deep mutual learning, Zhang et al. 2018, arXiv:1706.00384): CE on the labelled
    examples + :func:`~kdray.core.methods.kd_loss` with the student's logits as the soft targets."""
    return labelled_ce(t_logits, y) + kd_loss(t_logits, s_logits, T)


def online_teacher_loss(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, s_logits: torch.Tensor,
                        distiller: Distiller) -> torch.Tensor:
    """Deep mutual learning: the online teacher's loss on ``x`` from the labels and the student's (detached) soft
    outputs, at the temperature of the distiller's logit terms; logits in float32."""
    return mutual_learning_loss(teacher(x).float(), y, s_logits.float(), distiller.online_temperature())
