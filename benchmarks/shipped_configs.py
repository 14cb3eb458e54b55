"""The shipped MNIST-1D configs with 10% of the labels: hard labels, logit KD, Probe-KD, a two-teacher
ensemble, born-again generations and deep self-distillation.

Runs ``configs/mnist1d_hard_label.yaml``, ``configs/mnist1d_kd.yaml`` (as born-again generation 0, followed by
``--generations`` more: each a fresh student taught by the previous one, as ``kdray train --generations N``),
``configs/mnist1d_probe_kd.yaml``, ``configs/mnist1d_ensemble.yaml`` and ``configs/mnist1d_self_aux.yaml``
as they are, with ``seed`` set to 0, 1 and 2 (the seed draws the student's initialisation and the batch order;
data, split and labelled subset come from ``data.seed`` and stay fixed, so the teacher is trained once
and cached). Reports test accuracy mean and standard deviation per config (``born_again_genK`` for the
generations), the teacher's and the ensemble's test accuracy, and the wall time of the first run, which trains the teacher: the script uses a fresh, empty
cache folder unless ``--cache-dir`` names one.

Usage: ``python benchmarks/shipped_configs.py [--seeds 0 1 2] [--generations 2]``. Progress goes to stderr; the last line
of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kdray.experiment.configs import load_config
from kdray.experiment.run import born_again, prepare, run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"hard_label": "configs/mnist1d_hard_label.yaml", "kd": "configs/mnist1d_kd.yaml",
           "probe_kd": "configs/mnist1d_probe_kd.yaml", "ensemble_kd": "configs/mnist1d_ensemble.yaml",
           "self_aux": "configs/mnist1d_self_aux.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-dir", help="kdray cache folder (default: a new temporary one)")
    ap.add_argument("--generations", type=int, default=2, help="born-again generations after the KD student")
    args = ap.parse_args()
    os.environ["KDRAY_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="kdray-bench-")
    results: dict[str, list[float]] = {}
    teacher_acc: dict[str, float] = {}
    first_run_s = None
    for name, path in CONFIGS.items():
        for seed in args.seeds:
            cfg = load_config(ROOT / path, [f"seed={seed}", "train.progress=false"])
            t0 = time.perf_counter()
            if name == "kd":  # generation 0 of born-again is the KD student itself
                with tempfile.TemporaryDirectory(prefix="kdray-born-again-") as tmp:
                    summaries = born_again(cfg, args.generations, tmp)
                for g, s in enumerate(summaries[1:], 1):
                    results.setdefault(f"born_again_gen{g}", []).append(s.test_acc)
                summary = summaries[0]
            else:
                summary = run(cfg, prepare(cfg))
            seconds = time.perf_counter() - t0
            first_run_s = seconds if first_run_s is None else first_run_s
            results.setdefault(name, []).append(summary.test_acc)
            if summary.teacher.get("teacher_test_acc") is not None:
                teacher_acc[name] = summary.teacher["teacher_test_acc"]
            print(f"{name} seed {seed}: test_acc {summary.test_acc:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    out = {
        "label_fraction": 0.1,
        "seeds": args.seeds,
        "teacher_test_acc": teacher_acc.get("kd"),
        "ensemble_test_acc": teacher_acc.get("ensemble_kd"),
        "first_run_with_teacher_training_s": round(first_run_s, 1),
        **{name: {"mean": round(statistics.mean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                  "runs": [round(x, 4) for x in v]} for name, v in results.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
