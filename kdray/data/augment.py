"""Batched, seeded augmentations ``augment(x, generator) -> x`` of the built-in data sets."""
from __future__ import annotations

from typing import Any, Callable

import torch

from kdray.core.bundle import Augment


def _rand(gen: torch.Generator, fn: Callable[..., torch.Tensor], *args: Any, device: torch.device, **kw: Any) -> torch.Tensor:
    """Draw on the generator's device, then move to ``device`` (generators are device-bound)."""
    return fn(*args, generator=gen, device=gen.device, **kw).to(device)


def shift_and_noise(shift: int, noise: float) -> Augment:
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, length = x.shape[0], x.shape[-1]
        s = _rand(gen, torch.randint, -shift, shift + 1, (n,), device=x.device)
        idx = (torch.arange(length, device=x.device).unsqueeze(0) - s.unsqueeze(1)) % length
        idx = idx.view(n, *([1] * (x.dim() - 2)), length).expand_as(x)
        out = torch.gather(x, -1, idx)
        return out + noise * _rand(gen, torch.randn, x.shape, device=x.device, dtype=x.dtype)

    return augment


def crop_and_flip(padding: int = 4) -> Augment:
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        i = _rand(gen, torch.randint, 0, 2 * padding + 1, (n,), device=x.device)
        j = _rand(gen, torch.randint, 0, 2 * padding + 1, (n,), device=x.device)
        rows = (i.unsqueeze(1) + torch.arange(h, device=x.device)).view(n, h, 1)
        cols = (j.unsqueeze(1) + torch.arange(w, device=x.device)).view(n, 1, w)
        out = padded[torch.arange(n, device=x.device).view(n, 1, 1), :, rows, cols]  # (n, h, w, c)
        out = out.permute(0, 3, 1, 2)
        flip = _rand(gen, torch.rand, (n,), device=x.device) < 0.5
        return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out).contiguous()

    return augment
