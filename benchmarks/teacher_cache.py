"""What the teacher cache buys: per-epoch time of KD with cached teacher outputs, with a live teacher, and
of the same student trained on hard labels alone; at CIFAR size also beside torchdistill.

``--case mnist1d`` (the default): MNIST-1D (5,000 examples, all labels), teacher ``mnist1d_cnn`` with 64
channels (about 50x the student's FLOPs, counted by this script), student ``mnist1d_cnn_small`` with 8
channels, batch 100. Three ways to train the same student, each for ``--epochs`` epochs, interleaved over
``--reps`` repetitions so that load changes touch each alike:

* ``hard``: hard-label cross-entropy only (no teacher at all);
* ``kd_cached``: KD (T=4) with the teacher's logits read from the teacher cache (``kdray.core.cache``);
* ``kd_live``: the same KD term with the teacher run on every batch (:class:`kdray.core.signals.LiveTeacher`).

``--case cifar``: the RepDistiller pair at CIFAR size: student ``resnet8x4``, teacher ``resnet32x4`` (random
weights: the time does not depend on them), ``--batches`` batches of ``--batch-size`` 32x32 images written by
this script (random pixels and labels, CIFAR-100's on-disk layout), no augmentation, SGD lr 0.05 momentum 0.9
weight decay 5e-4, ``0.1 CE + 0.9 KD`` at T=4. The three modes above, plus ``torchdistill``: torchdistill's
``DistillationBox`` (its ``KDLoss`` with alpha 0.1, T=4, the same optimizer) training a student of the same
architecture and initial weights from the same teacher on the same examples in batches of the same size, in
its own epoch loop (``pre_epoch_process``, ``forward_process``, ``post_forward_process`` and ``loss.item()`` per
batch as its example script logs it, ``post_epoch_process``). torchdistill is a benchmark dependency only, kept
out of kdray's environment: ``pip install --no-deps --target DIR torchdistill==1.1.5 torchvision==0.28.0`` (the
torchvision of torch 2.13) and ``PYTHONPATH=.:DIR`` for this script (see BENCHMARKS.md). Without it the case runs
without the ``torchdistill`` mode and says so. ``--precisions fp32 bf16 fp16`` also measures KD
from the cache in each precision (``train.precision``; samples per second), where the device can.

The time per epoch is the median of the epochs' time (kdray: ``epoch_time_s``, training pass plus validation,
of which there is none in the CIFAR case; torchdistill: its epoch loop), the first epoch of each run left out.
Also timed: building the cache entry once (teacher over all splits plus writing).

Usage: ``python benchmarks/teacher_cache.py [--case mnist1d|cifar] [--epochs 6] [--reps 3] [--device cpu]``;
``--tiny`` runs both cases on a few small batches (the test suite's smoke test). Progress on stderr; the last
line of stdout is a JSON object with the ratios ``kd_cached / hard`` (goal <= 1.15 on MNIST-1D, <= 1.05 at CIFAR
size), ``kd_live / kd_cached`` and, at CIFAR size, ``kd_cached / torchdistill`` (goal <= 1.0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from jobs import print_json  # benchmarks/jobs.py

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
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}  # RepDistiller's optimizer
CIFAR_RAW = {
    "name": "cache-bench-cifar",
    "seed": 0,
    "data": {"name": "cifar100", "val_fraction": 0.0, "batch_size": 64, "eval_batch_size": 256, "augment": False},
    "teacher": {"model": {"name": "resnet32x4"}},
    "student": {"name": "resnet8x4"},
    "distill": {"temperature": 4.0, "ce_weight": 0.1, "terms": [{"method": "kd", "weight": 0.9}]},
    "train": {"epochs": 3, "progress": False, "optimizer": SGD},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds x 2 of the convolutions and linear layers for one example."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
            kernel = 1
            for k in mod.kernel_size:
                kernel *= k
            total += out[0].numel() * mod.in_channels // mod.groups * kernel * 2
        elif isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features * 2

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def epoch_seconds(cfg, prep, mode: str, device: torch.device) -> float:
    """kdray's median epoch time (first epoch left out) training ``cfg``'s student in ``mode``."""
    from kdray.core.signals import LiveTeacher
    from kdray.core.train import Data, fit, seed_everything
    from kdray.experiment.run import build

    seed_everything(cfg.seed)
    built = build(cfg, prep, device)
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


def interleaved(runners: dict[str, Any], reps: int) -> dict[str, float]:
    """The median over ``reps`` of each runner's epoch time, the runners taking turns within each repetition."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(reps):
        for mode, fn in runners.items():
            times[mode].append(fn())
            log(f"rep {rep} {mode}: {times[mode][-1] * 1000:.1f} ms/epoch")
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


# --------------------------------------------------------------------------------------------------
# MNIST-1D


def mnist1d_case(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kdray.core.cache import get_cache
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import cache_info, cache_request, prepare

    raw = json.loads(json.dumps(RAW))
    raw["train"].update(epochs=args.epochs, device=str(device))
    if args.tiny:
        raw["data"]["params"] = {"num_samples": 600}
        raw["teacher"]["recipe"]["train"]["epochs"] = 1
    kd = parse_config(raw)
    hard = parse_config({**raw, "distill": {"ce_weight": 1.0, "terms": []}})
    prep = prepare(kd)
    b = prep.bundle
    t0 = time.perf_counter()
    entry = get_cache(prep.teacher, b, cache_request([kd], prep, b.x_train[:100]), info=cache_info(kd))
    build_s = time.perf_counter() - t0
    student = __import__("kdray.models", fromlist=["build_model"]).build_model(kd.student, b.num_classes)
    t_flops, s_flops = flops(prep.teacher, b.x_train), flops(student, b.x_train)
    med = interleaved({m: (lambda m=m: epoch_seconds(hard if m == "hard" else kd, prep, m, device))
                       for m in ("hard", "kd_cached", "kd_live")}, args.reps)
    return {
        "teacher_flops": t_flops, "student_flops": s_flops, "flops_ratio": round(t_flops / s_flops, 1),
        "examples_train": len(b.x_train), "epochs": args.epochs, "reps": args.reps,
        **{f"{k}_epoch_s": round(v, 4) for k, v in med.items()},
        "ratio_kd_cached_over_hard": round(med["kd_cached"] / med["hard"], 3),
        "speedup_cached_over_live": round(med["kd_live"] / med["kd_cached"], 3),
        "cache_build_s": round(build_s, 2), "cache_bytes_per_example": entry.manifest["bytes_per_example"],
        "cache_key": entry.key,
    }


# --------------------------------------------------------------------------------------------------
# CIFAR size: resnet32x4 -> resnet8x4, and torchdistill


def import_torchdistill() -> Optional[Any]:
    """torchdistill's ``get_distillation_box``, or None when it is not installed.

    torchvision's wheels on PyPI are built against CUDA torch; with a CPU-only torch their C extension cannot
    load, and torchvision 0.28 then fails on import registering fake kernels for two of its C ops (``nms``,
    ``qnms``). torchdistill uses none of those ops (only torchvision's Python model code), so their schemas are
    declared first when the extension is missing; nothing else of torchvision or torchdistill is changed."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchdistill.keep = lib  # the definitions live as long as the library object
    except ImportError:
        return None
    try:
        from torchdistill.core.distillation import get_distillation_box
    except ImportError:
        return None
    return get_distillation_box


def torchdistill_config(epochs: int, batch_size: int, temperature: float, alpha: float) -> dict[str, Any]:
    """torchdistill's train config for KD: a frozen teacher, ``alpha * CE + (1 - alpha) * T^2 * KL``, SGD."""
    from torch.utils.data import RandomSampler

    kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                      "teacher_module_path": ".", "teacher_module_io": "output",
                                      "temperature": temperature, "alpha": alpha, "reduction": "batchmean"}}
    return {
        "num_epochs": epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": batch_size, "num_workers": 0}},
        "teacher": {"sequential": [], "forward_hook": {"input": [], "output": []}, "requires_grad": False,
                    "forward_proc": "forward_batch_only"},
        "student": {"sequential": [], "forward_hook": {"input": [], "output": []}, "requires_grad": True,
                    "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {k: v for k, v in SGD.items() if k != "name"}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
    }


def torchdistill_epoch_seconds(get_box, cfg, prep, device: torch.device) -> float:
    """torchdistill's median epoch time (first epoch left out): the same student architecture and initial weights
    (kdray's seed), the same teacher, examples and batch size, T, CE/KD mix and optimizer as ``cfg``."""
    from torch.utils.data import TensorDataset

    from kdray.core.train import seed_everything
    from kdray.models import build_model

    b = prep.bundle
    seed_everything(cfg.seed)
    student = build_model(cfg.student, b.num_classes).to(device)
    teacher = prep.teacher.to(device).eval()
    train_config = torchdistill_config(cfg.train.epochs, cfg.data.batch_size, cfg.distill.temperature,
                                       cfg.distill.ce_weight)
    box = get_box(teacher, student, {"train": TensorDataset(b.x_train, b.y_train)}, train_config, device, None,
                  False, 1.0)
    times = []
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            loss.item()  # torchdistill's example script logs every batch's loss
        box.post_epoch_process()
        times.append(time.perf_counter() - t0)
    box.clean_modules()
    return statistics.median(times[1:])


def cifar_files(root: Path, n_train: int, seed: int = 0) -> Path:
    """Random 32x32 images and labels in CIFAR-100's on-disk layout (``n_train`` training, at most 64 test
    examples)."""
    from cifar100 import make_fake_cifar100  # benchmarks/cifar100.py

    return make_fake_cifar100(root, n_train=n_train, n_test=min(64, n_train), seed=seed)


def cifar_teacher(root: Path, num_classes: int = 100) -> str:
    """A resnet32x4 with its initial (seeded) weights as a kdray model file."""
    from kdray.config import ModelSpec
    from kdray.core.checkpoint import save_model
    from kdray.core.train import seed_everything
    from kdray.models import build_model

    seed_everything(1)
    spec = ModelSpec(name="resnet32x4")
    path = root / "resnet32x4.pt"
    save_model(path, build_model(spec, num_classes), spec, num_classes)
    return str(path)


def cifar_case(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kdray.core.cache import get_cache
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import cache_info, cache_request, prepare
    from kdray.models import build_model

    root = Path(tempfile.mkdtemp(prefix="kdray-cifar-bench-"))
    n_train = args.batches * args.batch_size
    raw = json.loads(json.dumps(CIFAR_RAW))
    raw["data"].update(root=str(cifar_files(root, n_train)), batch_size=args.batch_size)
    raw["teacher"]["checkpoint"] = cifar_teacher(root)
    raw["train"].update(epochs=args.epochs, device=str(device))
    kd = parse_config(raw)
    hard = parse_config({**raw, "distill": {"ce_weight": 1.0, "terms": []}})
    prep = prepare(kd)
    b = prep.bundle
    t0 = time.perf_counter()
    entry = get_cache(prep.teacher, b, cache_request([kd], prep, b.x_train[:8]), info=cache_info(kd),
                      batch_size=kd.data.eval_batch_size)
    build_s = time.perf_counter() - t0
    t_flops, s_flops = flops(prep.teacher, b.x_train), flops(build_model(kd.student, b.num_classes), b.x_train)
    runners = {m: (lambda m=m: epoch_seconds(hard if m == "hard" else kd, prep, m, device))
               for m in ("hard", "kd_cached", "kd_live")}
    get_box = import_torchdistill()
    if get_box is not None:
        runners["torchdistill"] = lambda: torchdistill_epoch_seconds(get_box, kd, prep, device)
    else:
        log("torchdistill is not importable: its mode is left out (see the docstring: --target DIR and PYTHONPATH)")
    med = interleaved(runners, args.reps)
    out = {
        "teacher_flops": t_flops, "student_flops": s_flops, "flops_ratio": round(t_flops / s_flops, 1),
        "examples_train": len(b.x_train), "batch_size": args.batch_size, "batches": args.batches,
        "epochs": args.epochs, "reps": args.reps, **{f"{k}_epoch_s": round(v, 4) for k, v in med.items()},
        "ratio_kd_cached_over_hard": round(med["kd_cached"] / med["hard"], 3),
        "speedup_cached_over_live": round(med["kd_live"] / med["kd_cached"], 3),
        "ratio_kd_cached_over_torchdistill": round(med["kd_cached"] / med["torchdistill"], 3) if get_box else None,
        "ratio_kd_live_over_torchdistill": round(med["kd_live"] / med["torchdistill"], 3) if get_box else None,
        "torchdistill": __import__("torchdistill").__version__ if get_box else "not installed",
        "cache_build_s": round(build_s, 2), "cache_bytes_per_example": entry.manifest["bytes_per_example"],
    }
    out["precisions"] = precision_figures(args, kd, prep, device, med["kd_cached"])
    return out


def precision_figures(args: argparse.Namespace, kd, prep, device: torch.device, fp32_s: float) -> dict[str, Any]:
    """KD from the cache in each of ``--precisions`` the device can do: epoch time and samples per second (fp32's
    is the figure measured already)."""
    n = len(prep.bundle.x_train)
    out: dict[str, Any] = {}
    for precision in args.precisions:
        if precision == "fp32":  # measured with the other modes (and so also by kdray before train.precision)
            seconds = fp32_s
        else:
            from kdray.core.step import check_precision
            from kdray.errors import ConfigError

            try:
                check_precision(precision, device)
            except ConfigError as e:
                out[precision] = {"skipped": e.allowed}
                continue
            cfg = kd.model_copy(update={"train": kd.train.model_copy(update={"precision": precision})})
            seconds = epoch_seconds(cfg, prep, "kd_cached", device)
        out[precision] = {"kd_cached_epoch_s": round(seconds, 4), "samples_per_s": round(n / seconds, 1)}
        log(f"{precision}: {n / seconds:.1f} samples/s (KD from the cache)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["mnist1d", "cifar"], default="mnist1d")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 6 MNIST-1D, 3 CIFAR)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=100, help="CIFAR case: training batches per epoch")
    ap.add_argument("--batch-size", type=int, default=64, help="CIFAR case")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                    help="CIFAR case: KD from the cache in each precision the device can do")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one trial = one CPU)")
    ap.add_argument("--cache-dir", help="kdray cache folder (default: a new temporary one)")
    ap.add_argument("--tiny", action="store_true", help="both cases on a few small batches (a smoke test)")
    args = ap.parse_args()
    os.environ["KDRAY_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="kdray-cache-bench-")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tiny:
        args.reps, args.batches, args.batch_size = 1, 2, 8
    if args.tiny or args.case == "mnist1d":
        args.epochs = args.epochs or (2 if args.tiny else 6)
        out = {"mnist1d": mnist1d_case(args, device)}
    if args.tiny or args.case == "cifar":
        args.epochs = 2 if args.tiny else (args.epochs if args.case == "cifar" and args.epochs else 3)
        out = {**(out if args.tiny else {}), "cifar": cifar_case(args, device)}
    print_json({**(out["mnist1d"] if args.case == "mnist1d" and not args.tiny else out), "machine": machine(device),
                "tiny": args.tiny})


if __name__ == "__main__":
    main()
