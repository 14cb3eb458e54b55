"""Teacher-output cache: what a frozen teacher says about every example, computed once, kept on disk.

An entry holds, for the train, validation and test examples in example order (with example ids): the
teacher's logits, the full outputs of the layers that feature methods match, the pooled outputs of the
layers that Probe-KD probes read, and the predictions of the probes fitted on them. It is keyed by a
fingerprint of the teacher weights, the data (content, split, labelled subset, sample counts), the layers,
poolings, probe settings and the storage dtype, so any change makes a new entry.

On disk (``<cache>/teacher_outputs/<key>/``, where ``<cache>`` may be a storage URI: see
:func:`kdray.paths.cache_location`): one Parquet file per split (fixed-size-list columns, float32
or float16) and ``manifest.json`` with the shapes, the probes' accuracies, the size per example, the dtype of
each pooled column (``pooled_dtypes``) and a SHA-256 per file. Pooled states are never stored as inf: a float16
column that would overflow (a hidden value above 65504) is float32 in the whole entry (:func:`storable`,
:func:`widen_overflowing`; Parquet has no bfloat16). A file whose checksum does not match is reported and the entry rebuilt, never used; a
manifest that is not JSON or not of the shape written here is reported and its entry skipped (``kdray cache rm``
still removes it). An entry is built in a temporary folder renamed into place: a failed or interrupted build
removes it, and the folders of killed builds are swept whenever the cache is opened.
An entry whose content covers a request (same teacher, data and dtype; a superset of layers and
probes) serves it, so ``kdray train`` reuses what a search built.

Plain PyTorch, NumPy and pyarrow: nothing here knows about Ray or MLflow. A search puts the loaded
arrays in the Ray object store once; NumPy arrays come back from it zero-copy. The files of an entry (Parquet,
manifest checks, temporary folders, entries on storage) are :mod:`kdray.core.cache_store`. Who runs the teacher is
pluggable (``outputs_fn``, e.g. the Ray Data pass of :mod:`kdray.search.teacher_pass`); by default this process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from kdray.config import stable_hash
from kdray.core.bundle import DataBundle
from kdray.core.cache_store import (FORMAT, SPLITS, CorruptEntry, entry_folder_name, entry_path, list_entry_names,
                                    load_entry, publish, read_manifest, remove_entry, sweep_stale_tmp, tmp_folder,
                                    write_splits)
from kdray.core.hooks import FeatureHooks, module_order, split_layer
from kdray.core.probe_fit import fit_linear
from kdray.core.probes import Probe, ProbeReport, ProbeSpec, accuracy, log_probe, pool, probe_of
from kdray.core.text import length_batches
from kdray.paths import cache_location

log = logging.getLogger("kdray")

ENTRIES = "teacher_outputs"


@dataclass(frozen=True)
class CacheRequest:
    """What a run (or every trial of a search) needs from the teacher."""

    feature_layers: tuple[str, ...] = ()  # full outputs (feature methods)
    probes: tuple[ProbeSpec, ...] = ()
    dtype: str = "float32"  # of the stored features: float32 | float16
    pooled_dtype: str = "float32"  # of the stored pooled outputs (float16 for language models' hidden states)

    @property
    def pooled(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({(p.layer, p.pooling) for p in self.probes}))

    def union(self, other: "CacheRequest") -> "CacheRequest":
        return CacheRequest(tuple(sorted(set(self.feature_layers) | set(other.feature_layers))),
                            tuple(sorted(set(self.probes) | set(other.probes))), self.dtype, self.pooled_dtype)

    def describe(self) -> dict:
        pooled = {"pooled_dtype": self.pooled_dtype} if self.pooled_dtype != "float32" else {}  # keys stay as before
        return {"feature_layers": list(self.feature_layers), "probes": [asdict(p) for p in self.probes],
                "dtype": self.dtype, **pooled}


# --------------------------------------------------------------------------------------------------
# fingerprints


def _hash_tensors(h: "hashlib._Hash", tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (e.g. a temperature buffer) too
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the teacher's class, parameter and buffer names, shapes and values; for a model that knows the
    fingerprint of the files its weights came from (``weights_fingerprint()``, e.g. a Hugging Face folder, hashed
    once and remembered), that one, so a large teacher is not hashed on every run."""
    known = getattr(model, "weights_fingerprint", None)
    if callable(known) and (fp := known()) is not None:
        return stable_hash({"class": type(model).__qualname__, "files": fp})
    h = hashlib.sha256(type(model).__qualname__.encode())
    _hash_tensors(h, sorted(model.state_dict().items()))
    return h.hexdigest()[:16]


def data_fingerprint(bundle: DataBundle) -> str:
    """SHA-256 of the data's content in split order (inputs and labels, -1 for unlabelled) and its config hash."""
    h = hashlib.sha256(bundle.fingerprint.encode())
    _hash_tensors(h, [("x_train", bundle.x_train), ("y_train", bundle.y_train), ("x_val", bundle.x_val),
                      ("y_val", bundle.y_val), ("x_test", bundle.x_test), ("y_test", bundle.y_test)])
    if bundle.teacher_view is not None:  # what the teacher reads
        _hash_tensors(h, [(f"teacher_x_{s}", bundle.teacher_x(s)) for s in SPLITS])
    return h.hexdigest()[:16]


def describe_request(request: CacheRequest) -> str:
    """A request in a few words for the log: the feature layers, and the probes counted, not listed."""
    parts = [f"feature layers {', '.join(request.feature_layers)}"] if request.feature_layers else []
    if request.probes:
        layers = len({p.layer for p in request.probes})
        parts.append(f"{len(request.probes)} probe{'s' * (len(request.probes) != 1)} on {layers} layer"
                     f"{'s' * (layers != 1)}")
    return ", ".join(parts + [f"{request.dtype} features"] * bool(request.feature_layers)) or "logits only"


def entry_key(teacher_fp: str, data_fp: str, request: CacheRequest) -> str:
    return stable_hash({"format": FORMAT, "teacher": teacher_fp, "data": data_fp, **request.describe()})


# --------------------------------------------------------------------------------------------------
# the loaded cache


@dataclass
class TeacherCache:
    """A loaded entry: ``arrays[split][column]`` are NumPy arrays in example order."""

    key: str
    path: Path | str  # a storage URI for an entry on shared storage
    manifest: dict
    arrays: dict[str, dict[str, np.ndarray]]  # empty in a reference (:meth:`reference`) until :meth:`loaded`
    hit: bool  # False when this call built it

    def reference(self) -> "TeacherCache":
        """This entry without its arrays: what a trial on another node gets when the entry is on shared storage."""
        return TeacherCache(self.key, self.path, self.manifest, {}, self.hit)

    def loaded(self) -> "TeacherCache":
        """This entry with its arrays: a reference reads them from its location, every file checked first."""
        if self.arrays:
            return self
        m, arrays = load_entry(self.path)
        log.info("teacher cache: read entry %s from shared storage %s (%.1f MB)", self.key, self.path, m["bytes"] / 1e6)
        return TeacherCache(self.key, self.path, m, arrays, self.hit)

    def covers(self, request: CacheRequest) -> bool:
        return covers(self.manifest, request)

    def tensor(self, split: str, column: str) -> torch.Tensor:
        a = self.arrays[split][column]
        with warnings.catch_warnings():  # arrays from the object store are read-only; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)

    def probe(self, spec: ProbeSpec) -> tuple[torch.Tensor, ProbeReport]:
        """The probe's logits on the training examples and its report: from the cache, or fitted now on
        the cached pooled outputs (a probe setting the search did not list, e.g. a searched ``l2``)."""
        for p in self.manifest.get("probes", []):
            if spec.column in self.arrays["train"] and spec_of(p) == spec:
                return self.tensor("train", spec.column), _report(p)
        probe, report = fit_cached_probe(self.arrays, spec, self.manifest["num_classes"])
        with torch.no_grad():
            return probe(self.tensor("train", _pooled_column(spec.layer, spec.pooling)).float()), report


    def probe_records(self, specs: Iterable[ProbeSpec]) -> list[dict]:
        """The manifest records of ``specs``: those the entry holds, the others fitted now on its pooled outputs
        (``l2: auto`` strengths cross-validated together), e.g. for an entry built for other probe settings."""
        have = {spec_of(p): p for p in self.manifest.get("probes", [])}
        missing = [s for s in specs if s not in have]
        for spec, (_, report) in zip(missing, fit_cached_probes(self.arrays, missing, self.manifest["num_classes"])):
            have[spec] = probe_record(spec, report)
            log_probe(report, spec.l2)
        return [have[s] for s in specs]


def probe_record(spec: ProbeSpec, report: ProbeReport) -> dict:
    """A probe as the manifest records it: its settings, dimension, accuracies and the strength it was fitted with."""
    return {**asdict(spec), "dim": report.dim, "train_acc": report.train_acc, "val_acc": report.val_acc,
            "l2_chosen": report.l2}


def spec_of(p: dict) -> ProbeSpec:
    return ProbeSpec(p["layer"], p["pooling"], p["l2"], p["max_iter"])


def probe_l2(p: dict) -> Optional[float]:
    """The strength a manifest's probe record was fitted with: ``l2_chosen`` (absent in entries written before
    ``l2: auto``), else its fixed ``l2``; None when unknown."""
    fixed = p.get("l2")
    return p.get("l2_chosen", None if isinstance(fixed, str) else fixed)


def _report(p: dict) -> ProbeReport:
    return ProbeReport(p["layer"], p["pooling"], p["dim"], p["train_acc"], p["val_acc"], probe_l2(p))


def probe_reports(manifest: dict) -> list[ProbeReport]:
    return [_report(p) for p in manifest.get("probes", [])]


def covers(manifest: dict, request: CacheRequest) -> bool:
    have = manifest.get("request", {})
    probes = {spec_of(p) for p in have.get("probes", [])}
    pooled = {(p.layer, p.pooling) for p in probes}
    return (have.get("dtype") == request.dtype and have.get("pooled_dtype", "float32") == request.pooled_dtype
            and set(request.feature_layers) <= set(have.get("feature_layers", []))
            and all(p in probes or (p.layer, p.pooling) in pooled for p in request.probes))


def _pooled_column(layer: str, pooling: str) -> str:
    return f"pool/{layer}/{pooling}"


def _labelled_pooled(arrays: dict, spec: ProbeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached pooled outputs of the spec's layer on the labelled training examples, and their labels."""
    y = torch.from_numpy(np.asarray(arrays["train"]["label"]))
    lab = y >= 0
    z = torch.from_numpy(np.array(arrays["train"][_pooled_column(spec.layer, spec.pooling)], dtype=np.float32))
    return z[lab], y[lab]


def fit_cached_probe(arrays: dict, spec: ProbeSpec, num_classes: int) -> tuple[Probe, ProbeReport]:
    return fit_cached_probes(arrays, [spec], num_classes)[0]


def fit_cached_probes(arrays: dict, specs: list[ProbeSpec], num_classes: int) -> list[tuple[Probe, ProbeReport]]:
    """Fit ``specs`` on the cached pooled outputs of the labelled training examples, all together (the ``l2: auto``
    strengths cross-validated together): (probe, report) per spec."""
    out: dict[ProbeSpec, tuple[Probe, ProbeReport]] = {}
    yv = torch.from_numpy(np.asarray(arrays["val"]["label"]))
    for max_iter in sorted({s.max_iter for s in specs}):
        same = [s for s in specs if s.max_iter == max_iter]
        data = [_labelled_pooled(arrays, s) for s in same]
        y = data[0][1]
        fits = fit_linear([z for z, _ in data], y, num_classes, [s.l2 for s in same], max_iter)
        for spec, (z, _), fit in zip(same, data, fits):
            probe = probe_of(fit, spec.pooling)
            zv = torch.from_numpy(np.array(arrays["val"][_pooled_column(spec.layer, spec.pooling)], dtype=np.float32))
            out[spec] = probe, ProbeReport(spec.layer, spec.pooling, z.shape[1], accuracy(probe, z, y),
                                           accuracy(probe, zv, yv), probe.l2)
    return [out[s] for s in specs]


# --------------------------------------------------------------------------------------------------
# building an entry


@torch.inference_mode()
def teacher_outputs(model: nn.Module, x: torch.Tensor, request: CacheRequest, batch_size: int,
                    device: torch.device) -> dict[str, np.ndarray]:
    """Logits, full outputs of the feature layers and pooled outputs of the probe layers for all of ``x``, in
    example order: one pass of the teacher for every layer. Float inputs are cast to the teacher's dtype; token
    ids are batched by length (:func:`~kdray.core.text.length_batches`) so little is spent on padding."""
    layers = sorted(set(request.feature_layers) | {layer for layer, _ in request.pooled})
    dtypes = {"logits": np.float32, **{f"feat/{p}": request.dtype for p in request.feature_layers},
              **{_pooled_column(p, how): request.pooled_dtype for p, how in request.pooled}}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in dtypes}
    order = []
    weight_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    model.eval()
    with FeatureHooks(model, layers) as hooks:
        for idx, xb in length_batches(x, batch_size):
            xb = xb.to(device, weight_dtype if torch.is_floating_point(xb) else None)
            order.append(idx.numpy())
            cols["logits"].append(model(xb).float().cpu().numpy())
            for p in request.feature_layers:
                cols[f"feat/{p}"].append(hooks.outputs[p].float().cpu().numpy().astype(dtypes[f"feat/{p}"], copy=False))
            for p, how in request.pooled:
                col = _pooled_column(p, how)
                pooled = pool(hooks.outputs[p], how, hooks.masks.get(p))
                cols[col].append(storable(pooled.float().cpu().numpy(), dtypes[col]))
    where = np.argsort(np.concatenate(order)) if order else np.zeros((0,), np.int64)
    return {k: np.concatenate(parts)[where] if parts else np.zeros((0,), dtypes[k]) for k, parts in cols.items()}


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: a larger value becomes inf in float16


def storable(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` in ``dtype``, unless that is float16 and ``a`` holds a value beyond float16's range (language models
    have such "massive activations"; it would become inf): then float32, Parquet having no bfloat16."""
    if np.dtype(dtype) == np.float16 and a.size and float(np.abs(a).max()) > FLOAT16_MAX:
        return a.astype(np.float32, copy=False)
    return a.astype(dtype, copy=False)


def widen_overflowing(arrays: dict, request: CacheRequest) -> dict[str, str]:
    """Pooled columns one batch stored in float32 (:func:`storable`) are float32 in every split of the entry; the
    dtype of every pooled column (what the manifest records), with one warning naming those widened."""
    dtypes = {}
    for p, how in request.pooled:
        col = _pooled_column(p, how)
        dtypes[col] = np.result_type(*(arrays[s][col].dtype for s in SPLITS)).name
        for s in SPLITS:
            arrays[s][col] = arrays[s][col].astype(dtypes[col], copy=False)
    wide = [c for c, d in dtypes.items() if d != np.dtype(request.pooled_dtype).name]
    if wide:
        peak = max(float(np.abs(arrays[s][c]).max()) for c in wide for s in SPLITS if arrays[s][c].size)
        log.warning("teacher cache: pooled states of %s reach %.4g, beyond float16's range (%g): stored in float32 "
                    "(Parquet has no bfloat16), never as inf", ", ".join(wide), peak, FLOAT16_MAX)
    return dtypes


# who runs the teacher over one split: (teacher, x, request, batch_size, device) -> columns, as teacher_outputs
OutputsFn = Callable[[nn.Module, torch.Tensor, CacheRequest, int, torch.device], dict[str, np.ndarray]]


def _compute_arrays(teacher: nn.Module, bundle: DataBundle, request: CacheRequest, batch_size: int,
                    device: torch.device, outputs_fn: Optional[OutputsFn] = None) -> dict[str, dict[str, np.ndarray]]:
    """Per split: example ids, labels and the teacher's outputs (by ``outputs_fn``, else in this process), on the
    teacher's view of the examples."""
    outputs_fn = outputs_fn or teacher_outputs
    data = {s: (bundle.teacher_x(s), getattr(bundle, f"y_{s}")) for s in SPLITS}
    arrays = {}
    for split, (x, y) in data.items():
        cols = outputs_fn(teacher, x, request, batch_size, device)
        arrays[split] = {"example_id": np.arange(len(x), dtype=np.int64), "label": y.numpy().astype(np.int64), **cols}
    return arrays


def _add_probe_predictions(arrays: dict, request: CacheRequest, num_classes: int) -> list[dict]:
    """Fit the requested probes, add their predictions to ``arrays``; their manifest records."""
    probes = []
    for spec, (probe, report) in zip(request.probes, fit_cached_probes(arrays, list(request.probes), num_classes)):
        with torch.no_grad():
            for split in SPLITS:
                z = torch.from_numpy(arrays[split][_pooled_column(spec.layer, spec.pooling)])
                arrays[split][spec.column] = probe(z.float()).numpy()
        probes.append(probe_record(spec, report))
        log_probe(report, spec.l2)
    return probes


def teacher_accuracy(arrays: dict, num_classes: int) -> dict[str, float]:
    """The teacher's own accuracy per split (its answer-token accuracy, for a language model), when its outputs are
    the task's classes."""
    out = {}
    for split in SPLITS:
        logits, y = arrays[split]["logits"], np.asarray(arrays[split]["label"])
        lab = y >= 0
        if logits.ndim == 2 and logits.shape[1] == num_classes and lab.any():
            out[split] = float((logits[lab].argmax(1) == y[lab]).mean())
    return out


def in_module_order(probes: list[dict], teacher: nn.Module) -> list[dict]:
    """The probe records sorted by their layer's place in the teacher (:func:`~kdray.core.hooks.module_order`: the
    order a forward produces the outputs of a model built in the order it runs), each with that ``depth`` (what
    tables and plots by layer follow)."""
    order = module_order(teacher)
    depth = {r["layer"]: order.get(split_layer(r["layer"])[0], len(order)) for r in probes}
    return sorted(({**r, "depth": depth[r["layer"]]} for r in probes), key=lambda r: (r["depth"], r["layer"]))


def _fill_entry(folder: Path, key: str, teacher: nn.Module, bundle: DataBundle, request: CacheRequest,
                info: dict, batch_size: int, device: torch.device, outputs_fn: Optional[OutputsFn] = None) -> None:
    """Run the teacher over every split, fit the probes, write the files and the manifest into ``folder``."""
    t0 = time.perf_counter()
    arrays = _compute_arrays(teacher, bundle, request, batch_size, device, outputs_fn)
    pooled_dtypes = widen_overflowing(arrays, request)
    probes = _add_probe_predictions(arrays, request, bundle.num_classes)
    probes = in_module_order(probes, teacher)
    answer_acc = teacher_accuracy(arrays, bundle.num_classes)
    files, shapes = write_splits(folder, arrays)
    n = sum(f["rows"] for f in files.values())
    total = sum(f["bytes"] for f in files.values())
    manifest = {"format": FORMAT, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "teacher": info.get("teacher", {}), "data": info.get("data", {}), "num_classes": bundle.num_classes,
                "request": request.describe(), "shapes": shapes, "files": files, "probes": probes,
                "pooled_dtypes": pooled_dtypes,
                "teacher_accuracy": answer_acc,
                "examples": n, "bytes": total, "bytes_per_example": round(total / max(n, 1), 1),
                "build_seconds": round(time.perf_counter() - t0, 2), "notes": info.get("notes", [])}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def build_entry(root: Path | str, key: str, teacher: nn.Module, bundle: DataBundle, request: CacheRequest,
                info: dict, batch_size: int, device: torch.device, outputs_fn: Optional[OutputsFn] = None
                ) -> Path | str:
    """Build the entry in a temporary folder and rename it into place (on storage: upload it, manifest last); an
    interrupted or failed build (Ctrl-C included) removes its temporary folder (one left by a killed process is
    swept later)."""
    if isinstance(root, str):
        with tempfile.TemporaryDirectory(prefix=f"kdray-{key}-") as tmp:
            _fill_entry(Path(tmp), key, teacher, bundle, request, info, batch_size, device, outputs_fn)
            return publish(Path(tmp), root, key)
    tmp = tmp_folder(root, key)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _fill_entry(tmp, key, teacher, bundle, request, info, batch_size, device, outputs_fn)
        final = root / key
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------------------
# finding and loading entries


def entries_root(cache_root: Optional[str] = None) -> Path | str:
    """The folder of the entries: local (made when missing, swept of stale temporary folders), or a storage URI."""
    location = cache_location(cache_root)
    if isinstance(location, str):
        return f"{location}/{ENTRIES}"
    root = location / ENTRIES
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(root)
    return root


def entry_names(cache_root: Optional[str] = None) -> list[str]:
    """Every entry folder, readable or not (what ``kdray cache rm`` may remove)."""
    return list_entry_names(entries_root(cache_root))


def _summary(p: Path | str, m: dict) -> dict:
    return {"key": entry_folder_name(p), "teacher": m["teacher"].get("model", ""), "data": m["data"].get("name", ""),
            "examples": m["examples"], "bytes": m["bytes"], "bytes_per_example": m["bytes_per_example"],
            "feature_layers": ",".join(m["request"]["feature_layers"]), "probes": len(m["request"]["probes"]),
            "dtype": m["request"]["dtype"], "created": m["created"], "path": str(p)}


def _warn_corrupt(name: str, e: CorruptEntry, rebuild: bool = False) -> None:
    then = "rebuilding it" if rebuild else f"skipped (remove it with `kdray cache rm {name}`)"
    log.warning("teacher cache: entry %s is corrupt (%s): %s", name, e, then)


def list_entries(cache_root: Optional[str] = None) -> list[dict]:
    """One summary per entry whose manifest reads; the others are skipped with a warning saying why."""
    root = entries_root(cache_root)
    out = []
    for name in entry_names(cache_root):
        try:
            out.append(_summary(entry_path(root, name), read_manifest(entry_path(root, name))))
        except CorruptEntry as e:
            _warn_corrupt(name, e)
    return out


def remove_entries(keys: list[str], cache_root: Optional[str] = None) -> list[str]:
    """Remove entry folders by name, whatever their manifests say; the names removed."""
    root, names = entries_root(cache_root), set(entry_names(cache_root))
    removed = []
    for k in keys:
        if k in names:
            remove_entry(entry_path(root, k))
            removed.append(k)
    return removed


def _usable(path: Path | str, t_fp: str, d_fp: str, request: CacheRequest, key: str):
    """(manifest, arrays) of the entry at ``path`` when it is intact and serves the request, else None
    (a corrupt entry is reported; the one under ``key`` is about to be rebuilt, the others are left alone)."""
    try:
        m = read_manifest(path)
        if m["teacher"].get("fingerprint") != t_fp or m["data"].get("fingerprint") != d_fp or not covers(m, request):
            return None
        return load_entry(path)
    except CorruptEntry as e:
        _warn_corrupt(entry_folder_name(path), e, rebuild=entry_folder_name(path) == key)
        return None


def get_cache(teacher: nn.Module, bundle: DataBundle, request: CacheRequest, *, cache_root: Optional[str] = None,
              info: Optional[dict] = None, batch_size: int = 1000, device: Optional[torch.device] = None,
              outputs_fn: Optional[OutputsFn] = None) -> TeacherCache:
    """The entry for (teacher, data, request): loaded when present and intact, else built (with a message) by
    ``outputs_fn`` (default: :func:`teacher_outputs` in this process)."""
    device = device or next(teacher.parameters()).device
    root = entries_root(cache_root)
    t_fp, d_fp = teacher_fingerprint(teacher), data_fingerprint(bundle)
    key = entry_key(t_fp, d_fp, request)
    info = dict(info or {})
    info["teacher"] = {**info.get("teacher", {}), "fingerprint": t_fp}
    info["data"] = {**info.get("data", {}), "fingerprint": d_fp, "name": bundle.name}
    names = entry_names(cache_root)
    for name in ([key] if key in names else []) + [n for n in names if n != key]:
        found = _usable(entry_path(root, name), t_fp, d_fp, request, key)
        if found:
            m, arrays = found
            log.info("teacher cache: hit %s (%d examples, %.0f bytes/example)", name, m["examples"],
                     m["bytes_per_example"])
            return TeacherCache(name, entry_path(root, name), m, arrays, hit=True)
    log.info("teacher cache: building %s (teacher %s, data %s: %s)", key, t_fp, d_fp, describe_request(request))
    path = build_entry(root, key, teacher, bundle, request, info, batch_size, device, outputs_fn)
    m, arrays = load_entry(path)
    log.info("teacher cache: built %s in %.1fs: %d examples, %.1f MB, %.0f bytes/example", key, m["build_seconds"],
             m["examples"], m["bytes"] / 1e6, m["bytes_per_example"])
    return TeacherCache(key, path, m, arrays, hit=False)
