"""CIFAR-100 resnet32x4 -> resnet8x4 at the RepDistiller reference schedule (a GPU reproduction script).

The reference (RepDistiller, the CRD paper's code; see ../shared/REFERENCE.md): 240 epochs, SGD lr 0.05,
momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 150, 180 and 210, batch 64, random crop (padding 4) and
horizontal flip, temperature 4. Loss mixes as in RepDistiller's scripts: ``0.1 CE + 0.9 KD`` for KD (and
Probe-KD), ``1.0 CE + beta * term`` for the feature methods with beta = the method's reference weight:

=========  ===========================================================  ==========
method     term(s)                                                      CE weight
=========  ===========================================================  ==========
hard       none (the student alone)                                     1.0
kd         KD, T=4, weight 0.9                                          0.1
fitnet     hint ``layer2`` -> ``layer2`` (RepDistiller hint_layer 2), 100  1.0
at         AT, summed over pairs ``layer1``, ``layer2``, ``layer3``, 1000   1.0
sp         similarity preserving on ``layer3`` (feat[-2]), 3000         1.0
rkd        RKD on the pooled embedding ``avgpool`` (feat[-1]), 1.0       1.0
pkt        PKT on the pooled embedding ``avgpool``, 30000               1.0
dkd        DKD alpha 1, beta 8, T=4, weight 1.0 (mdistiller)            1.0
probe_kd   probe on teacher ``--probe-layer`` (``layer3``, mean pooling), 0.9  0.1
=========  ===========================================================  ==========

Data: kdray's ``cifar100`` loader reads torchvision's on-disk layout (``DIR/cifar-100-python/{train,test,meta}``).
RepDistiller trains on all 50,000 training images and reports the best test accuracy over the epochs; so does
this script by default (``--val-fraction 0``: no validation split, ``val_acc`` is not reported); ``--val-fraction
F`` holds out a labelled validation split instead. The test accuracy is measured after every epoch
(``--eval-every``) and both the last and the best are reported (RepDistiller's figure is the best).

Teacher: ``--teacher-checkpoint PATH`` (a kdray model file, a bare ``state_dict`` of kdray's ``resnet32x4``, or a
RepDistiller checkpoint ``{'model': state_dict, ...}``, which is converted to a bare state_dict beside the
outputs); without it the teacher is trained once from a recipe with the same schedule and augmentation
(cached by kdray).

GPU memory: with augmentation the teacher runs live per batch; ``kdray.experiment.run.build`` passes the training set
through the teacher up-front only for the probes' layers (Probe-KD: ``layer3``, mean-pooled by the probe).

Usage::

    python benchmarks/cifar100.py --method kd [--data-root DIR] [--teacher-checkpoint PATH] [--epochs 240]
    python benchmarks/cifar100.py --tiny --method kd fitnet at pkt probe_kd   # CPU smoke test, seconds

``--tiny`` writes a small fake CIFAR-100 folder (torchvision layout, random images) to a temporary folder and
runs 1 epoch with small models (teacher resnet14 trained 1 epoch from its recipe, student resnet8). Progress
goes to stderr; the last line of stdout is a JSON object with the results and the RepDistiller figures.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from jobs import print_json  # benchmarks/jobs.py

# RepDistiller's table (CIFAR-100 test accuracy, %, resnet32x4 -> resnet8x4); DKD from mdistiller.
REFERENCE = {"teacher": 79.42, "hard": 72.50, "kd": 73.33, "fitnet": 73.50, "at": 73.44, "sp": 72.94, "rkd": 71.90,
             "pkt": 73.64, "crd": 75.51, "dkd": 76.32, "probe_kd": None}
SCHEDULE = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "step",
            "milestones": [150, 180, 210], "gamma": 0.1}


def methods(probe_layer: str, probe_pooling: str) -> dict[str, tuple[list[dict], float]]:
    """method -> (distill.terms, ce_weight)."""
    return {
        "hard": ([], 1.0),
        "kd": ([{"method": "kd", "weight": 0.9}], 0.1),
        "fitnet": ([{"method": "fitnet", "weight": 100.0, "teacher_layers": ["layer2"], "student_layers": ["layer2"]}],
                   1.0),
        "at": ([{"method": "at", "weight": 1000.0, "teacher_layers": ["layer1", "layer2", "layer3"],
                 "student_layers": ["layer1", "layer2", "layer3"]}], 1.0),
        "sp": ([{"method": "sp", "weight": 3000.0, "teacher_layers": ["layer3"], "student_layers": ["layer3"]}], 1.0),
        "rkd": ([{"method": "rkd", "weight": 1.0, "teacher_layers": ["avgpool"], "student_layers": ["avgpool"]}], 1.0),
        "pkt": ([{"method": "pkt", "weight": 30000.0, "teacher_layers": ["avgpool"], "student_layers": ["avgpool"]}],
                1.0),
        "dkd": ([{"method": "dkd", "weight": 1.0, "options": {"alpha": 1.0, "beta": 8.0}}], 1.0),
        "probe_kd": ([{"method": "probe_kd", "weight": 0.9, "teacher_layers": [probe_layer],
                       "options": {"pooling": probe_pooling, "l2": 1e-3, "max_iter": 200}}], 0.1),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_fake_cifar100(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """A CIFAR-100 stand-in in torchvision's layout: cifar-100-python/{train,test,meta}, random uint8 images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        d = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name}ing batch",
             "fine_labels": [int(v) for v in fine], "coarse_labels": [int(v) // 5 for v in fine],
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=2)
    return root


def teacher_file(path: str, out_dir: Path) -> str:
    """A checkpoint kdray can load: kdray files and bare state_dicts as they are; RepDistiller's
    ``{'model': state_dict, ...}`` is rewritten as a bare state_dict (weights only) beside the outputs."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "format" not in obj:
        out_dir.mkdir(parents=True, exist_ok=True)
        converted = out_dir / "teacher_state_dict.pt"
        torch.save(obj["model"], converted)
        log(f"teacher checkpoint: RepDistiller format, state_dict written to {converted}")
        return str(converted)
    return str(Path(path).resolve())


def experiment_raw(method: str, args: argparse.Namespace, root: str, teacher_ckpt: Optional[str]) -> dict:
    terms, ce = methods(args.probe_layer, args.probe_pooling)[method]
    optimizer = dict(SCHEDULE, lr=args.lr, milestones=args.milestones)
    data = {"name": "cifar100", "root": root, "label_fraction": 1.0, "val_fraction": args.val_fraction,
            "batch_size": args.batch_size, "eval_batch_size": 500, "augment": True, "seed": 0,
            "params": ({"max_train": args.max_train} if args.max_train else {})
            | ({"max_test": args.max_test} if args.max_test else {})}
    teacher: dict[str, Any] = {"model": {"name": args.teacher}}
    if teacher_ckpt:
        teacher["checkpoint"] = teacher_ckpt
    else:
        teacher["recipe"] = {"seed": 0, "data": dict(data),
                             "train": {"epochs": args.teacher_epochs, "optimizer": optimizer, "progress": args.progress,
                                       "device": args.device}}
    return {
        "name": f"cifar100-{args.teacher}-{args.student}-{method}",
        "seed": args.seed,
        "data": data,
        "teacher": teacher,
        "student": {"name": args.student},
        "distill": {"temperature": 4.0, "ce_weight": ce, "terms": terms},
        "train": {"epochs": args.epochs, "optimizer": optimizer, "device": args.device, "progress": args.progress},
    }


class TestEvery:
    """An epoch callback: the student's test accuracy every ``every`` epochs (and at the last one)."""

    def __init__(self, cfg, prep, every: int):
        import torch

        from kdray.core.train import resolve_device
        from kdray.models import build_model

        self.every, self.epochs = every, cfg.train.epochs
        self.device = resolve_device(cfg.train.device)
        self.model = build_model(cfg.student, prep.bundle.num_classes).to(self.device)
        self.x = prep.bundle.x_test.to(self.device)
        self.y = prep.bundle.y_test.to(self.device)
        self.bs = cfg.data.eval_batch_size
        self.history: list[tuple[int, float]] = []
        self.torch = torch

    def __call__(self, metrics: dict, state_fn) -> None:
        from kdray.core.train import accuracy, predict

        epoch = int(metrics["epoch"])
        if epoch % self.every and epoch != self.epochs:
            return
        state = state_fn()["distiller"]
        self.model.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        acc = accuracy(predict(self.model, self.x, self.bs), self.y)
        self.history.append((epoch, acc))
        log(f"  epoch {epoch}: test acc {acc:.4f} (train loss {metrics.get('loss', float('nan')):.3f}, "
            f"{metrics.get('epoch_time_s', 0):.1f} s/epoch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", nargs="+", required=True, choices=list(methods("layer3", "mean")),
                    help="one or more methods (the teacher is prepared once)")
    ap.add_argument("--data-root", help="folder holding cifar-100-python/ (torchvision's CIFAR100 root)")
    ap.add_argument("--teacher-checkpoint", help="resnet32x4 weights (kdray file, state_dict or RepDistiller ckpt)")
    ap.add_argument("--tiny", action="store_true", help="fake CIFAR-100 on disk, small models, 1 epoch (CPU)")
    ap.add_argument("--epochs", type=int, default=240)
    ap.add_argument("--teacher-epochs", type=int, default=240, help="when the teacher is trained from its recipe")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--milestones", type=int, nargs="+", default=[150, 180, 210])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--val-fraction", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--probe-layer", default="layer3")
    ap.add_argument("--probe-pooling", default="mean", choices=["mean", "max", "flatten"])
    ap.add_argument("--eval-every", type=int, default=1, help="test accuracy every N epochs (0: last epoch only)")
    ap.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output-dir", help="save each student (student.pt, summary.json, ...) under DIR/METHOD")
    ap.add_argument("--cache-dir", help="kdray cache folder (default: $KDRAY_CACHE_DIR, else kdray's default)")
    ap.add_argument("--progress", action="store_true", help="epoch progress bars")
    args = ap.parse_args()
    if args.cache_dir:
        os.environ["KDRAY_CACHE_DIR"] = args.cache_dir

    tmp: Optional[tempfile.TemporaryDirectory] = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="kdray-cifar100-tiny-")
        root = str(make_fake_cifar100(Path(tmp.name) / "data", n_train=128, n_test=64))
        args.teacher, args.student = "resnet14", "resnet8"
        args.epochs, args.teacher_epochs, args.milestones = 1, 1, [1]
        args.batch_size = 32
        if not args.cache_dir:  # never put the fake teacher in a shared cache
            os.environ["KDRAY_CACHE_DIR"] = str(Path(tmp.name) / "cache")
    else:
        if not args.data_root:
            raise SystemExit("--data-root DIR is required (the folder that holds cifar-100-python/); or --tiny")
        root = args.data_root

    import torch

    from kdray.core.train import resolve_device
    from kdray.errors import ConfigError
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import prepare, run

    t_start = time.perf_counter()
    out_dir = Path(args.output_dir) if args.output_dir else None
    ckpt = teacher_file(args.teacher_checkpoint, out_dir or Path(tempfile.mkdtemp(prefix="kdray-teacher-"))) \
        if args.teacher_checkpoint else None
    device = resolve_device(args.device)
    cfg0 = parse_config(experiment_raw(args.method[0], args, root, ckpt))
    t0 = time.perf_counter()
    prep = prepare(cfg0)
    teacher_acc = prep.teacher_info.get("teacher_test_acc")
    log(f"data: {len(prep.bundle.y_train)} train / {len(prep.bundle.y_val)} val / {len(prep.bundle.y_test)} test; "
        f"teacher {args.teacher} ({prep.teacher_info.get('source')}): test acc {teacher_acc:.4f} "
        f"({time.perf_counter() - t0:.1f} s) on {device}")
    results: dict[str, Any] = {}
    for method in args.method:
        try:
            cfg = parse_config(experiment_raw(method, args, root, ckpt))
            tester = TestEvery(cfg, prep, args.eval_every) if args.eval_every else None
            s = run(cfg, prep, callbacks=(tester,) if tester else (),
                    output_dir=(out_dir / method) if out_dir else None)
        except ConfigError as e:
            results[method] = {"error": str(e)}
            log(f"{method}: {e}")
            continue
        best = max((a for _, a in tester.history), default=s.test_acc) if tester else s.test_acc
        results[method] = {"test_acc": round(100 * s.test_acc, 2), "best_test_acc": round(100 * best, 2),
                           "epochs": s.epochs, "seconds": round(s.seconds, 1),
                           "probes": [{k: v for k, v in p.items()} for p in s.probes],
                           "reference": REFERENCE.get(method)}
        log(f"{method}: test acc {100 * s.test_acc:.2f} (best {100 * best:.2f}; RepDistiller "
            f"{REFERENCE.get(method)}) in {s.seconds:.0f} s")
    out = {"teacher": args.teacher, "student": args.student, "tiny": args.tiny, "epochs": args.epochs,
           "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
           "teacher_test_acc": round(100 * teacher_acc, 2) if teacher_acc is not None else None,
           "teacher_source": prep.teacher_info.get("source"),
           "results": results, "reference": {"teacher": REFERENCE["teacher"], "student": REFERENCE["hard"],
                                             **{m: REFERENCE.get(m) for m in args.method}},
           "seconds": round(time.perf_counter() - t_start, 1)}
    if tmp is not None:
        tmp.cleanup()
    print_json(out)


if __name__ == "__main__":
    main()
