"""Where kdray keeps things on disk: the cache folder (teachers, generated data, teacher outputs), the checks
that a folder the user names can be written before any work starts, and the one set of helpers for paths that
may be local or a storage URI (``s3://``, ``gs://``...; through pyarrow's file systems): join, exists, remove,
read and write text."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from kdray.errors import ConfigError


def cache_dir(override: str | None = None) -> Path:
    """``override``, else ``$KDRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdray`` (``~/.cache/kdray``)."""
    if override:
        root = Path(override)
    elif os.environ.get("KDRAY_CACHE_DIR"):
        root = Path(os.environ["KDRAY_CACHE_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdray"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        field = "cache_dir" if override else "KDRAY_CACHE_DIR" if os.environ.get("KDRAY_CACHE_DIR") else "XDG_CACHE_HOME"
        raise ConfigError(field, str(root), f"a folder kdray can create and write to ({e.strerror})") from None
    return root


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_writable_dir(path: str | Path, field: str) -> Path:
    """A folder kdray can create and write in. Creates nothing: probes the folder, or its nearest existing
    parent, with a temporary file that is removed at once."""
    p = Path(path).expanduser()
    if str(path).strip() == "":
        raise ConfigError(field, str(path), "a folder path (it is empty)")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, str(path), f"a folder path ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kdray-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(field, str(path), f"a folder kdray can write to ({existing}: {e.strerror})") from None
    return p


def check_free_output_dir(path: str | Path, field: str, overwrite: bool = False) -> Path:
    """A writable output folder that does not already hold a run (unless ``overwrite``)."""
    p = check_writable_dir(path, field)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise ConfigError(field, str(path), "an empty or new folder (this one holds an earlier run: choose another "
                                            "--output-dir or name, or pass --overwrite to replace it)")
    return p


def check_cache_dir(override: Optional[str]) -> None:
    """The kdray cache folder (``cache_dir``, else ``$KDRAY_CACHE_DIR``, else the user cache) is writable."""
    if override:
        check_writable_dir(override, "cache_dir")
    elif os.environ.get("KDRAY_CACHE_DIR"):
        check_writable_dir(os.environ["KDRAY_CACHE_DIR"], "KDRAY_CACHE_DIR")


# --------------------------------------------------------------------------------------------------
# local folders and storage URIs (s3://, gs://, hdfs://, abfs://, file://): the one place that tells them apart

STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_remote(path: str | Path) -> bool:
    """A URI of a file system (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...``: with ``/`` for a URI, the local separator for a local path."""
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def remove_tree(path: str) -> None:
    """Delete a folder and everything in it."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path)
        return
    fs, p = _fs(path)
    fs.delete_dir(p)


def write_text(path: str, text: str) -> None:
    """Write a text file, creating its folder."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def read_text(path: str) -> Optional[str]:
    """The text of a file, or None when it is missing or cannot be read."""
    try:
        if not is_remote(path):
            return Path(path).read_text() if Path(path).is_file() else None
        fs, p = _fs(path)
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    except OSError:
        return None


def check_storage(storage: str, field: str) -> str:
    """A results storage as Ray Tune takes it, checked before any work: a local folder kdray can write to (made
    absolute), or a URI of a file system pyarrow knows."""
    if not is_remote(storage):
        return str(check_writable_dir(storage, field).resolve())
    if storage.split("://", 1)[0] not in STORAGE_SCHEMES:
        raise ConfigError(field, storage, "a local folder, or a URI of s3://, gs://, hdfs://, abfs:// or file://")
    return storage
