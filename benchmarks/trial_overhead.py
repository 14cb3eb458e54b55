"""Fixed cost of one trivial trial: a plain Tune function trainable vs. a TorchTrainer trial.

The trial trains a small student for 1 epoch on 1000 MNIST-1D samples, without a teacher, so what is
measured is nearly all overhead. Three ways, on a local Ray using every core of this machine:

* ``function``: a Tune function trainable running ``kdray.experiment.run.run`` in its own process (1 CPU);
* ``torchtrainer_1`` / ``torchtrainer_2``: a Tune function trainable (the driver, reserving no CPU) that
  runs ``kdray.search.distributed.run_torchtrainer_trial`` with 1 or 2 workers of 1 CPU each.

Each repetition is a fresh ``Tuner`` with one trial; the time is the wall time of ``Tuner.fit()``, i.e.
everything a trial costs from being scheduled to its result (the trial actor, for TorchTrainer also the
controller, the placement group, the worker actors, the process group, reports and teardown). The
modes are interleaved so that load changes on the machine touch each alike. Ray Train runs with its
defaults (e.g. the controller polls its workers every 2 s).

With ``--quickstart`` it then runs the README's quickstart search (``search_spaces/quickstart.yaml``, fresh
cache, so the teacher is trained too; MLflow to a temporary SQLite store) and reports its wall time and
trials per minute.

Usage: ``python benchmarks/trial_overhead.py [--reps 3] [--quickstart]``. Progress goes to stderr; the last line of
stdout is a JSON object with the median seconds per trial of each mode and the 2-worker/function ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

RAW = {
    "name": "overhead",
    "seed": 0,
    "data": {"name": "mnist1d", "batch_size": 50, "params": {"num_samples": 1000}},
    "student": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 4}},
    "train": {"epochs": 1, "progress": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quickstart", action="store_true", help="also time the quickstart search")
    args = ap.parse_args()

    import ray
    from ray import tune

    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import prepare, run
    from kdray.search.distributed import DRIVER_RESOURCES, run_torchtrainer_trial

    cpus = max(2, os.cpu_count() or 2)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="kdray-overhead-")
    raw = RAW
    prep = prepare(parse_config(raw))
    prep_ref = ray.put(prep)

    def function_trial(config):
        run(parse_config(raw), ray.get(prep_ref), callbacks=(lambda m, _state: tune.report(m),))

    def torchtrainer_trial(config):
        run_torchtrainer_trial(raw, prep_ref, num_workers=config["workers"], cpus_per_worker=1,
                               gpus_per_worker=0, name=f"train-{tune.get_context().get_trial_id()}",
                               storage_path=storage, max_epochs=None)

    modes = {
        "function_s": (tune.with_resources(function_trial, {"cpu": 1}), {}),
        "torchtrainer_1_s": (tune.with_resources(torchtrainer_trial, DRIVER_RESOURCES), {"workers": 1}),
        "torchtrainer_2_s": (tune.with_resources(torchtrainer_trial, DRIVER_RESOURCES), {"workers": 2}),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(args.reps):
        for key, (trainable, space) in modes.items():
            tuner = tune.Tuner(trainable, param_space=space,
                               run_config=tune.RunConfig(name=f"{key}-{rep}", storage_path=storage, verbose=0))
            t0 = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - t0
            if grid.num_errors or grid[0].metrics.get("epoch") != 1:
                raise SystemExit(f"{key} repetition {rep} did not finish its epoch: {grid.errors}")
            times[key].append(wall)
            print(f"rep {rep} {key}: {wall:.2f} s", file=sys.stderr, flush=True)
    ray.shutdown()

    out = {k: round(statistics.median(v), 2) for k, v in times.items()}
    out["ratio_2w_over_function"] = round(out["torchtrainer_2_s"] / out["function_s"], 2)
    out["reps"] = args.reps
    out["cpus"] = cpus
    if args.quickstart:
        out.update(quickstart())
    print(json.dumps(out))


def quickstart() -> dict:
    """The quickstart search end to end: trials, statuses, wall time and trials per minute."""
    from pathlib import Path

    from kdray.search.driver import SearchOptions, run_search

    tmp = Path(tempfile.mkdtemp(prefix="kdray-quickstart-"))
    os.environ["KDRAY_CACHE_DIR"] = str(tmp / "cache")
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    t0 = time.perf_counter()
    out = run_search(str(space), SearchOptions(storage_path=str(tmp / "results"), progress=False,
                                               tracking_uri=f"sqlite:///{tmp}/mlflow.db"))
    wall = time.perf_counter() - t0
    df = out.table
    best = df[df.status == "finished"].sort_values("val_acc", ascending=False).iloc[0]
    return {"quickstart_s": round(wall, 1), "quickstart_tune_s": round(out.tune_seconds, 1),
            "quickstart_trials": len(df),
            "quickstart_trials_per_min": round(len(df) / (wall / 60), 2),
            "quickstart_status": df.status.value_counts().to_dict(),
            "quickstart_best_val_acc": round(float(best.val_acc), 4),
            "quickstart_best_test_acc": round(float(best.test_acc), 4),
            "quickstart_hard_label_test_acc": round(float((out.baseline or {}).get("test_acc", float("nan"))), 4)}


if __name__ == "__main__":
    main()
