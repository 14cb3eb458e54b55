"""What the search buys: TPE + ASHA vs random search vs TPE without early stopping, at equal epoch budgets.

One search space (``benchmarks/search_efficiency_space.yaml``: hard labels / KD / Probe-KD / FitNet, probe
layer and pooling, hint layer, temperature, loss weights, learning rate; MNIST-1D with 10% labels, the
8-channel CNN student, at most 16 epochs per trial) is searched by three searchers, each with 3 seeds:

* ``random``: Optuna's RandomSampler, no early stopping: ``--trials`` trials, every one trained to the end;
* ``tpe``: Optuna TPE, no early stopping: the same number of trials;
* ``tpe_asha``: Optuna TPE with ASHA (grace period 1, reduction factor 4: Ray's ``ASHAScheduler`` defaults;
  rungs at 1, 4 and 16 epochs): ``--asha-trials`` trials, more than the others because most are stopped early;
  its curve is cut at the same budget of epochs.

The budget is ``--trials x max_epochs`` training epochs (256 by default). Searcher seeds are ``seed`` for
random search, ``seed + 100`` for TPE and ``seed + 200`` for TPE + ASHA: Optuna's TPE draws its first 10
(startup) trials with a RandomSampler of the same seed, so equal seeds would make the three searches share
their first trials instead of being independent samples. Every search runs through
``kdray.search.run_search`` on one local Ray (2 CPUs, 2 trials at a time) without MLflow and without the
hard-label baseline. Each trial's per-epoch results are read from the ``result.json`` in its trial folder;
all epoch reports of a search are put in the order they finished (the trial's start, recovered from Ray's
``timestamp`` and ``time_total_s`` fields, plus ``time_total_s`` at that epoch) and counted:
the curve is the best validation accuracy reported so far against the number of epochs trained so far.
Reported per searcher: the curve's value at the budget (mean ± std over seeds) and the epochs each run
needs to reach the *final best of random search* (its mean over the random seeds) and their median, a run
that never reaches it counting as the longest; the plot goes to
``benchmarks/results/search_efficiency.png``.

Usage: ``python benchmarks/search_efficiency.py [--seeds 0 1 2] [--trials 16] [--asha-trials 64]
[--max-epochs 16] [--grace-period 1] [--reduction-factor 4] [--tpe-startup-trials 10] [--searchers random tpe tpe_asha] [--plot PATH] [--cache-dir DIR]
[--storage DIR [--reuse]]``; ``--reuse`` re-reads the searches already in ``--storage`` instead of running them
(to redo the analysis and the plot). Progress goes to stderr; the last line of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
SPACE = HERE / "search_efficiency_space.yaml"
SEARCHERS = {  # name -> (searcher, scheduler, seed offset)
    "random": ("random", "none", 0),
    "tpe": ("tpe", "none", 100),
    "tpe_asha": ("tpe", "asha", 200),
}
LABELS = {"random": "random search, no early stopping", "tpe": "TPE, no early stopping", "tpe_asha": "TPE + ASHA"}
COLOURS = {"random": "tab:gray", "tpe": "tab:blue", "tpe_asha": "tab:red"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def epoch_events(table, metric: str = "val_acc") -> list[dict]:
    """Every epoch report of a search, in the order it finished: [{trial, epoch, value, t}].

    Ray writes ``timestamp`` (whole seconds) and ``time_total_s`` (seconds since the trial started) with each
    report; every report bounds the trial's start to ``[timestamp - time_total_s, timestamp + 1 - time_total_s)``,
    and the intersection of these intervals over a trial's reports pins it down to a fraction of a second.
    An epoch then finished at ``start + time_total_s``.
    """
    events = []
    for _, row in table.iterrows():
        result = Path(row["path"]) / "result.json"
        if not result.is_file():
            continue
        records = []
        with open(result) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if metric in r and r.get("epoch") is not None:
                        records.append(r)
        if not records:
            continue
        lo = max(float(r["timestamp"]) - float(r["time_total_s"]) for r in records)
        hi = min(float(r["timestamp"]) + 1.0 - float(r["time_total_s"]) for r in records)
        start = (lo + hi) / 2 if lo <= hi else lo
        for r in records:
            events.append({"trial": row["trial_id"], "epoch": int(r["epoch"]), "value": float(r[metric]),
                           "t": start + float(r["time_total_s"])})
    # a trial restored from a checkpoint repeats no epoch; keep the first report of each (trial, epoch)
    seen, unique = set(), []
    for e in sorted(events, key=lambda e: (e["t"], e["epoch"])):
        if (e["trial"], e["epoch"]) not in seen:
            seen.add((e["trial"], e["epoch"]))
            unique.append(e)
    return unique


def curve(events: list[dict]) -> list[float]:
    """best[k] = best value after k+1 epochs spent."""
    best, out = float("-inf"), []
    for e in events:
        best = max(best, e["value"])
        out.append(best)
    return out


def at_budget(c: list[float], budget: int) -> float:
    return c[min(budget, len(c)) - 1] if c else float("nan")


def epochs_to_reach(c: list[float], target: float, budget: int) -> Optional[int]:
    for k, v in enumerate(c[:budget]):
        if v >= target - 1e-9:
            return k + 1
    return None


def median_reach(reach: list[Optional[int]]) -> Optional[float]:
    """Median of the epochs to reach the target, a run that never reached it counting as the longest
    (None when the median itself is such a run)."""
    m = statistics.median([math.inf if x is None else x for x in reach]) if reach else math.inf
    return None if math.isinf(m) else m


def best_within(table, events: list[dict], budget: int, max_epochs: int):
    """The results row of the best trial (by final val_acc) that finished its last epoch within the budget."""
    done = {e["trial"] for e in events[:budget] if e["epoch"] == max_epochs}
    rows = table[table.trial_id.isin(done)].sort_values("val_acc", ascending=False)
    return rows.iloc[0] if len(rows) else None


def trial_facts(row) -> Optional[dict]:
    if row is None:
        return None
    return {"val_acc": round(float(row["val_acc"]), 4), "test_acc": round(float(row["test_acc"]), 4),
            "method": row.get("param.method"), "epochs": int(row["epochs"])}


def plot(curves: dict[str, list[list[float]]], budget: int, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, cs in curves.items():
        cs = [c[:budget] for c in cs if c]
        for c in cs:
            ax.step(range(1, len(c) + 1), c, where="post", color=COLOURS[name], alpha=0.3, lw=1)
        n = max(len(c) for c in cs)  # a search that ran out of trials before the budget keeps its final best
        mean = np.mean([c + [c[-1]] * (n - len(c)) for c in cs], axis=0)
        ax.step(range(1, n + 1), mean, where="post", color=COLOURS[name], lw=2.2,
                label=f"{LABELS[name]} (mean of {len(cs)})")
    ax.axhline(target, color="black", ls="--", lw=1, label=f"final best of random search (mean) {target:.3f}")
    ax.set_xlim(0, budget)
    lo = min(min(c[min(len(c), 8) - 1] for c in cs if c) for cs in curves.values())
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(max(c[-1] for c in cs if c) for cs in curves.values()) + 0.02))
    ax.set_xlabel("training epochs spent (all trials)")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    ap.add_argument("--trials", type=int, default=16, help="trials of the searchers without early stopping")
    ap.add_argument("--asha-trials", type=int, default=64, help="trials of TPE + ASHA (its curve is cut at the budget)")
    ap.add_argument("--max-epochs", type=int, default=16)
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--reduction-factor", type=float, default=4)
    ap.add_argument("--tpe-startup-trials", type=int, default=10)
    ap.add_argument("--space", default=str(SPACE))
    ap.add_argument("--plot", default=str(HERE / "results" / "search_efficiency.png"), help="PNG path ('' for none)")
    ap.add_argument("--cache-dir", help="kdray cache folder (default: $KDRAY_CACHE_DIR, else kdray's default)")
    ap.add_argument("--storage", help="folder for the searches' results (default: a new temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="read searches already in --storage (results.parquet) instead of running them again")
    args = ap.parse_args()
    if args.cache_dir:
        os.environ["KDRAY_CACHE_DIR"] = args.cache_dir
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import ray

    from kdray.search.driver import SearchOptions, run_search
    from kdray.search.ray_cluster import init_ray
    from kdray.search.results import read_results

    t_start = time.perf_counter()
    budget = args.trials * args.max_epochs
    storage = Path(args.storage or tempfile.mkdtemp(prefix="kdray-search-eff-"))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.searchers}
    try:
        for seed in args.seeds:
            for name in args.searchers:
                searcher, scheduler, offset = SEARCHERS[name]
                n = args.asha_trials if scheduler == "asha" else args.trials
                overrides = {"searcher": searcher, "scheduler": scheduler, "num_trials": n, "seed": seed + offset,
                             "max_epochs": args.max_epochs, "grace_period": args.grace_period, "concurrency": 2,
                             "reduction_factor": args.reduction_factor,
                             "tpe_startup_trials": args.tpe_startup_trials}
                folder = storage / f"{name}-{seed}"
                t0 = time.perf_counter()
                if args.reuse and (folder / "search-efficiency" / "results.parquet").is_file():
                    table, wall = read_results(str(folder / "search-efficiency")), None
                else:
                    init_ray(None, num_cpus=2)  # one local Ray for every search (run_search reuses it)
                    table = run_search(args.space, SearchOptions(
                        storage_path=str(folder), overrides=overrides, num_cpus=2, progress=False,
                        baseline=False, tracking=False, overwrite=True)).table
                    wall = time.perf_counter() - t0
                events = epoch_events(table)
                c = curve(events)
                status = {k: int(v) for k, v in table["status"].value_counts().items()}
                finished = table[table.status == "finished"].sort_values("val_acc", ascending=False)
                best_row = finished.iloc[0] if len(finished) else None
                run = {"seed": seed, "searcher_seed": seed + offset, "trials": len(table), "status": status,
                       "epochs_total": int(table["epochs"].sum()), "epochs_counted": len(c),
                       "best_val_at_budget": round(at_budget(c, budget), 4),
                       "best_val_all": round(c[-1], 4) if c else None, "curve": [round(v, 4) for v in c],
                       "best_finished_trial": trial_facts(best_row),
                       "best_finished_within_budget": trial_facts(best_within(table, events, budget, args.max_epochs)),
                       "seconds": round(wall, 1) if wall is not None else None}
                runs[name].append(run)
                log(f"{name} seed {seed}: {len(table)} trials {status}, {run['epochs_total']} epochs, best val at "
                    f"budget {run['best_val_at_budget']:.4f}, overall {run['best_val_all']}, "
                    + (f"{wall:.0f} s" if wall is not None else "read from --storage"))
    finally:
        ray.shutdown()

    target = (statistics.mean(r["curve"][min(budget, len(r["curve"])) - 1] for r in runs["random"])
              if runs.get("random") else None)
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        vals = [r["best_val_at_budget"] for r in rs]
        reach = [epochs_to_reach(r["curve"], target, budget) if target is not None else None for r in rs]
        got = [x for x in reach if x is not None]
        summary[name] = {
            "best_val_at_budget": {"mean": round(statistics.mean(vals), 4),
                                   "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
                                   "runs": vals},
            "epochs_to_random_final_best": reach,
            "epochs_to_random_final_best_median": median_reach(reach),
            "reached": f"{len(got)}/{len(reach)}",
            "trials": [r["trials"] for r in rs], "epochs_total": [r["epochs_total"] for r in rs],
            "seconds": [r["seconds"] for r in rs],
            "best_finished_within_budget": [r["best_finished_within_budget"] for r in rs],
        }
    if target is not None and "tpe_asha" in summary and summary["tpe_asha"]["epochs_to_random_final_best_median"]:
        summary["tpe_asha"]["fraction_of_budget"] = round(summary["tpe_asha"]["epochs_to_random_final_best_median"]
                                                          / budget, 3)
    if args.plot and runs:
        plot({k: [r["curve"] for r in v] for k, v in runs.items() if v}, budget,
             target if target is not None else float("nan"), Path(args.plot),
             f"MNIST-1D (10% labels) search space, {budget} epochs budget, seeds {args.seeds}")
        log(f"plot: {args.plot}")
    out = {"budget_epochs": budget, "max_epochs": args.max_epochs, "trials": args.trials,
           "asha_trials": args.asha_trials, "seeds": args.seeds, "random_final_best_mean":
           round(target, 4) if target is not None else None, "summary": summary,
           "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "curve"} for r in v] for k, v in runs.items()},
           "curves": {k: [r["curve"] for r in v] for k, v in runs.items()},
           "plot": args.plot or None, "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
