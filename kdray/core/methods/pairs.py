"""Terms on (student layer, teacher layer) pairs: :class:`PairMethod` checks the layers' shapes, builds the
trainable connectors and pools the larger spatial map; a subclass gives the loss of one pair."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config import TermConfig
from kdray.core.methods.base import STUDENT_LAYERS, TEACHER_LAYERS, Method, Signals, feature, fmt_shape, shape_of
from kdray.errors import ConfigError

_RANK_TEXT = {2: "(B, D)", 3: "(B, C, L)", 4: "(B, C, H, W)"}


def ranks_text(ranks: tuple[int, ...]) -> str:
    names = [_RANK_TEXT[r] for r in ranks]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def connector(in_shape: torch.Size | tuple, out_shape: torch.Size | tuple) -> nn.Module:
    """A trainable map from ``in_shape``'s channels to ``out_shape``'s (identity when they agree).

    ``nn.Linear`` for (B, D), a 1x1 ``nn.Conv1d`` for (B, C, L), a 1x1 ``nn.Conv2d`` for (B, C, H, W).
    Spatial sizes are not touched (see :func:`pool_to`).
    """
    c_in, c_out = in_shape[1], out_shape[1]
    if c_in == c_out:
        return nn.Identity()
    rank = len(in_shape)
    if rank == 2:
        return nn.Linear(c_in, c_out)
    if rank == 3:
        return nn.Conv1d(c_in, c_out, kernel_size=1)
    if rank == 4:
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    raise ValueError(f"no connector for outputs of shape {fmt_shape(in_shape)}")


def pool_to(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger so both have the smaller spatial size.

    Works per spatial dimension; (B, D) tensors and equal sizes are returned unchanged.
    """
    if a.dim() < 3 or a.shape[2:] == b.shape[2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))
    pool = F.adaptive_avg_pool1d if a.dim() == 3 else F.adaptive_avg_pool2d
    a = a if tuple(a.shape[2:]) == size else pool(a, size)
    b = b if tuple(b.shape[2:]) == size else pool(b, size)
    return a, b


class PairMethod(Method):
    """A loss on (student layer i, teacher layer i) pairs, reduced over the pairs by the mean, or by the
    sum where ``sum_pairs`` is set (each method's docstring says which, and why).

    Class switches: ``ranks`` the output ranks (with batch dim) allowed, None for any; ``pool`` pools
    the larger spatial map to the smaller; ``connect`` maps student channels to teacher channels
    with a trainable connector. Subclasses define ``pair_loss(s, t)`` (calling their pure loss).
    """

    kind, reads, layers = "feature", frozenset({TEACHER_LAYERS, STUDENT_LAYERS}), "pairs"
    ranks: ClassVar[Optional[tuple[int, ...]]] = (2, 3, 4)
    pool: ClassVar[bool] = True
    connect: ClassVar[bool] = True
    sum_pairs: ClassVar[bool] = False  # True: sum over pairs instead of the mean

    def __init__(self, term: TermConfig, temperature: float):
        super().__init__(term, temperature)
        self.adapters = nn.ModuleList()
        self.built = False

    def build(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        adapters = []
        for sp, tp in zip(self.student_layers, self.teacher_layers):
            s = shape_of(student_shapes, sp, "student_layers")
            t = shape_of(teacher_shapes, tp, "teacher_layers")
            self._check_rank("student_layers", sp, s)
            self._check_rank("teacher_layers", tp, t)
            if (self.pool or self.connect) and len(s) != len(t):
                raise ConfigError("student_layers", sp, f"a layer with the same kind of output as teacher "
                                                        f"layer {tp} {fmt_shape(t)}; {sp} has shape {fmt_shape(s)}")
            adapters.append(connector(s, t) if self.connect else nn.Identity())
        self.adapters = nn.ModuleList(adapters)
        self.built = True

    def _check_rank(self, fld: str, path: str, shape: torch.Size) -> None:
        if self.ranks is not None and len(shape) not in self.ranks:
            what = "has channels and positions " if self.ranks == (3, 4) else "is "
            raise ConfigError(fld, path, f"a layer whose output {what}{ranks_text(self.ranks)}; "
                                         f"{path} has shape {fmt_shape(shape)}")

    def forward(self, sig: Signals) -> Tensor:
        if not self.built:
            raise RuntimeError(f"call build() on the {self.name} term before using it")
        losses = []
        for adapter, sp, tp in zip(self.adapters, self.student_layers, self.teacher_layers):
            s = feature(sig.student_features, sp, "student")
            t = feature(sig.teacher_features, tp, "teacher").detach()
            if self.pool:
                s, t = pool_to(s, t)
            losses.append(self.pair_loss(adapter(s), t))
        total = torch.stack(losses).sum()
        return total if self.sum_pairs else total / len(losses)

    def pair_loss(self, s: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
