"""Where kdray keeps things on disk: the cache folder (teachers, generated data, teacher outputs), the checks
that a folder the user names can be written before any work starts, and the one set of helpers for paths that
may be local or a storage URI (``s3://``, ``gs://``...; through pyarrow's file systems): join, exists, remove,
read and write text."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from kdray.errors import ConfigError, first_line


def _configured_cache(override: str | None) -> tuple[str, str] | None:
    """(value, field) of the cache location the user chose: ``cache_dir``, else ``$KDRAY_CACHE_DIR``; None: the
    default."""
    if override:
        return override, "cache_dir"
    if os.environ.get("KDRAY_CACHE_DIR"):
        return os.environ["KDRAY_CACHE_DIR"], "KDRAY_CACHE_DIR"
    return None


def cache_dir(override: str | None = None) -> Path:
    """The local cache folder (teachers, generated data, and teacher outputs unless :func:`cache_location` is a
    URI): ``override``, else ``$KDRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdray`` (``~/.cache/kdray``). A storage
    URI there holds teacher outputs only, so this falls back to the user cache folder."""
    chosen = _configured_cache(override)
    if chosen and not is_remote(chosen[0]):
        root, field = Path(chosen[0]), chosen[1]
    else:
        root, field = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdray", "XDG_CACHE_HOME"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(field, str(root), f"a folder kdray can create and write to ({e.strerror})") from None
    return root


def cache_location(override: str | None = None) -> str | Path:
    """Where teacher outputs are cached: a storage URI given as ``cache_dir`` or ``$KDRAY_CACHE_DIR`` (``s3://``,
    ``gs://``, ``file://`` for a folder every node mounts), else the local :func:`cache_dir`."""
    chosen = _configured_cache(override)
    return chosen[0].rstrip("/") if chosen and is_remote(chosen[0]) else cache_dir(override)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_output_file(path: Path, field: str, example: str) -> None:
    """A file kdray may write: not a folder, in a folder it can create and write in (nothing is created)."""
    if path.is_dir():
        raise ConfigError(field, str(path), f"a file path such as {example} (this is a folder)")
    check_writable_dir(path.parent, field)


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
    """The kdray cache location (``cache_dir``, else ``$KDRAY_CACHE_DIR``, else the user cache) is writable: a
    local folder, or a storage URI."""
    chosen = _configured_cache(override)
    if chosen and is_remote(chosen[0]):
        check_writable_uri(*chosen)
    elif chosen:
        check_writable_dir(*chosen)


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


def _check_scheme(uri: str, field: str) -> None:
    if uri.split("://", 1)[0] not in STORAGE_SCHEMES:
        raise ConfigError(field, uri, "a local folder, or a URI of s3://, gs://, hdfs://, abfs:// or file://")


def check_storage(storage: str, field: str) -> str:
    """A results storage as Ray Tune takes it, checked before any work: a local folder kdray can write to (made
    absolute), or a URI of a file system pyarrow knows."""
    if not is_remote(storage):
        return str(check_writable_dir(storage, field).resolve())
    _check_scheme(storage, field)
    return storage


def check_writable_uri(uri: str, field: str) -> str:
    """A storage URI kdray can write to, checked before any work: a ``file://`` folder as a local folder (creating
    nothing), any other by writing and removing a probe object under it."""
    _check_scheme(uri, field)
    try:
        fs, p = _fs(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise ConfigError(field, uri, f"a storage URI pyarrow can open ({first_line(e)})") from None
    if uri.startswith("file://"):
        try:
            check_writable_dir(p, field)
        except ConfigError as e:
            raise ConfigError(field, uri, e.allowed) from None
        return uri
    probe = f"{p.rstrip('/')}/.kdray-write-check-{os.getpid()}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - OSError, or pyarrow's own errors for credentials and buckets
        raise ConfigError(field, uri, f"a storage URI kdray can write to ({first_line(e)})") from None
    return uri


# the files of a folder on storage (teacher-cache entries on shared storage)


def list_folders(uri: str) -> list[str]:
    """Names of the folders directly under ``uri`` (none when it does not exist)."""
    import pyarrow.fs as pafs

    fs, p = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory]


def read_bytes(uri: str) -> bytes:
    """The bytes of a file on storage (OSError when it cannot be read)."""
    fs, p = _fs(uri)
    with fs.open_input_stream(p) as f:
        return f.read()


def upload(local: Path, uri: str) -> None:
    """Copy a local file to ``uri``, creating its folder."""
    fs, p = _fs(uri)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(p) as dst:
        for chunk in iter(lambda: src.read(1 << 24), b""):
            dst.write(chunk)
