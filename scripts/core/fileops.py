"""File helpers: content hashes, atomic JSON writes, crash-safe folder replacement (:func:`atomic_dir`,
:func:`recover_dir`)."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

from scripts.core.faults import checkpoint, exchange_disabled
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


# ----- replacing a folder atomically --------------------------------------------------------------------------------
#: Leftovers of :func:`atomic_dir` beside ``<name>``: ``.<name>.staging-<token>`` (a new copy being built, or, after an
#: exchange, the old copy being removed) and ``.<name>.old-<token>`` (the old copy moved aside, without exchange).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-[0-9a-f]{8}$")
_RENAME_EXCHANGE = 1 << 1
_AT_FDCWD = -100
#: errno of a filesystem or kernel without RENAME_EXCHANGE (then two renames and :func:`recover_dir`).
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


@functools.lru_cache(maxsize=1)
def _renameat2():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn, ctypes


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``): at no instant is either name missing.
    Raises OSError: EINVAL/ENOSYS/ENOTSUP where the filesystem, kernel or OS has no such operation (anything but
    Linux; Linux < 3.15; filesystems that do not implement it), EXDEV across mounts, ENOENT when one is missing."""
    if sys.platform != "linux":
        raise OSError(errno.ENOSYS, f"RENAME_EXCHANGE is Linux-only ({sys.platform})")
    if exchange_disabled():
        raise OSError(errno.EINVAL, "RENAME_EXCHANGE disabled by SLMOPS_TEST_NO_EXCHANGE")
    fn, ctypes = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "this C library has no renameat2")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file of ``folder`` (not recursive) and the folder itself."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(final: Path, label: str = "swap", hide_marker: str | None = None,
               durable: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it takes the place of ``final``.

    - ``final`` exists: the two folders are exchanged in one ``renameat2(RENAME_EXCHANGE)``, so ``final`` is the
      old or the new copy at every instant, whatever kills the process when; then the old copy is removed. Where the
      OS or filesystem has no exchange, ``final`` is renamed to ``.<name>.old-<token>`` and the staging folder to
      ``final``: a kill between the two leaves no ``final`` until :func:`recover_dir` puts the old copy back.
    - ``final`` does not exist: one rename.
    - On an exception the staging folder is removed and ``final`` (if any) is left exactly as it was.

    ``hide_marker``: a file kept in the staging folder until the swap and written into the old copy before it is
    removed (Foundry's cache scanner skips folders holding ``download.tmp``). ``durable``: fsync the files and the
    parent folder (survive a power cut, not only a killed process). ``label`` names the test kill points
    (:mod:`scripts.core.faults`): ``<label>:staged``, ``<label>:old-moved``, ``<label>:swapped``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = final.parent / f".{final.name}.staging-{token}"
    staging.mkdir()
    try:
        if hide_marker:
            (staging / hide_marker).touch()
        yield staging
        if durable:
            fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint(f"{label}:staged")
    if hide_marker:
        (staging / hide_marker).unlink()
    retired = _swap_into_place(staging, final, final.parent / f".{final.name}.old-{token}", label)
    if durable:
        fsync_dir(final.parent)
    if retired is not None and hide_marker:
        (retired / hide_marker).touch()
    checkpoint(f"{label}:swapped")
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _swap_into_place(staging: Path, final: Path, old: Path, label: str) -> Path | None:
    """Put ``staging`` at ``final``; return the folder now holding the previous copy (None: there was none). On a
    failure ``final`` is as it was and ``staging`` is removed."""
    try:
        if not final.exists() and not final.is_symlink():
            os.rename(staging, final)
            return None
        try:
            exchange(staging, final)
            return staging
        except OSError as exc:
            if exc.errno not in _NO_EXCHANGE:
                raise
            log.info("No RENAME_EXCHANGE for %s (%s): replacing it with two renames", final, exc)
        os.rename(final, old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint(f"{label}:old-moved")
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(old, final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return old


def recover_dir(final: Path) -> list[str]:
    """Finish what an interrupted :func:`atomic_dir` of ``final`` left behind; return what was done, one line each.

    When ``final`` is missing and an old copy was moved aside (a kill between the two renames where there is no
    exchange), the old copy is put back. Every other leftover (``.<name>.staging-*``, ``.<name>.old-*``) is
    removed. Call it only while holding the lock of ``final`` (:mod:`scripts.core.locks`): a running replacement's staging
    folder looks like a leftover."""
    parent = final.parent
    if not parent.is_dir():
        return []
    leftovers: dict[str, list[Path]] = {"staging": [], "old": []}
    for path in parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == final.name:
            leftovers[match["kind"]].append(path)
    notes = []
    if leftovers["old"] and not final.exists() and not final.is_symlink():
        newest = max(leftovers["old"], key=lambda p: p.stat().st_ctime_ns)
        os.rename(newest, final)
        leftovers["old"].remove(newest)
        notes.append(f"restored {final} from {newest.name} (a replacement was killed after moving the old copy aside)")
    for path in sorted(leftovers["staging"] + leftovers["old"]):
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path} (left by an interrupted run)")
    return notes


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
