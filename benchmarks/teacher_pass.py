"""The teacher pass: how fast a teacher goes over a transfer set, by section.

Section ``ray_data`` (issue 18): examples per second of the teacher-cache pass (``kdray.core.cache.teacher_outputs``)
in this process, and as the Ray Data ``map_batches`` of :mod:`kdray.search.teacher_pass` with 1 and 2 actors on a
local Ray (one CPU each; one GPU each when the machine has GPUs). Two teachers with random weights (the speed does
not depend on them):

* ``cnn``: ``mnist1d_cnn`` (64 channels; 16 with ``--tiny``) over MNIST-1D-shaped inputs (length 40), logits plus
  the pooled output of ``relu3``;
* ``lm``: a small Qwen2 decoder built from ``transformers.Qwen2Config`` (2 layers, hidden 128; 64 with ``--tiny``)
  over random token ids (length 32), the last position's logits plus the token mean of its final norm.

Each figure is the best of ``--reps`` passes (the Ray passes include starting their actors, as in a real build;
Ray itself is started once, outside the timing). ``speedup_2v1`` is the 2-actor rate over the 1-actor rate: the limit
is the number of cores or GPUs the actors get (2.0 here).

More sections (issue 16: an LM teacher of Qwen2.5-1.5B's shape, tokens/s against a plain forward) add a function
to ``SECTIONS``.

Usage: ``python benchmarks/teacher_pass.py [--tiny] [--sections ray_data] [--reps 2]``. Progress on stderr; the last
line of stdout is a JSON object, one key per section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class LastTokenLM(nn.Module):
    """A causal LM as a classifier-shaped teacher: token ids in, the last position's logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[:, -1, :]


def cnn_teacher(tiny: bool, n: int) -> tuple[nn.Module, torch.Tensor, tuple[str, str]]:
    from kdray.config import ModelSpec
    from kdray.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mnist1d_cnn", kwargs={"channels": 16 if tiny else 64}), 10).eval()
    return model, torch.randn(n, 40), ("relu3", "mean")


def lm_teacher(tiny: bool, n: int) -> tuple[nn.Module, torch.Tensor, tuple[str, str]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hidden = 64 if tiny else 128
    cfg = Qwen2Config(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LastTokenLM(Qwen2ForCausalLM(cfg)).eval()
    return model, torch.randint(0, 1000, (n, 32)), ("model.model.norm", "seq_mean")


def _rate(fn: Callable[[], dict], n: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure_teacher(name: str, model: nn.Module, x: torch.Tensor, probe: tuple[str, str], batch_size: int,
                    reps: int, use_gpu: bool) -> dict:
    import numpy as np

    from kdray.core.cache import CacheRequest, teacher_outputs
    from kdray.core.probes import ProbeSpec
    from kdray.search.teacher_pass import object_store_loader, ray_pass

    req = CacheRequest((), (ProbeSpec(probe[0], probe[1], 1e-3, 100),))
    device = torch.device("cuda" if use_gpu else "cpu")
    local = lambda: teacher_outputs(model.to(device), x, req, batch_size, device)  # noqa: E731
    loader = object_store_loader(model)
    out = {"examples": len(x), "batch_size": batch_size, "in_process": _rate(local, len(x), reps)}
    print(f"[{name}] in this process: {out['in_process']:.0f} examples/s", file=sys.stderr)
    ref = local()
    for workers in (1, 2):
        run = lambda: ray_pass(loader, x, req, batch_size, workers, use_gpu)  # noqa: E731
        got = run()
        if not all(np.array_equal(ref[k], got[k]) for k in ref):
            out[f"differs_{workers}"] = True
        out[f"actors_{workers}"] = _rate(run, len(x), reps)
        print(f"[{name}] Ray Data, {workers} actor(s): {out[f'actors_{workers}']:.0f} examples/s", file=sys.stderr)
    out["speedup_2v1"] = out["actors_2"] / out["actors_1"]
    out["equal_to_in_process"] = not any(k.startswith("differs_") for k in out)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def ray_data_section(args: argparse.Namespace) -> dict:
    """1-actor vs 2-actor Ray Data teacher passes, CNN and small-LM teacher."""
    import ray

    gpus = torch.cuda.device_count()
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        n = 2000 if args.tiny else 20000
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {gpus} GPUs", "use_gpu": gpus >= 2}
        for name, make in (("cnn", cnn_teacher), ("lm", lm_teacher)):
            model, x, probe = make(args.tiny, n if name == "cnn" else n // 4)
            out[name] = measure_teacher(name, model, x, probe, 250 if name == "cnn" else 50, args.reps, gpus >= 2)
        return out
    finally:
        ray.shutdown()


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"ray_data": ray_data_section}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small teachers and data (a smoke run of about a minute)")
    p.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    p.add_argument("--reps", type=int, default=2, help="passes per figure; the best is kept")
    args = p.parse_args()
    result = {name: SECTIONS[name](args) for name in args.sections}
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
