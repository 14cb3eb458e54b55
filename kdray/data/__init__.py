"""Data sets: loaders that return tensors, and the split into train / validation / test with partial labels.

A loader (registered in ``DATASETS``) is ``loader(cfg: DataConfig) -> RawData``: whole train and test
tensors, the number of classes, an optional batched augmentation ``augment(x, generator) -> x`` and a
``meta`` dict describing the data. Each loader declares its ``data.params`` as a pydantic model
(``loader.params_model``); :func:`check_data_params` validates them (and ``data.root`` for file-based
data sets) before any work starts.

:func:`make_bundle` turns a :class:`~kdray.config.DataConfig` into a :class:`DataBundle`: a seeded
validation split carved from the training data, then a stratified, seeded subset of the remaining
training examples kept labelled (``y_train == -1`` elsewhere), plus a fingerprint of all of this.

Built-in data sets:

- ``mnist1d``: generated procedurally by the ``mnist1d`` package (never downloaded), cached as ``.npz``
  under ``<cache>/data``. x float32 ``(N, 40)``, 10 classes (or fewer with ``params.label_map``).
- ``cifar10`` / ``cifar100``: the python-pickle files in torchvision's layout under ``data.root``
  (``cifar-10-batches-py/``, ``cifar-100-python/``), read with a restricted unpickler.
  x float32 ``(N, 3, 32, 32)`` normalised per channel.
- ``hf_text``: a Hugging Face text classification data set (``save_to_disk`` folder or hub name),
  tokenised to padded ``input_ids`` ``(N, max_length)`` long (needs the optional ``datasets`` and
  ``transformers`` packages).
"""
from __future__ import annotations

import importlib.util
import io
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdray.config import DataConfig, stable_hash
from kdray.core.bundle import Augment, DataBundle
from kdray.errors import ConfigError
from kdray.paths import atomic_write_bytes
from kdray.paths import cache_dir as default_cache_dir
from kdray.plugins import Registry

__all__ = ["DATASETS", "RawData", "DataBundle", "make_bundle", "check_data_params", "load_raw",
           "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "RestrictedUnpickler"]

DATASETS: Registry[Callable[..., "RawData"]] = Registry("dataset")

HF_INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional datasets and transformers packages)"


@dataclass
class RawData:
    """What a loader returns: full train and test sets, before validation split and label masking."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Optional[Augment]
    meta: dict = field(default_factory=dict)


class Params(BaseModel):
    """Base for a loader's ``data.params``: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


def register_dataset(name: str, params: type[Params], needs_root: Callable[[Any], bool] | bool = False,
                     root_hint: str = "") -> Callable:
    """Register ``loader(cfg, cache_dir=None) -> RawData`` with its params model and root rule."""

    def deco(fn: Callable[..., RawData]) -> Callable[..., RawData]:
        fn.params_model = params  # type: ignore[attr-defined]
        fn.needs_root = needs_root if callable(needs_root) else (lambda p, _v=needs_root: _v)  # type: ignore[attr-defined]
        fn.root_hint = root_hint  # type: ignore[attr-defined]
        return DATASETS.register(name)(fn)

    return deco


def _parse_params(loader: Callable, cfg: DataConfig, field_: str) -> Params:
    model: type[Params] = loader.params_model  # type: ignore[attr-defined]
    try:
        return model.model_validate(cfg.params)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f"{field_}.params.{loc}" if loc else f"{field_}.params"
        if err["type"] == "extra_forbidden":
            allowed = "no such parameter; known: " + ", ".join(model.model_fields)
        elif err["type"] == "missing":
            allowed = f"a value (data set {cfg.name} requires params.{key})"
        else:
            allowed = err["msg"].removeprefix("Value error, ")
        value = "<missing>" if err["type"] == "missing" else err.get("input")
        raise ConfigError(where, value, allowed) from None


def check_data_params(cfg: DataConfig, field: str) -> None:
    """Validate ``cfg.params`` against the loader's params and ``cfg.root`` for file-based data sets.

    ``field`` is the data section's place in the config (``data``, ``teacher.recipe.data``).
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"{field}.name", cfg.name, "one of " + ", ".join(DATASETS.names()))
    loader = DATASETS.get(cfg.name)
    params = _parse_params(loader, cfg, field)
    if loader.needs_root(params):  # type: ignore[attr-defined]
        hint = loader.root_hint  # type: ignore[attr-defined]
        if cfg.root is None:
            raise ConfigError(f"{field}.root", None, f"a folder for data set {cfg.name}: {hint}")
        if not Path(cfg.root).expanduser().exists():
            raise ConfigError(f"{field}.root", cfg.root, f"an existing folder for data set {cfg.name}: {hint}")
    if cfg.name == "hf_text":
        for pkg in ("datasets", "transformers"):
            if importlib.util.find_spec(pkg) is None:
                raise ConfigError(f"{field}.name", cfg.name, HF_INSTALL_HINT)


def load_raw(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    """Validate ``cfg`` and run its loader."""
    check_data_params(cfg, "data")
    return DATASETS.get(cfg.name)(cfg, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _rand(gen: torch.Generator, fn: Callable[..., torch.Tensor], *args: Any, device: torch.device, **kw: Any) -> torch.Tensor:
    """Draw on the generator's device, then move to ``device`` (generators are device-bound)."""
    return fn(*args, generator=gen, device=gen.device, **kw).to(device)


def _shift_and_noise(shift: int, noise: float) -> Augment:
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, length = x.shape[0], x.shape[-1]
        s = _rand(gen, torch.randint, -shift, shift + 1, (n,), device=x.device)
        idx = (torch.arange(length, device=x.device).unsqueeze(0) - s.unsqueeze(1)) % length
        idx = idx.view(n, *([1] * (x.dim() - 2)), length).expand_as(x)
        out = torch.gather(x, -1, idx)
        return out + noise * _rand(gen, torch.randn, x.shape, device=x.device, dtype=x.dtype)

    return augment


def _crop_and_flip(padding: int = 4) -> Augment:
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


def _normalise_images(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (N, 3072) or (N, 3, 32, 32) -> float32 (N, 3, 32, 32), per-channel standardised."""
    t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 3, 32, 32).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (t - m) / s


# ---------------------------------------------------------------------------------------------
# MNIST-1D


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
                   _shift_and_noise(3, 0.05) if cfg.augment else None,
                   {"generator_args": args, "label_map": p.label_map})


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's on-disk layout, no torchvision)

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
                   torch.from_numpy(y_te), num_classes, _crop_and_flip(4) if cfg.augment else None, meta)


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


# ---------------------------------------------------------------------------------------------
# Hugging Face text classification


class HFTextParams(Params):
    tokenizer: str = Field(min_length=1)  # tokenizer folder or hub name (AutoTokenizer.from_pretrained)
    hub_name: Optional[str] = None  # load_dataset(hub_name) instead of load_from_disk(root)
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = Field(128, ge=1)
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = Field(0.2, gt=0, lt=1)  # only for a saved single Dataset (no splits)


def _hf_imports():
    try:
        import datasets
        import transformers
    except ImportError:
        raise ConfigError("data.name", "hf_text", HF_INSTALL_HINT) from None
    return datasets, transformers


def _tokenise(tokenizer: Any, texts: list[str], max_length: int, pad_id: int) -> torch.Tensor:
    ids = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    out = torch.full((len(ids), max_length), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row[:max_length], dtype=torch.long)
    return out


@register_dataset("hf_text", HFTextParams, needs_root=lambda p: p.hub_name is None,
                  root_hint="a folder written by datasets' save_to_disk (or set params.hub_name)")
def hf_text(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    p = HFTextParams.model_validate(cfg.params)
    ds_lib, tf = _hf_imports()
    try:
        if p.hub_name is not None:
            ds = ds_lib.load_dataset(p.hub_name, cache_dir=cfg.root)
        else:
            ds = ds_lib.load_from_disk(str(Path(cfg.root or ".").expanduser()))
    except (FileNotFoundError, OSError, ValueError) as e:
        where, value = ("data.params.hub_name", p.hub_name) if p.hub_name else ("data.root", cfg.root)
        raise ConfigError(where, value, f"a data set the datasets library can load ({e})") from None
    if isinstance(ds, ds_lib.Dataset):
        ds = ds.train_test_split(test_size=p.test_fraction, seed=0)
        train, test = ds["train"], ds["test"]
    else:
        for key, split in (("train_split", p.train_split), ("test_split", p.test_split)):
            if split not in ds:
                raise ConfigError(f"data.params.{key}", split, "one of the splits " + ", ".join(ds.keys()))
        train, test = ds[p.train_split], ds[p.test_split]
    for key, col in (("text_field", p.text_field), ("label_field", p.label_field)):
        if col not in train.column_names:
            raise ConfigError(f"data.params.{key}", col, "one of the columns " + ", ".join(train.column_names))
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(p.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError("data.params.tokenizer", p.tokenizer, f"a tokenizer folder or hub name ({e})") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    feature = train.features.get(p.label_field)
    y_tr_raw, y_te_raw = list(train[p.label_field]), list(test[p.label_field])
    if getattr(feature, "num_classes", None):
        num_classes, classes = int(feature.num_classes), list(feature.names)
        y_tr, y_te = torch.tensor(y_tr_raw, dtype=torch.long), torch.tensor(y_te_raw, dtype=torch.long)
    elif y_tr_raw and isinstance(y_tr_raw[0], str):
        classes = sorted(set(y_tr_raw) | set(y_te_raw))
        index = {c: i for i, c in enumerate(classes)}
        num_classes = len(classes)
        y_tr = torch.tensor([index[v] for v in y_tr_raw], dtype=torch.long)
        y_te = torch.tensor([index[v] for v in y_te_raw], dtype=torch.long)
    else:
        y_tr, y_te = torch.tensor(y_tr_raw, dtype=torch.long), torch.tensor(y_te_raw, dtype=torch.long)
        num_classes, classes = int(max(y_tr.max().item(), y_te.max().item() if len(y_te) else 0)) + 1, None
    x_tr = _tokenise(tokenizer, list(train[p.text_field]), p.max_length, pad_id)
    x_te = _tokenise(tokenizer, list(test[p.text_field]), p.max_length, pad_id)
    meta = {"source": p.hub_name or "disk", "tokenizer": p.tokenizer, "pad_token_id": pad_id,
            "vocab_size": len(tokenizer), "classes": classes, "n_train": len(y_tr), "n_test": len(y_te)}
    return RawData(x_tr, y_tr, x_te, y_te, num_classes, None, meta)


# ---------------------------------------------------------------------------------------------
# the bundle


def _split_and_mask(y: torch.Tensor, num_classes: int, val_fraction: float, label_fraction: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of train and validation examples, and the labelled mask over the train indices."""
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(val_fraction * n))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    y_train = y[train_idx]
    labelled = torch.zeros(len(train_idx), dtype=torch.bool)
    if label_fraction >= 1.0:
        labelled[:] = True
    else:
        for c in range(num_classes):
            idx = (y_train == c).nonzero().flatten()
            if len(idx) == 0:
                continue
            k = min(len(idx), max(1, int(round(label_fraction * len(idx)))))
            labelled[idx[torch.randperm(len(idx), generator=gen)[:k]]] = True
    return train_idx, val_idx, labelled


def make_bundle(cfg: DataConfig, cache_dir: str | None = None) -> DataBundle:
    """Load ``cfg``'s data set, carve the validation split and mask all but ``label_fraction`` labels."""
    raw = load_raw(cfg, cache_dir=cache_dir)
    params = DATASETS.get(cfg.name).params_model.model_validate(cfg.params).model_dump(mode="json")
    train_idx, val_idx, labelled = _split_and_mask(raw.y_train, raw.num_classes, cfg.val_fraction,
                                                   cfg.label_fraction, cfg.seed)
    y_train = raw.y_train[train_idx].clone()
    y_train[~labelled] = -1
    fingerprint = stable_hash({
        "name": cfg.name, "meta": raw.meta, "params": params, "n_train": len(raw.y_train),
        "n_test": len(raw.y_test), "val_fraction": cfg.val_fraction, "label_fraction": cfg.label_fraction,
        "seed": cfg.seed,
    })
    return DataBundle(
        x_train=raw.x_train[train_idx], y_train=y_train, labelled=labelled,
        x_val=raw.x_train[val_idx], y_val=raw.y_train[val_idx], x_test=raw.x_test, y_test=raw.y_test,
        num_classes=raw.num_classes, augment=raw.augment, name=cfg.name, fingerprint=fingerprint,
        meta=raw.meta,
    )
