"""File helpers: content hashes, atomic JSON writes, atomic directory replacement."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Per-process memo of file hashes keyed by (path, size, mtime_ns, inode): a file is read at most once per run.
_memo: dict[tuple[str, int, int, int], str] = {}


def hash_file(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _memo:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def hash_path(path: Path) -> str:
    """Content hash of a file, or of a folder (relative names + contents of every file, in sorted order).
    A missing path hashes to a fixed marker, so its later appearance changes the hash."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file():
        return hash_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + hash_file(file).encode() + b"\n")
    return digest.hexdigest()


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temp file and rename, so readers never see a half-written file.
    (Renaming also gives the file a new inode, so a hard link to the old content is left untouched.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_text_atomic` of ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no copy of big weight files) or copy when linking is impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it replaces ``final`` in two renames.
    On failure the staging folder is removed and ``final`` (if any) is left exactly as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = final.parent / f".{final.name}.staging-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{token}"
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
