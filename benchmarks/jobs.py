"""Shared by the benchmark scripts: running training jobs in worker processes, and mean/std summaries."""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Callable, Iterator, Optional


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(fn: Callable[[Any], dict], jobs: list[tuple], workers: int) -> Iterator[dict]:
    """``fn`` of each job's config (its last item), yielded in job order; ``workers`` > 1 runs them in that
    many forked processes of one torch thread each."""
    if workers <= 1:
        for job in jobs:
            yield fn(job[-1])
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap(fn, [job[-1] for job in jobs])


def summarise(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "runs": [round(v, 4) for v in values]}


def report(out: dict, md: str, markdown_path: Optional[str], log: Callable[[str], None]) -> None:
    """The tables to the progress log (and to ``markdown_path``), then the JSON summary as the last stdout line."""
    log("\n" + md)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(md + "\n")
    print_json(out)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(out: dict) -> None:
    """The summary as one line of strict JSON (NaN, e.g. a metric without a validation split, becomes null)."""
    print(json.dumps(_finite(out), allow_nan=False))
