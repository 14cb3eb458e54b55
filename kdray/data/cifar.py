"""CIFAR-10 / CIFAR-100 (``cifar10``, ``cifar100``): the python-pickle files in torchvision's layout under
``data.root`` (``cifar-10-batches-py/``, ``cifar-100-python/``), read with a restricted unpickler (no
torchvision). x float32 ``(N, 3, 32, 32)`` normalised per channel."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field

from kdray.config import DataConfig
from kdray.data.augment import crop_and_flip
from kdray.data.registry import Params, RawData, register_dataset
from kdray.errors import ConfigError

# Per-channel mean / std of the training images in [0, 1] (the values RepDistiller uses).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed in a data file")
    return text.encode("latin-1", errors)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays; any other global is refused.

    Allowed globals: numpy's array reconstruction helpers (``numpy[._]core.multiarray._reconstruct``,
    ``numpy[._]core.numeric._frombuffer``), ``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode``
    restricted to latin-1 (Python 3 pickles of bytes at protocol 2).
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol <= 2; only latin-1 is let through
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        if name == "encode":
            return _latin1_encode
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct
            return _reconstruct
        if name == "_frombuffer":
            from numpy._core.numeric import _frombuffer
            return _frombuffer
        return getattr(np, name)


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("data.root", str(path.parent.parent), f"a folder containing {path.parent.name}/{path.name}")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError("data.root", str(path), f"a CIFAR pickle of numpy arrays and lists ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError("data.root", str(path), f"a CIFAR pickle holding a dict (got {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _batch_xy(d: dict, label_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in d or label_key not in d:
        raise ConfigError("data.root", str(path), f"a CIFAR batch with keys 'data' and {label_key!r}")
    x = np.asarray(d["data"], dtype=np.uint8)
    return x.reshape(len(x), -1), np.asarray(d[label_key], dtype=np.int64)


class CifarParams(Params):
    max_train: Optional[int] = Field(None, ge=1)  # keep only the first N training images
    max_test: Optional[int] = Field(None, ge=1)


def _cifar(cfg: DataConfig, folder: str, train_files: list[str], test_file: str, label_key: str,
           num_classes: int, mean: tuple, std: tuple, names: tuple[str, str]) -> RawData:
    p = CifarParams.model_validate(cfg.params)
    base = Path(cfg.root or ".").expanduser() / folder
    xs, ys = [], []
    for fname in train_files:
        x, y = _batch_xy(_read_pickle(base / fname), label_key, base / fname)
        xs.append(x)
        ys.append(y)
    x_tr, y_tr = np.concatenate(xs), np.concatenate(ys)
    x_te, y_te = _batch_xy(_read_pickle(base / test_file), label_key, base / test_file)
    x_tr, y_tr = x_tr[: p.max_train], y_tr[: p.max_train]
    x_te, y_te = x_te[: p.max_test], y_te[: p.max_test]
    meta: dict[str, Any] = {"folder": folder, "mean": mean, "std": std, "n_train": len(y_tr), "n_test": len(y_te)}
    meta_file, names_key = names
    if (base / meta_file).is_file():
        try:
            meta["classes"] = list(_read_pickle(base / meta_file).get(names_key, []))
        except ConfigError:
            pass
    return RawData(_normalise_images(x_tr, mean, std), torch.from_numpy(y_tr), _normalise_images(x_te, mean, std),
                   torch.from_numpy(y_te), num_classes, crop_and_flip(4) if cfg.augment else None, meta)


@register_dataset("cifar10", CifarParams, needs_root=True,
                  root_hint="the folder that holds cifar-10-batches-py/ (torchvision's CIFAR10 root)")
def cifar10(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    return _cifar(cfg, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10,
                  CIFAR10_MEAN, CIFAR10_STD, ("batches.meta", "label_names"))


@register_dataset("cifar100", CifarParams, needs_root=True,
                  root_hint="the folder that holds cifar-100-python/ (torchvision's CIFAR100 root)")
def cifar100(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    return _cifar(cfg, "cifar-100-python", ["train"], "test", "fine_labels", 100,
                  CIFAR100_MEAN, CIFAR100_STD, ("meta", "fine_label_names"))


def _normalise_images(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (N, 3072) or (N, 3, 32, 32) -> float32 (N, 3, 32, 32), per-channel standardised."""
    t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 3, 32, 32).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (t - m) / s
