"""Fingerprints of model folders by content, remembered by path, size and modification time.

Hashing a 15 GB teacher's weights on every run would cost minutes; :func:`folder_fingerprint` reads each file
once, keeps its SHA-256 in ``<cache>/fingerprints.json`` keyed by absolute path, size and ``mtime_ns``, and
combines the files' hashes (with their relative names) into the folder's fingerprint. A file that changes (size
or mtime) is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from kdray.paths import cache_dir

MEMO = "fingerprints.json"
CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _read_memo(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(path: Path, memo: dict) -> None:
    """Atomically (a concurrent reader sees the old or the new file, never half of one); a read-only cache is
    no error, only slower next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError:
        pass


def folder_fingerprint(folder: str | Path, cache_root: Optional[str] = None) -> str:
    """SHA-256 over the relative names and contents of every file below ``folder`` (hidden ones skipped)."""
    root = Path(folder).expanduser().resolve()
    memo_path = cache_dir(cache_root) / MEMO
    memo, changed = _read_memo(memo_path), False
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    for p in files:
        st = p.stat()
        key = str(p)
        seen = memo.get(key)
        if not (isinstance(seen, dict) and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns):
            seen = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(p)}
            memo[key], changed = seen, True
        h.update(f"{p.relative_to(root).as_posix()}:{seen['sha256']};".encode())
    if changed:
        _write_memo(memo_path, memo)
    return h.hexdigest()[:16]
