"""What the teacher cache buys: per-epoch time of KD with cached teacher outputs, with a live teacher, and
of the same student trained on hard labels alone.

MNIST-1D (5,000 examples, all labels), teacher ``mnist1d_cnn`` with 64 channels (about 50x the student's
FLOPs, counted by this script), student ``mnist1d_cnn_small`` with 8 channels, batch 100. Three ways to
train the same student, each for ``--epochs`` epochs, interleaved over ``--reps`` repetitions so that
load changes touch each alike:

* ``hard``: hard-label cross-entropy only (no teacher at all);
* ``kd_cached``: KD (T=4) with the teacher's logits read from the teacher cache (``kdray.core.cache``);
* ``kd_live``: the same KD term with the teacher run on every batch (:class:`kdray.core.signals.LiveTeacher`).

The time per epoch is the median of the epochs' ``epoch_time_s`` (training pass plus validation), the
first epoch left out. Also timed: building the cache entry once (teacher over all splits plus writing).

Usage: ``python benchmarks/teacher_cache.py [--epochs 6] [--reps 3]``. Progress on stderr; the last line
of stdout is a JSON object with the ratios ``kd_cached / hard`` (goal <= 1.15) and ``kd_live / kd_cached``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

RAW = {
    "name": "cache-bench",
    "seed": 0,
    "data": {"name": "mnist1d", "batch_size": 100, "val_fraction": 0.1},
    "teacher": {"model": {"name": "mnist1d_cnn", "kwargs": {"channels": 64}},
                "recipe": {"train": {"epochs": 10, "optimizer": {"name": "adam", "lr": 0.01}, "progress": False}}},
    "student": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 8}},
    "distill": {"temperature": 4.0, "ce_weight": 0.1, "terms": [{"method": "kd", "weight": 0.9}]},
    "train": {"epochs": 6, "progress": False},
}


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds x 2 of the convolutions and linear layers for one example."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv1d):
            total += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * 2
        elif isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features * 2

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def epoch_seconds(cfg, prep, mode: str) -> float:
    from kdray.core.signals import LiveTeacher
    from kdray.core.train import Data, fit, seed_everything
    from kdray.experiment.run import build

    seed_everything(cfg.seed)
    built = build(cfg, prep, torch.device("cpu"))
    signal = built.signal
    if mode == "kd_live":
        signal = LiveTeacher(prep.teacher, built.distiller.teacher_layers, {})
    b = prep.bundle
    data = Data(b.x_train, b.y_train, b.x_val, b.y_val, cfg.data.batch_size, cfg.data.eval_batch_size)
    try:
        result = fit(built.distiller, data, cfg.train, seed=cfg.seed, teacher=signal if mode != "hard" else None)
    finally:
        built.distiller.close()
        if isinstance(signal, LiveTeacher):
            signal.close()
    return statistics.median(h["epoch_time_s"] for h in result.history[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache-dir", help="kdray cache folder (default: a new temporary one)")
    args = ap.parse_args()
    os.environ["KDRAY_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="kdray-cache-bench-")
    torch.set_num_threads(1)  # one trial = one CPU, as in a search

    from kdray.core.cache import get_cache
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import cache_info, cache_request, prepare

    raw = json.loads(json.dumps(RAW))
    raw["train"]["epochs"] = args.epochs
    kd = parse_config(raw)
    hard = parse_config({**raw, "distill": {"ce_weight": 1.0, "terms": []}})
    prep = prepare(kd)
    b = prep.bundle
    t0 = time.perf_counter()
    req = cache_request([kd], prep, b.x_train[:100])
    entry = get_cache(prep.teacher, b, req, info=cache_info(kd))
    build_s = time.perf_counter() - t0
    student = __import__("kdray.models", fromlist=["build_model"]).build_model(kd.student, b.num_classes)
    t_flops, s_flops = flops(prep.teacher, b.x_train), flops(student, b.x_train)
    times: dict[str, list[float]] = {"hard": [], "kd_cached": [], "kd_live": []}
    for rep in range(args.reps):
        for mode in times:
            s = epoch_seconds(hard if mode == "hard" else kd, prep, mode)
            times[mode].append(s)
            print(f"rep {rep} {mode}: {s * 1000:.1f} ms/epoch", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "teacher_flops": t_flops, "student_flops": s_flops, "flops_ratio": round(t_flops / s_flops, 1),
        "examples_train": len(b.x_train), "epochs": args.epochs, "reps": args.reps,
        **{f"{k}_epoch_s": round(v, 4) for k, v in med.items()},
        "ratio_kd_cached_over_hard": round(med["kd_cached"] / med["hard"], 3),
        "speedup_cached_over_live": round(med["kd_live"] / med["kd_cached"], 3),
        "cache_build_s": round(build_s, 2), "cache_bytes_per_example": entry.manifest["bytes_per_example"],
        "cache_key": entry.key,
    }))


if __name__ == "__main__":
    main()
