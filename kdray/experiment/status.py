"""The status of a trial (or any run reported epoch by epoch): the one place it is derived from the last
report, for the results table, the MLflow tags, the progress bar, Optuna and the Prometheus metrics."""
from __future__ import annotations

from typing import Optional

STATUSES = ("finished", "pruned", "failed", "killed")


def trial_status(last: Optional[dict], errored: bool = False) -> str:
    """``failed`` if it raised; ``killed`` if it never reported an epoch; ``pruned`` if it stopped before
    ``max_epochs`` (early stopping); else ``finished``."""
    if errored:
        return "failed"
    last = last or {}
    epoch, max_epochs = int(last.get("epoch", 0) or 0), int(last.get("max_epochs", 0) or 0)
    if not epoch:
        return "killed"
    return "pruned" if epoch < max_epochs else "finished"
