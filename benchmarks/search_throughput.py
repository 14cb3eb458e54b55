"""Fixed cost per trial of a search: how much of a trial slot goes to training, and how much to everything else.

A search of many short trials (most trials of a large search are short: ASHA stops them early) spends a trial
slot on process start, model and data set-up, checkpoints, result handling and scheduling as well as on training.
This benchmark runs ``kdray search`` (``kdray.search.driver.run_search``, as the command line runs it, MLflow
tracking to a temporary SQLite store, no hard-label baseline) over the quickstart's space (KD, Probe-KD, FitNet
and their parameters) on tiny MNIST-1D data (1000 samples, a teacher of 4 epochs): 24 trials of at most 2 epochs,
2 at a time, ASHA with grace period 1, on a local Ray of ``--concurrency`` CPUs. The teacher is trained and its outputs cached before the
Tune experiment starts, so the Tune experiment's wall time is the trials' alone.

Figures (from the trials' ``result.json`` rows and the search's own clock):

* ``tune_wall_s``: wall time of the Tune experiment (``SearchOutcome.tune_seconds``);
* ``train_s``: time spent in training epochs, the sum of every reported ``epoch_time_s``;
* ``fixed_cost_per_trial_s``: ``(tune_wall_s * concurrency - train_s) / trials``;
* ``training_share``: ``train_s / (tune_wall_s * concurrency)``, the share of trial-slot time spent training;
* ``trial_processes``: distinct trial processes (pids); ``checkpoints``: results that carried a checkpoint.

With ``--quickstart`` it then runs the README's quickstart search (``benchmarks/trial_overhead.py``'s timing:
fresh cache, so the teacher is trained too) and adds its wall time and best trial.

Usage: ``python benchmarks/search_throughput.py [--trials 24] [--concurrency 2] [--epochs 2] [--quickstart]``;
``--tiny`` runs 4 trials on 500 samples (the test suite runs it). Progress goes to stderr; the last line of
stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_space(folder: Path, trials: int, concurrency: int, epochs: int, num_samples: int) -> Path:
    """The quickstart's space and base config on tiny data: ``num_samples`` MNIST-1D samples, a teacher
    trained for 4 epochs, ``trials`` trials of at most ``epochs`` epochs, ASHA from epoch 1."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    base["data"]["params"] = {"num_samples": num_samples}
    base["teacher"]["recipe"]["train"].update(epochs=4, progress=False)
    base["train"].update(epochs=epochs, progress=False)
    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    space.update(name="search-throughput", base="base.yaml")
    space["search"].update(num_trials=trials, concurrency=concurrency, max_epochs=epochs, grace_period=1)
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return folder / "space.yaml"


def trial_rows(exp: Path) -> list[list[dict]]:
    """Every trial's ``result.json`` rows (one per report)."""
    return [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(exp.glob("*/result.json"))]


def figures(rows: list[list[dict]], wall: float, concurrency: int) -> dict:
    """The fixed cost per trial and the training share of trial-slot time, from the trials' rows."""
    reports = [r for trial in rows for r in trial]
    train_s = sum(float(r.get("epoch_time_s") or 0.0) for r in reports)
    slots = wall * concurrency
    return {"tune_wall_s": round(wall, 2), "train_s": round(train_s, 2),
            "fixed_cost_per_trial_s": round((slots - train_s) / max(len(rows), 1), 3),
            "training_share": round(train_s / slots, 4) if slots else None,
            "trials": len(rows), "epochs_reported": len(reports),
            "trial_processes": len({r.get("pid") for r in reports}),
            "checkpoints": sum(1 for r in reports if r.get("checkpoint_dir_name"))}


def throughput(args: argparse.Namespace, tmp: Path) -> dict:
    from kdray.search.driver import SearchOptions, run_search

    space = write_space(tmp, args.trials, args.concurrency, args.epochs, args.num_samples)
    out = run_search(str(space), SearchOptions(storage_path=str(tmp / "results"), progress=False, baseline=False,
                                               num_cpus=args.concurrency, register_top=0,
                                               tracking_uri=f"sqlite:///{tmp}/mlflow.db"))
    df = out.table
    res = figures(trial_rows(Path(out.experiment_path)), out.tune_seconds, args.concurrency)
    res.update(concurrency=args.concurrency, max_epochs=args.epochs, num_samples=args.num_samples,
               search_s=round(out.seconds, 2), status={str(k): int(v) for k, v in df.status.value_counts().items()},
               best_val_acc=round(float(df.val_acc.max()), 4))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true", help="4 trials on 500 samples (the test suite's run)")
    ap.add_argument("--quickstart", action="store_true", help="also time the quickstart search")
    args = ap.parse_args()
    if args.tiny:
        args.trials, args.num_samples = 4, 500
    tmp = Path(tempfile.mkdtemp(prefix="kdray-throughput-"))
    os.environ["KDRAY_CACHE_DIR"] = str(tmp / "cache")
    t0 = time.perf_counter()
    out = {"tiny": args.tiny, **throughput(args, tmp)}
    print(f"fixed cost per trial {out['fixed_cost_per_trial_s']} s, training share {out['training_share']}",
          file=sys.stderr, flush=True)
    if args.quickstart:
        import ray

        ray.shutdown()  # the quickstart starts its own local Ray, with every core
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from trial_overhead import quickstart

        out.update(quickstart())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
