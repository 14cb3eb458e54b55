"""Progress display for long work (epochs of a run, trials of a search), via tqdm on stderr."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from tqdm.auto import tqdm

SHOWN = ("loss", "val_acc", "teacher_agreement")


@contextlib.contextmanager
def epoch_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[int, dict], None]]:
    """Yields ``update(epoch, metrics)``; shows loss and validation accuracy as the bar's postfix."""
    bar = tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, file=sys.stderr, leave=False,
               dynamic_ncols=True)

    def update(epoch: int, metrics: dict) -> None:
        bar.n = epoch
        bar.set_postfix({k: f"{metrics[k]:.4f}" for k in SHOWN if k in metrics}, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
