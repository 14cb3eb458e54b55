"""Hugging Face text classification (``hf_text``): a ``save_to_disk`` folder or a hub name, tokenised to
``input_ids`` ``(N, T)`` long padded on the right with kdray's -1 (:mod:`kdray.core.text`; T the longest row, at
most ``max_length``). Needs the optional ``datasets`` and ``transformers`` packages.

A folder is read in any layout of :mod:`kdray.data.saved` (a ``DatasetDict``, one ``Dataset`` split by
``test_fraction``, one folder per split). ``text_pair_field`` names a second text encoded with the first as a pair
(GLUE RTE, MRPC: ``sentence1``, ``sentence2``). Labels are a ``ClassLabel`` column, integers ``0..K-1``, booleans
or strings (classes in sorted order); a negative label (GLUE's test splits carry -1: no label) or one of another
type is refused naming the split and how many rows have it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field

from kdray.config import DataConfig
from kdray.core.hf_package import check_transformers
from kdray.core.text import load_tokenizer, pad_rows
from kdray.data.registry import Params, RawData, register_dataset
from kdray.data.saved import Splits, load_saved, splits_of
from kdray.errors import ConfigError

HF_INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional datasets and transformers packages)"


class HFTextParams(Params):
    tokenizer: str = Field(min_length=1)  # tokenizer folder or hub name (AutoTokenizer.from_pretrained)
    hub_name: Optional[str] = None  # load_dataset(hub_name) instead of load_from_disk(root)
    text_field: str = "text"
    text_pair_field: Optional[str] = None  # a second text, encoded with the first as a pair
    label_field: str = "label"
    max_length: int = Field(128, ge=1)
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = Field(0.2, gt=0, lt=1)  # only for a saved single Dataset (no splits)


def _hf_imports():
    check_transformers("data.name", "hf_text", HF_INSTALL_HINT)
    try:
        import datasets
        import transformers
    except ImportError:
        raise ConfigError("data.name", "hf_text", HF_INSTALL_HINT) from None
    return datasets, transformers


def _tokenise(tokenizer: Any, data: Any, p: HFTextParams) -> torch.Tensor:
    pairs = list(data[p.text_pair_field]) if p.text_pair_field else None
    ids = tokenizer(list(data[p.text_field]), pairs, truncation=True, max_length=p.max_length)["input_ids"]
    return pad_rows(ids)


def _splits(cfg: DataConfig, p: HFTextParams, ds_lib: Any) -> Splits:
    if p.hub_name is None:
        return load_saved(Path(cfg.root or ".").expanduser(), p.train_split, p.test_split, p.test_fraction)
    try:
        ds = ds_lib.load_dataset(p.hub_name, cache_dir=cfg.root)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError("data.params.hub_name", p.hub_name,
                          f"a data set the datasets library can load ({e})") from None
    return splits_of(ds, p.train_split, p.test_split, p.test_fraction)


NO_LABEL_HINT = ("; GLUE and SuperGLUE test splits carry -1, no label: read a split with labels, e.g. a folder "
                 "holding the validation split alone, split by test_fraction")


def _check_labels(p: HFTextParams, split: str, values: list, k: Optional[int]) -> None:
    """Every label an int in 0..k-1 (any k >= 0 when the classes are not named); else a ConfigError saying what."""
    bad = [v for v in values if type(v) is not int or v < 0 or (k is not None and v >= k)]
    if not bad:
        return
    shown = ", ".join(f"{v} in {n}" for v, n in Counter(map(repr, bad)).most_common(3))
    allowed = f"class labels 0..{k - 1}" if k is not None else "class labels 0, 1, ... (integers), booleans or strings"
    negative = any(type(v) is int and v < 0 for v in bad)
    raise ConfigError("data.params.label_field", p.label_field, f"{allowed} in every row (split {split!r} has "
                      f"{shown} of {len(values)} rows){NO_LABEL_HINT if negative else ''}")


def labels(feature: Any, p: HFTextParams, splits: Splits) -> tuple[torch.Tensor, torch.Tensor, int, Optional[list]]:
    """(train labels, test labels, number of classes, class names) of the label column: a ``ClassLabel``'s names,
    the sorted strings or ``False, True`` of a column of those, else None (integer labels)."""
    names = list(feature.names) if getattr(feature, "num_classes", None) else None
    raw = {splits.train_name: list(splits.train[p.label_field]), splits.test_name: list(splits.test[p.label_field])}
    values = [v for vs in raw.values() for v in vs]
    if names is None and values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {c: i for i, c in enumerate(names)}
        raw = {s: [index[v] for v in vs] for s, vs in raw.items()}
    elif names is None and values and all(isinstance(v, bool) for v in values):
        names = ["False", "True"]
        raw = {s: [int(v) for v in vs] for s, vs in raw.items()}
    for split, vs in raw.items():
        _check_labels(p, split, vs, len(names) if names else None)
    k = len(names) if names else max(values, default=0) + 1
    y_tr, y_te = (torch.tensor(raw[s], dtype=torch.long) for s in (splits.train_name, splits.test_name))
    return y_tr, y_te, k, names


@register_dataset("hf_text", HFTextParams, needs_root=lambda p: p.hub_name is None,
                  root_hint="a folder written by datasets' save_to_disk (or set params.hub_name)")
def hf_text(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    p = HFTextParams.model_validate(cfg.params)
    ds_lib, _ = _hf_imports()  # both packages, checked up front
    splits = _splits(cfg, p, ds_lib)
    for key, col in (("text_field", p.text_field), ("text_pair_field", p.text_pair_field),
                     ("label_field", p.label_field)):
        if col is not None and col not in splits.train.column_names:
            raise ConfigError(f"data.params.{key}", col, "one of the columns " + ", ".join(splits.train.column_names))
    y_tr, y_te, num_classes, classes = labels(splits.train.features.get(p.label_field), p, splits)
    tokenizer = load_tokenizer(p.tokenizer, "data.params.tokenizer")
    x_tr, x_te = _tokenise(tokenizer, splits.train, p), _tokenise(tokenizer, splits.test, p)
    meta = {"source": p.hub_name or "disk", "layout": splits.layout, "tokenizer": p.tokenizer,
            "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer), "classes": classes,
            "n_train": len(y_tr), "n_test": len(y_te)}
    return RawData(x_tr, y_tr, x_te, y_te, num_classes, None, meta)
