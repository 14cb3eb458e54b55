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

Section ``lm_pass`` (issue 16): tokens per second of kdray's teacher pass over a decoder of Qwen2.5-1.5B's
architecture (``Qwen2Config`` with its published sizes: hidden 1536, 28 layers, 12 heads with 2 key-value heads,
intermediate 8960, vocabulary 151,936; random weights) wrapped as ``hf_causal_lm``, storing the last-token state of
every decoder block (float16) and the answer-token logits, over random prompts of 100-400 tokens (ARC-like), in
bfloat16 on a GPU (float32 on a CPU), against a plain ``model(input_ids, attention_mask)`` forward of the same
length-grouped batches (which computes the full vocabulary's logits at every position) and against the same with
``logits_to_keep=1``. The ratios are kdray's overhead; on a GPU also the model FLOPs utilisation (2 x non-embedding
parameters x tokens, a lower bound, over the GPU's dense bf16 peak). ``--tiny`` uses a 4-layer, hidden-64 Qwen2:
on a CPU only the ratios mean anything. More sections add a function to ``SECTIONS``.

Usage: ``python benchmarks/teacher_pass.py [--tiny] [--sections ray_data lm_pass] [--reps 2]``. Progress on stderr; the last
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


# --------------------------------------------------------------------------------------------------
# issue 16: kdray's teacher pass over a language model against a plain forward and the hardware

QWEN25_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, max_position_embeddings=4096)
TINY_LM = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=1000, max_position_embeddings=512)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}  # dense bf16, vendor data sheets


def lm_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` random prompts of ``lo``..``hi`` tokens (ARC-like lengths), padded with kdray's -1."""
    from kdray.core.text import pad_rows

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return pad_rows([torch.randint(10, vocab, (int(k),), generator=g).tolist() for k in lengths])


def qwen_teacher(sizes: dict, dtype: torch.dtype, device: torch.device):
    """A Qwen2 decoder with random weights (speed does not depend on them) wrapped as kdray's ``hf_causal_lm``."""
    import transformers

    from kdray.models.hf_lm import HFCausalLM

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes, tie_word_embeddings=False))
    model = model.to(dtype).to(device).eval()
    return HFCausalLM(model, [10, 11, 12, 13]).to(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """The best of ``reps`` timings of ``fn()`` (after one warm-up), synchronising a GPU."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_forward(model, x: torch.Tensor, batch_size: int, device: torch.device, keep_last: bool) -> None:
    """The same length-grouped batches through ``model(input_ids, attention_mask)``, no hooks, no pooling."""
    from kdray.core.text import left_align, length_batches, token_mask

    with torch.inference_mode():
        for _, xb in length_batches(x, batch_size):
            ids, mask = left_align(xb, token_mask(xb))
            kwargs = {"logits_to_keep": 1} if keep_last else {}
            model(input_ids=ids.clamp_min(0).to(device), attention_mask=mask.long().to(device), **kwargs)


def lm_pass(tiny: bool, device: torch.device, reps: int) -> dict:
    """Tokens per second of kdray's teacher pass (every layer's last-token state in float16, the answer-token logits)
    against a plain forward of the same batches; model FLOPs utilisation against the GPU's bf16 peak."""
    from kdray.core.blocks import block_paths
    from kdray.core.cache import CacheRequest, teacher_outputs
    from kdray.core.probes import ProbeSpec

    sizes = TINY_LM if tiny else QWEN25_15B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = qwen_teacher(sizes, dtype, device)
    n, (lo, hi), bs = (32, (20, 60), 8) if tiny else ((16, (100, 400), 8) if device.type == "cpu" else (2048, (100, 400), 32))
    x = lm_prompts(n, lo, hi, sizes["vocab_size"])
    tokens = int((x >= 0).sum())
    layers = block_paths(teacher)
    req = CacheRequest((), tuple(ProbeSpec(p, "last", 1e-3, 100) for p in layers), pooled_dtype="float16")
    t_kdray = timed(lambda: teacher_outputs(teacher, x, req, bs, device), device, reps)
    t_plain = timed(lambda: plain_forward(teacher.model, x, bs, device, keep_last=False), device, reps)
    t_last = timed(lambda: plain_forward(teacher.model, x, bs, device, keep_last=True), device, reps)
    params = sum(p.numel() for n_, p in teacher.model.named_parameters() if "embed_tokens" not in n_)
    flops = 2 * params * tokens  # matmul FLOPs of the forward (attention's T^2 term left out: a lower bound)
    out = {"model": "tiny Qwen2" if tiny else "Qwen2.5-1.5B architecture", "device": str(device), "dtype": str(dtype),
           "examples": n, "tokens": tokens, "batch_size": bs, "layers_stored": len(layers),
           "kdray_tokens_per_s": tokens / t_kdray, "plain_tokens_per_s": tokens / t_plain,
           "plain_last_logits_tokens_per_s": tokens / t_last,
           "kdray_over_plain_time": t_kdray / t_plain, "kdray_over_plain_last_logits_time": t_kdray / t_last}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        out.update(gpu=name, model_tflops=flops / t_kdray / 1e12,
                   mfu=(flops / t_kdray / 1e12 / peak) if peak else None)
    return out


def lm_pass_section(args: argparse.Namespace) -> dict:
    """kdray's teacher pass over a decoder of Qwen2.5-1.5B's shape (a tiny one with ``--tiny``) against a plain
    forward of the same batches, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = lm_pass(args.tiny, device, args.reps)
    for k in ("kdray", "plain", "plain_last_logits"):
        print(f"[lm_pass] {k}: {out[k + '_tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"ray_data": ray_data_section, "lm_pass": lm_pass_section}


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
