"""MNIST-1D (``mnist1d``): generated procedurally by the ``mnist1d`` package (never downloaded), cached as
``.npz`` under ``<cache>/data``. x float32 ``(N, 40)``, 10 classes (or fewer with ``params.label_map``)."""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from kdray.config import DataConfig, stable_hash
from kdray.data.augment import shift_and_noise
from kdray.data.registry import Params, RawData, register_dataset
from kdray.paths import atomic_write_bytes
from kdray.paths import cache_dir as default_cache_dir


class MNIST1DParams(Params):
    """``mnist1d.data.get_dataset_args()`` (except ``url``) plus an optional ``label_map``."""

    num_samples: int = Field(5000, ge=20)
    train_split: float = Field(0.8, gt=0, lt=1)
    template_len: int = Field(12, ge=1)
    padding: Annotated[list[int], Field(min_length=2, max_length=2)] = [36, 60]
    scale_coeff: float = Field(0.4, ge=0)
    max_translation: int = Field(48, ge=0)
    corr_noise_scale: float = Field(0.25, ge=0)
    iid_noise_scale: float = Field(2e-2, ge=0)
    shear_scale: float = Field(0.75, ge=0)
    shuffle_seq: bool = False
    final_seq_length: int = Field(40, ge=1)
    seed: int = 42
    label_map: Optional[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=10, max_length=10)]] = None

    @field_validator("padding")
    @classmethod
    def _padding(cls, v: list[int]) -> list[int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError("two lengths [low, high] with 0 <= low <= high")
        return v

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and set(v) != set(range(max(v) + 1)):
            raise ValueError("10 new labels that use every value 0..max, e.g. [0,0,1,1,2,2,3,3,4,4]")
        return v


def _mnist1d_arrays(args: dict, cache_root: Path) -> dict[str, np.ndarray]:
    """Generate (or load the cached) MNIST-1D arrays for generator ``args``."""
    path = cache_root / "data" / f"mnist1d-{stable_hash(args)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache file: generate again
    from types import SimpleNamespace

    from mnist1d.data import make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds the global RNGs
        d = make_dataset(SimpleNamespace(**args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
              "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays


@register_dataset("mnist1d", MNIST1DParams)
def mnist1d(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    p = MNIST1DParams.model_validate(cfg.params)
    args = p.model_dump(exclude={"label_map"})
    a = _mnist1d_arrays(args, default_cache_dir(cache_dir))
    y, y_test = torch.from_numpy(a["y"]), torch.from_numpy(a["y_test"])
    num_classes = 10
    if p.label_map is not None:
        lut = torch.tensor(p.label_map, dtype=torch.long)
        y, y_test = lut[y], lut[y_test]
        num_classes = max(p.label_map) + 1
    return RawData(torch.from_numpy(a["x"]), y, torch.from_numpy(a["x_test"]), y_test, num_classes,
                   shift_and_noise(3, 0.05) if cfg.augment else None,
                   {"generator_args": args, "label_map": p.label_map})
