"""Hugging Face text classification (``hf_text``): a ``save_to_disk`` folder or a hub name, tokenised to
padded ``input_ids`` ``(N, max_length)`` long (needs the optional ``datasets`` and ``transformers`` packages)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field

from kdray.config import DataConfig
from kdray.core.hf_package import check_transformers
from kdray.core.text import load_tokenizer
from kdray.data.registry import Params, RawData, register_dataset
from kdray.errors import ConfigError

HF_INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional datasets and transformers packages)"


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
    check_transformers("data.name", "hf_text", HF_INSTALL_HINT)
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
    ds_lib, _ = _hf_imports()  # both packages, checked up front
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
    tokenizer = load_tokenizer(p.tokenizer, "data.params.tokenizer")
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
