"""The files of a teacher-cache entry (:mod:`kdray.core.cache`): one Parquet file per split with fixed-size-list
columns, ``manifest.json`` checked against the shape written here, SHA-256 checksums, and the temporary
folders builds write into (swept when left by a build that did not finish).

The entries' root is a local folder (a :class:`~pathlib.Path`) or a storage URI (a ``str``: ``s3://``, ``gs://``,
``file://`` for a folder every node mounts; through :mod:`kdray.paths`). On storage an entry is built in a local
temporary folder, then uploaded with its manifest last: a reader skips an entry without a manifest, a failed
upload removes what it wrote, and every file is checked against its checksum on read, as for a local entry."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

import numpy as np

from kdray import paths

log = logging.getLogger("kdray")

FORMAT = "kdray-teacher-cache-v1"
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------
# Parquet files and checksums


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [], []
    for name, a in columns.items():
        a = np.ascontiguousarray(a)
        if a.ndim == 1:
            arrays.append(pa.array(a))
        else:
            width = int(np.prod(a.shape[1:]))
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width))
        names.append(name)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path, compression="none")


def _read_parquet(path, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The columns of a Parquet file (a local path, or a pyarrow buffer of a file read from storage)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        a = col.flatten().to_numpy(zero_copy_only=False) if hasattr(col, "flatten") and col.type.num_fields == 1 \
            else col.to_numpy(zero_copy_only=False)
        out[name] = a.reshape([-1, *shapes[name]]) if name in shapes else a
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_splits(folder: Path, arrays: dict) -> tuple[dict, dict]:
    """One Parquet file per split in ``folder``: their manifest records and the column shapes."""
    files, shapes = {}, {}
    for split in SPLITS:
        shapes.update({k: list(v.shape[1:]) for k, v in arrays[split].items()})
        path = folder / f"{split}.parquet"
        _write_parquet(path, arrays[split])
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, "rows": len(arrays[split]["label"])}
    return files, shapes


# --------------------------------------------------------------------------------------------------
# temporary folders of builds that never finished

TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 24 * 3600  # a temporary folder this old is stale whoever made it
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
_TMP_NAME = re.compile(r"^\.[^.]+\.(?:(?P<host>[^.]+)\.)?(?P<pid>\d+)\.tmp$")


def tmp_folder(root: Path, key: str) -> Path:
    """Where this process builds the entry ``key`` (named after the host and the process, for the sweep)."""
    return root / f".{key}.{_HOST}.{os.getpid()}{TMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _is_stale(path: Path, now: float) -> bool:
    """Left by a build on this host whose process is gone, or older than ``STALE_TMP_SECONDS``."""
    m = _TMP_NAME.match(path.name)
    if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
        return True
    try:
        return now - path.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:  # removed meanwhile
        return False


def sweep_stale_tmp(root: Path) -> list[str]:
    """Remove the temporary folders of builds killed before they could clean up; their names."""
    now, removed = time.time(), []
    for p in root.glob(f".*{TMP_SUFFIX}"):
        if p.is_dir() and _is_stale(p, now):
            shutil.rmtree(p, ignore_errors=True)
            log.info("teacher cache: removed %s, left by a build that did not finish", p.name)
            removed.append(p.name)
    return removed


# --------------------------------------------------------------------------------------------------
# checking and loading an entry


class CorruptEntry(Exception):
    pass


_NUMBER = (int, float)
_MANIFEST = {"format": str, "key": str, "created": str, "teacher": dict, "data": dict, "num_classes": int,
             "request": dict, "shapes": dict, "files": dict, "probes": list, "examples": int, "bytes": _NUMBER,
             "bytes_per_example": _NUMBER}
_REQUEST = {"feature_layers": list, "probes": list, "dtype": str}
_PROBE_SPEC = {"layer": str, "pooling": str, "l2": (int, float, str), "max_iter": int}  # l2: a number or "auto"
_PROBE_RECORD = {**_PROBE_SPEC, "dim": int, "train_acc": _NUMBER, "val_acc": _NUMBER}
_PROBE_RECORD_LATER = {"l2_chosen": _NUMBER}  # fields an older entry may lack
_FILE = {"sha256": str, "bytes": int, "rows": int}
_FILES = {f"{s}.parquet" for s in SPLITS}


def _type_name(t) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(x, x.__name__) for x in (t if isinstance(t, tuple) else (t,)))


def _check_fields(obj, fields: dict, where: str, optional: Optional[dict] = None) -> None:
    """``obj`` is a dict with every field of ``fields`` of its type (booleans are not numbers), and the fields of
    ``optional`` it has of theirs."""
    if not isinstance(obj, dict):
        raise CorruptEntry(f"{where} is {_type_name(type(obj))}, expected {_type_name(dict)}")
    for name, t in {**fields, **(optional or {})}.items():
        if name not in obj:
            if name in fields:
                raise CorruptEntry(f"{where} has no {name!r}")
            continue
        if not isinstance(obj[name], t) or isinstance(obj[name], bool):
            raise CorruptEntry(f"{where}: {name!r} is {obj[name]!r}, expected {_type_name(t)}")


def _check_items(items: list, fields: dict, where: str, optional: Optional[dict] = None) -> None:
    for i, item in enumerate(items):
        _check_fields(item, fields, f"{where}[{i}]", optional)


def check_manifest(m, folder: str) -> dict:
    """``m`` when it has the shape this version writes (and the key of its folder), else CorruptEntry saying
    what is wrong: every reader of a manifest can then index it without checks of its own."""
    if isinstance(m, dict) and "format" in m and m["format"] != FORMAT:
        raise CorruptEntry(f"format {m['format']!r}, expected {FORMAT!r}")
    _check_fields(m, _MANIFEST, "manifest")
    _check_fields(m["request"], _REQUEST, "manifest 'request'")
    if not all(isinstance(x, str) for x in m["request"]["feature_layers"]):
        raise CorruptEntry("manifest 'request': 'feature_layers' is not a list of strings")
    _check_items(m["request"]["probes"], _PROBE_SPEC, "manifest 'request' probe")
    _check_items(m["probes"], _PROBE_RECORD, "manifest probe", _PROBE_RECORD_LATER)
    if set(m["files"]) != _FILES:
        raise CorruptEntry(f"manifest 'files' lists {sorted(m['files'])}, expected {sorted(_FILES)}")
    _check_items(list(m["files"].values()), _FILE, "manifest file")
    if not all(isinstance(v, list) and all(isinstance(d, int) for d in v) for v in m["shapes"].values()):
        raise CorruptEntry("manifest 'shapes' is not a mapping of column to a list of integers")
    if m["key"] != folder:
        raise CorruptEntry(f"manifest key {m['key']!r} is not the folder name")
    return m


def entry_path(root: Path | str, name: str) -> Path | str:
    """The entry ``name`` under a local root or a storage URI."""
    return paths.join(root, name) if isinstance(root, str) else root / name


def entry_folder_name(path: Path | str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if isinstance(path, str) else path.name


def list_entry_names(root: Path | str) -> list[str]:
    """Every entry folder under the root, readable or not (temporary folders excluded)."""
    names = paths.list_folders(root) if isinstance(root, str) else [p.name for p in root.iterdir() if p.is_dir()]
    return sorted(n for n in names if not n.startswith("."))


def remove_entry(path: Path | str) -> None:
    if isinstance(path, str):
        paths.remove_tree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish(folder: Path, root: str, key: str) -> str:
    """Upload a built entry to storage, manifest last (so no reader takes a half-uploaded entry); a failed or
    interrupted upload removes what it wrote. The entry's URI."""
    dest = entry_path(root, key)
    try:
        for name in sorted(f"{s}.parquet" for s in SPLITS) + ["manifest.json"]:
            paths.upload(folder / name, paths.join(dest, name))
    except BaseException:
        if paths.exists(dest):
            paths.remove_tree(dest)
        raise
    return dest


def read_manifest(path: Path | str) -> dict:
    """The entry's checked manifest, or CorruptEntry (unreadable, not JSON, or the wrong shape)."""
    try:
        text = paths.read_bytes(paths.join(path, "manifest.json")).decode() if isinstance(path, str) \
            else (path / "manifest.json").read_text()
        m = json.loads(text)
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"manifest unreadable: {e}") from None
    return check_manifest(m, entry_folder_name(path))


def _verified(path: Path | str, name: str, sha256: str):
    """The file ``name`` of the entry, checked against its SHA-256: its local path, or its bytes read from
    storage as a pyarrow buffer."""
    import pyarrow as pa

    if isinstance(path, str):
        try:
            data = paths.read_bytes(paths.join(path, name))
        except (OSError, FileNotFoundError):
            raise CorruptEntry(f"{name} is missing") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptEntry(f"{name} does not match its checksum")
        return pa.BufferReader(data)
    p = path / name
    if not p.is_file():
        raise CorruptEntry(f"{name} is missing")
    if _sha256(p) != sha256:
        raise CorruptEntry(f"{name} does not match its checksum")
    return p


def load_entry(path: Path | str) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Manifest and arrays of an entry (local, or on storage), every file checked against its SHA-256 first."""
    m = read_manifest(path)
    files = {name: _verified(path, name, f["sha256"]) for name, f in m["files"].items()}
    try:
        arrays = {s: _read_parquet(files[f"{s}.parquet"], m["shapes"]) for s in SPLITS}
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise CorruptEntry(f"unreadable: {e}") from None
    return m, arrays
