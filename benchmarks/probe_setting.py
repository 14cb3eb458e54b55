"""The Probe-KD setting: a teacher whose own output head does not fit the task, and few labels.

The teacher (``mnist1d_cnn``, 32 channels) is trained once, from its recipe, on *another* MNIST-1D: a
different generator configuration (``seed`` 1234 instead of 42, i.i.d. noise 0.05 instead of 0.02,
correlated noise 0.4 instead of 0.25, shear 1.0 instead of 0.75, 10,000 examples) and a *coarser labelling*:
``label_map`` [0,0,1,1,2,2,3,3,4,4] groups the ten digits into five classes. Its five logits cannot be
soft targets for the ten-class task, so logit KD is refused by kdray (a ConfigError, shown as n/a).

The target task is the standard ten-class MNIST-1D (``make_dataset`` defaults: 4,000 train / 1,000 test, 400 of
the training examples carved out as validation) with only ``--labels`` labelled training examples (default
50, 200 and 1,000; stratified, via ``data.label_fraction``); the remaining training inputs are the unlabelled
transfer set. Compared, for 3 seeds each, on the ``mnist1d_cnn_small`` student (8 channels, 30 epochs, Adam
1e-2, batch 100):

* the hard-label student (CE on the labelled examples only);
* logit KD (n/a, see above);
* feature methods at their reference weights with CE weight 1: FitNet (``relu3`` -> ``relu3``), attention
  transfer (``relu1..3``), similarity preserving and PKT (``relu3``);
* Probe-KD (``0.1 CE + 0.9 probe KD``, T = 4) with the probe on each teacher layer ``relu1``, ``relu2``,
  ``relu3``; per layer the pooling (``mean`` or ``max``) is the one with the better probe validation accuracy.
  The probe's own validation and test accuracy are shown beside the student's. The last row is Probe-KD
  on the layer whose probe has the best *validation* accuracy (what one would pick without test labels).

``--workers`` (default 2) trainings run at a time, each in a forked process with one thread.

Usage: ``python benchmarks/probe_setting.py [--labels 50 200 1000] [--seeds 0 1 2] [--methods ...] [--epochs 30]
[--workers 2] [--cache-dir DIR] [--markdown FILE]``; ``--num-samples``, ``--teacher-samples`` and
``--teacher-epochs`` shrink it for a quick check. Progress and a markdown table go to stderr; the last line
of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from jobs import report, run_jobs, summarise  # benchmarks/jobs.py

TEACHER_LABEL_MAP = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
TEACHER_GENERATOR = {"seed": 1234, "iid_noise_scale": 0.05, "corr_noise_scale": 0.4, "shear_scale": 1.0}
PROBE_LAYERS = ["relu1", "relu2", "relu3"]
PROBE_POOLINGS = ["mean", "max"]
PROBE_L2 = 0.01
# method -> (term, ce_weight); the teacher and student layers are those of mnist1d_cnn / mnist1d_cnn_small
METHODS: dict[str, tuple[list[dict], float]] = {
    "hard": ([], 1.0),
    "kd": ([{"method": "kd", "weight": None}], 0.1),
    "fitnet": ([{"method": "fitnet", "weight": None, "teacher_layers": ["relu3"], "student_layers": ["relu3"]}], 1.0),
    "at": ([{"method": "at", "weight": None, "teacher_layers": ["relu1", "relu2", "relu3"],
             "student_layers": ["relu1", "relu2", "relu3"]}], 1.0),
    "sp": ([{"method": "sp", "weight": None, "teacher_layers": ["relu3"], "student_layers": ["relu3"]}], 1.0),
    "pkt": ([{"method": "pkt", "weight": None, "teacher_layers": ["relu3"], "student_layers": ["relu3"]}], 1.0),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def experiment_raw(label_fraction: float, args: argparse.Namespace) -> dict:
    return {
        "name": "bench-probe-setting",
        "seed": 0,
        "data": {"name": "mnist1d", "label_fraction": label_fraction, "val_fraction": 0.1, "batch_size": 100,
                 "params": {"num_samples": args.num_samples}},
        "teacher": {
            "model": {"name": "mnist1d_cnn", "kwargs": {"channels": 32}},
            "recipe": {
                "seed": 0,
                "data": {"name": "mnist1d", "label_fraction": 1.0, "val_fraction": 0.1, "batch_size": 100,
                         "params": {"num_samples": args.teacher_samples, **TEACHER_GENERATOR,
                                    "label_map": TEACHER_LABEL_MAP}},
                "train": {"epochs": args.teacher_epochs, "progress": False,
                          "optimizer": {"name": "adam", "lr": 0.01, "schedule": "cosine"}},
            },
        },
        "student": {"name": "mnist1d_cnn_small", "kwargs": {"channels": 8}},
        "distill": {"temperature": 4.0, "ce_weight": 1.0, "terms": []},
        "train": {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 0.01}, "progress": False},
    }


def fraction_for(n_labels: int, class_counts: list[int]) -> float:
    """The label_fraction whose stratified rounding (kdray.data) labels ``n_labels`` examples, or the closest."""

    def count(f: float) -> int:
        return sum(min(n, max(1, round(f * n))) for n in class_counts if n)

    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < n_labels else (lo, mid)
    return min((lo, hi), key=lambda f: (abs(count(f) - n_labels), f))


def probe_table(prep) -> list[dict]:
    """Per teacher layer and pooling: a probe fitted on the labelled examples, its val and test accuracy."""
    from kdray.core.probes import accuracy, fit_probe
    from kdray.core.signals import teacher_pass

    b = prep.bundle
    lab = b.labelled
    tr, va, te = (teacher_pass(prep.teacher, x, PROBE_LAYERS, 1000).features for x in (b.x_train, b.x_val, b.x_test))
    rows = []
    for layer in PROBE_LAYERS:
        for pooling in PROBE_POOLINGS:
            probe = fit_probe(tr[layer][lab], b.y_train[lab], b.num_classes, pooling, PROBE_L2, 100)
            rows.append({"layer": layer, "pooling": pooling, "val_acc": round(accuracy(probe, va[layer], b.y_val), 4),
                         "test_acc": round(accuracy(probe, te[layer], b.y_test), 4)})
    return rows


_PREP = None  # the prepared data and teacher of the current label count (set before the workers fork)


def one_run(raw: dict) -> dict:
    from kdray.errors import ConfigError
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import run

    t0 = time.perf_counter()
    try:
        s = run(parse_config(raw), _PREP)
    except ConfigError as e:  # e.g. logit KD with a teacher whose classes differ
        return {"na": str(e)}
    return {"test_acc": s.test_acc, "best_val_acc": s.best_val_acc, "seconds": time.perf_counter() - t0}


def markdown(out: dict) -> str:
    cols = [str(n) for n in out["labels"]]
    head = "| student trained with | " + " | ".join(f"{out['labelled'][c]} labels" for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]

    def cell(r: Any) -> str:
        if r is None:
            return ""
        if "na" in r:
            return "n/a"
        return f"{r['mean']:.3f} ± {r['std']:.3f}"

    for m in out["methods"]:
        if m == "probe_kd":
            continue
        lines.append(f"| {m} | " + " | ".join(cell(out["results"][c].get(m)) for c in cols) + " |")
    if "probe_kd" in out["methods"]:
        for layer in PROBE_LAYERS:
            cells = []
            for c in cols:
                p = out["results"][c]["probe_kd"]["layers"][layer]
                cells.append(f"{cell(p['student'])} (probe {p['pooling']}: val {p['probe_val_acc']:.3f}, "
                             f"test {p['probe_test_acc']:.3f})")
            lines.append(f"| probe_kd on `{layer}` | " + " | ".join(cells) + " |")
        cells = []
        for c in cols:
            ch = out["results"][c]["probe_kd"]["chosen"]
            cells.append(f"**{cell(out['results'][c]['probe_kd']['layers'][ch]['student'])}** ({ch})")
        lines.append("| probe_kd, layer chosen by probe val acc | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global _PREP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[50, 200, 1000], help="labelled training examples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[*METHODS, "probe_kd"], choices=[*METHODS, "probe_kd"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--num-samples", type=int, default=5000, help="target MNIST-1D examples generated (80%% train)")
    ap.add_argument("--teacher-samples", type=int, default=10000, help="the teacher's MNIST-1D examples")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--cache-dir", help="kdray cache folder (default: $KDRAY_CACHE_DIR, else kdray's default)")
    ap.add_argument("--workers", type=int, default=2,
                    help="student trainings at a time, each a forked process with 1 thread (1: in this process)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    if args.cache_dir:
        os.environ["KDRAY_CACHE_DIR"] = args.cache_dir

    from kdray.data import make_bundle
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import prepare

    t_start = time.perf_counter()
    full = make_bundle(parse_config(experiment_raw(1.0, args)).data)
    class_counts = [int((full.y_train == c).sum()) for c in range(full.num_classes)]
    results: dict[str, dict[str, Any]] = {}
    labelled: dict[str, int] = {}
    fractions: dict[str, float] = {}
    teacher_info: dict[str, Any] = {}
    runs = 0
    for n_labels in args.labels:
        key = str(n_labels)
        frac = fraction_for(n_labels, class_counts)
        raw0 = experiment_raw(frac, args)
        t0 = time.perf_counter()
        prep = prepare(parse_config(raw0))
        teacher_info = {k: v for k, v in prep.teacher_info.items() if k in ("teacher_test_acc", "teacher_classes",
                                                                           "teacher_params", "teacher_val_acc")}
        labelled[key], fractions[key] = prep.bundle.n_labelled, frac
        log(f"{n_labels} labels: label_fraction {frac:.5f} -> {prep.bundle.n_labelled} labelled of "
            f"{len(prep.bundle.y_train)}; teacher ({teacher_info.get('teacher_classes')} classes, own-task test acc "
            f"{teacher_info.get('teacher_test_acc', float('nan')):.3f}) ready in {time.perf_counter() - t0:.1f} s")

        specs: list[tuple[str, list[dict], float]] = [(m, *METHODS[m]) for m in args.methods if m != "probe_kd"]
        layers: dict[str, dict] = {}
        table: list[dict] = []
        if "probe_kd" in args.methods:
            table = probe_table(prep)
            for layer in PROBE_LAYERS:
                best = max((r for r in table if r["layer"] == layer), key=lambda r: r["val_acc"])
                term = {"method": "probe_kd", "weight": None, "teacher_layers": [layer],
                        "options": {"pooling": best["pooling"], "l2": PROBE_L2}}
                layers[layer] = {"pooling": best["pooling"], "probe_val_acc": best["val_acc"],
                                 "probe_test_acc": best["test_acc"]}
                specs.append((f"probe_kd[{layer}]", [term], 0.1))
        jobs = []
        for tag, terms, ce in specs:
            for seed in args.seeds:
                raw = json.loads(json.dumps(raw0))
                raw.update(seed=seed, name=f"probe-setting-{tag}-{n_labels}-{seed}")
                raw["distill"].update(ce_weight=ce, terms=terms)
                jobs.append((tag, seed, raw))
        _PREP = prep  # forked workers inherit it: prepared once per label count
        by_tag: dict[str, list[dict]] = {}
        for (tag, seed, _), r in zip(jobs, run_jobs(one_run, jobs, args.workers)):
            by_tag.setdefault(tag, []).append(r)
            if "na" in r:
                log(f"  {tag} seed {seed}: n/a ({r['na']})")
            else:
                runs += 1
                log(f"  {tag} seed {seed}: test {r['test_acc']:.4f} best val {r['best_val_acc']:.4f} "
                    f"({r['seconds']:.1f} s)")
        summary = {tag: ({"na": next(r["na"] for r in rs if "na" in r)} if any("na" in r for r in rs)
                         else summarise([r["test_acc"] for r in rs])) for tag, rs in by_tag.items()}
        res: dict[str, Any] = {m: summary[m] for m in args.methods if m != "probe_kd"}
        if layers:
            for layer in PROBE_LAYERS:
                layers[layer]["student"] = summary[f"probe_kd[{layer}]"]
            chosen = max(PROBE_LAYERS, key=lambda l: layers[l]["probe_val_acc"])
            res["probe_kd"] = {"layers": layers, "chosen": chosen, "probes": table}
            log(f"  probe layer chosen on validation: {chosen}")
        results[key] = res

    out = {
        "labels": args.labels, "labelled": labelled, "label_fractions": fractions, "seeds": args.seeds,
        "epochs": args.epochs, "methods": args.methods,
        "teacher": {**teacher_info, "label_map": TEACHER_LABEL_MAP, "generator": TEACHER_GENERATOR,
                    "num_samples": args.teacher_samples},
        "results": results, "runs": runs, "seconds": round(time.perf_counter() - t_start, 1),
    }
    report(out, markdown(out), args.markdown, log)


if __name__ == "__main__":
    main()
