"""Where kdray keeps things on disk: the cache folder (teachers, generated data, teacher outputs)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | None = None) -> Path:
    """``override``, else ``$KDRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdray`` (``~/.cache/kdray``)."""
    if override:
        root = Path(override)
    elif os.environ.get("KDRAY_CACHE_DIR"):
        root = Path(os.environ["KDRAY_CACHE_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdray"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
