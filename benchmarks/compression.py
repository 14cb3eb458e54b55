"""Float vs pruned vs int8 students: test accuracy, size on disk (plain and gzipped) and CPU latency.

Runs ``configs/mnist1d_kd.yaml`` (logit KD, 10% labels) with ``export: {sparsity: S, finetune_epochs: 2,
quantize: true}`` for the small CNN and the MLP student, 3 seeds each. Latency is the median of 50 forward
passes of a batch of 100 on one CPU thread (after 10 warm-up passes), measured for all three variants one
after the other in the same process.

Usage: ``python benchmarks/compression.py [--sparsity 0.5] [--seeds 0 1 2]``. Progress on stderr; the last
line of stdout is a JSON object: per student and variant, mean test accuracy, size and latency.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from kdray.experiment.configs import load_config
from kdray.experiment.run import prepare, run

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {"cnn_small": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 8}},
            "mlp": {"name": "mnist1d_mlp", "kwargs": {}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=2, help="KD fine-tune after pruning")
    ap.add_argument("--cache-dir", help="kdray cache folder (default: a new temporary one)")
    args = ap.parse_args()
    os.environ["KDRAY_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="kdray-compress-")
    out: dict = {"sparsity": args.sparsity, "seeds": args.seeds, "epochs": args.epochs,
                 "finetune_epochs": args.finetune_epochs}
    for key, student in STUDENTS.items():
        rows: dict[str, list[dict]] = {}
        for seed in args.seeds:
            cfg = load_config(ROOT / "configs/mnist1d_kd.yaml", {
                "seed": seed, "train.progress": False, "train.epochs": args.epochs, "student": student,
                "export": {"sparsity": args.sparsity, "finetune_epochs": args.finetune_epochs, "quantize": True}})
            summary = run(cfg, prepare(cfg))
            for variant, m in summary.export.items():
                rows.setdefault(variant, []).append(m)
            print(f"{key} seed {seed}: " + ", ".join(f"{v} {m['test_acc']:.3f}" for v, m in summary.export.items()),
                  file=sys.stderr, flush=True)
        out[key] = {variant: {"test_acc": round(statistics.mean(m["test_acc"] for m in ms), 4),
                              "test_acc_std": round(statistics.stdev(m["test_acc"] for m in ms), 4) if len(ms) > 1 else 0,
                              "size_bytes": int(statistics.mean(m["size_bytes"] for m in ms)),
                              "gzip_bytes": int(statistics.mean(m["gzip_bytes"] for m in ms)),
                              "latency_ms": round(statistics.median(m["latency_ms"] for m in ms), 4),
                              "sparsity": round(statistics.mean(m["sparsity"] for m in ms), 3)}
                    for variant, ms in rows.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
