"""Data sets: loaders that return tensors, and the split into train / validation / test with partial labels.

A loader (registered in ``DATASETS``) is ``loader(cfg: DataConfig) -> RawData``: whole train and test
tensors, the number of classes, an optional batched augmentation ``augment(x, generator) -> x`` and a
``meta`` dict describing the data. Each loader declares its ``data.params`` as a pydantic model
(``loader.params_model``); :func:`check_data_params` validates them (and ``data.root`` for file-based
data sets) before any work starts.

:func:`make_bundle` turns a :class:`~kdray.config.DataConfig` into a :class:`DataBundle`: a seeded
validation split carved from the training data, then a stratified, seeded subset of the remaining
training examples kept labelled (``y_train == -1`` elsewhere), plus a fingerprint of all of this.

The registry and its base pieces are :mod:`kdray.data.registry`; the built-in data sets, registered when
this package is imported, are :mod:`kdray.data.mnist1d` (``mnist1d``), :mod:`kdray.data.cifar`
(``cifar10``, ``cifar100``), :mod:`kdray.data.hf_text` (``hf_text``) and :mod:`kdray.data.multiple_choice`
(``multiple_choice``: prompts for a language-model teacher, with a student view of their own).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError

from kdray.config import DataConfig, config_error_from, stable_hash
from kdray.core.bundle import DataBundle, TeacherView
from kdray.core.hf_package import check_transformers
# importing the built-in data sets registers them
from kdray.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarParams, RestrictedUnpickler
from kdray.data.hf_text import HF_INSTALL_HINT, HFTextParams
from kdray.data.mnist1d import MNIST1DParams
from kdray.data.multiple_choice import MultipleChoiceParams
from kdray.data.registry import DATASETS, Params, RawData, register_dataset
from kdray.errors import ConfigError

__all__ = ["DATASETS", "RawData", "DataBundle", "make_bundle", "check_data_params", "load_raw", "Params",
           "register_dataset", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "RestrictedUnpickler",
           "MNIST1DParams", "CifarParams", "HFTextParams", "MultipleChoiceParams", "TeacherView"]


def _parse_params(loader: Callable, cfg: DataConfig, field_: str) -> Params:
    model: type[Params] = loader.params_model  # type: ignore[attr-defined]

    def explain(err: dict) -> str:
        if err["type"] == "extra_forbidden":
            return "no such parameter; known: " + ", ".join(model.model_fields)
        if err["type"] == "missing":
            return f"a value (data set {cfg.name} requires params.{err['loc'][0] if err['loc'] else ''})"
        return err["msg"].removeprefix("Value error, ")

    try:
        return model.model_validate(cfg.params)
    except ValidationError as e:
        raise config_error_from(e, (field_, "params"), explain=explain) from None


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
    if cfg.name in ("hf_text", "multiple_choice"):
        if importlib.util.find_spec("datasets") is None:
            raise ConfigError(f"{field}.name", cfg.name, HF_INSTALL_HINT)
        check_transformers(f"{field}.name", cfg.name, HF_INSTALL_HINT)


def load_raw(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    """Validate ``cfg`` and run its loader."""
    check_data_params(cfg, "data")
    return DATASETS.get(cfg.name)(cfg, cache_dir=cache_dir)


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
    if raw.with_labelled is not None:
        raw = raw.with_labelled(train_idx[labelled].tolist())
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
        meta=raw.meta, teacher_view=_teacher_view(raw, train_idx, val_idx),
    )


def _teacher_view(raw: RawData, train_idx: torch.Tensor, val_idx: torch.Tensor) -> TeacherView | None:
    if raw.teacher_x_train is None:
        return None
    return TeacherView(raw.teacher_x_train[train_idx], raw.teacher_x_train[val_idx], raw.teacher_x_test)
