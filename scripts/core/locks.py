"""Locks on the folders a command writes: a recipe's build folder, a built model source, a Foundry cache target.

The lock of folder ``X`` is the file ``.X.lock`` beside it (or a file the caller names), locked with ``flock(2)``
(``LOCK_EX``). The kernel
releases an ``flock`` when its holder dies, however it dies, so a lock is never held by a dead process: a lock left
by a killed command is simply free. The file also holds a record of its holder (pid, command line, start time),
written after locking and erased before unlocking; finding a record when taking a free lock therefore means the
previous holder was killed, and :func:`hold` says so (its recovery is then the caller's: see
:func:`scripts.core.fileops.recover_dir`). A busy lock's record names who to wait for.

Locks are re-entrant within a process (``compare`` runs a pipeline per precision under its recipe's lock). The lock
file is never deleted (deleting an ``flock`` file lets two processes lock two different files). The file descriptor
is not inherited by child processes, so a worker never holds its parent's lock. Order, to rule out deadlocks: a
recipe's build folder, then its model source, then its cache target.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from scripts.core.errors import BusyError, StorageError

log = logging.getLogger(__name__)
Announce = Callable[[str], None]

# lock file (resolved) → [file descriptor, depth], for re-entry within this process
_held: dict[str, list[int]] = {}


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock."""

    pid: int
    command: str
    purpose: str
    since: float
    host: str

    @classmethod
    def me(cls, purpose: str) -> "Holder":
        program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        name = program.parent.name if program.name == "__main__.py" else program.name  # python -m invoke → invoke
        return cls(os.getpid(), shlex.join([name, *sys.argv[1:]]), purpose, time.time(), socket.gethostname())

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # cannot tell for another machine (a shared file system): assume it runs
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} (`{self.command}`, {self.purpose}, since {when})"


@dataclass(frozen=True)
class Lock:
    """A held lock: ``stale`` is the record of a previous holder that died holding it, ``waited`` whether we
    had to wait for another holder."""

    folder: Path
    path: Path
    stale: Holder | None = None
    waited: bool = False


def read_holder(path: Path) -> Holder | None:
    """The holder record in a lock file (None: free and released cleanly, or unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    return _parse(text)


def _parse(text: str) -> Holder | None:
    try:
        return Holder(**json.loads(text)) if text.strip() else None
    except (ValueError, TypeError):
        return None


def _read_fd(fd: int) -> Holder | None:
    return _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))


def _write_fd(fd: int, holder: Holder | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)


@contextlib.contextmanager
def hold(folder: Path, purpose: str, *, wait: bool = True, announce: Announce = log.info,
         lock_file: Path | None = None, read_only: bool = False) -> Iterator[Lock]:
    """Hold the lock of ``folder`` for the ``with`` block. Busy: with ``wait`` say who holds it and wait (Ctrl-C
    stops waiting), else raise :class:`BusyError` naming the holder. ``purpose`` says what the folder is used for
    (shown to whoever has to wait for us). ``lock_file``: where the lock lives when not beside the folder.

    The lock file cannot be created (a read-only or full filesystem): a ``read_only`` user (one that only reads the
    folder: ``check``, ``run``) goes on without the lock and says so; any other gets a :class:`StorageError` naming
    the lock file and the fix. A lock whose holder record cannot be written (a full filesystem) is held without it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock
        log.warning("No file locking on this platform: concurrent commands on %s are not prevented.", folder)
        yield Lock(Path(folder), lock_path(folder))
        return
    path = Path(lock_file) if lock_file else lock_path(folder)
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield Lock(Path(folder), path)
        finally:
            _held[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if not read_only:
            raise StorageError(unwritable(path, exc, "the lock file of " + str(folder))) from None
        announce(f"note: no lock taken on {folder}: its lock file {path} cannot be created ({exc.strerror or exc}); "
                 "reading it without one (an install at the same time could change it under this command)")
        yield Lock(Path(folder), path)
        return
    try:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            who = "another process" if holder is None else holder.describe() if holder.alive() else (
                f"a child process of {holder.describe()}, which has ended")
            if not wait:
                raise BusyError(f"{folder} is in use by {who}. Run the command again when that one has finished "
                                "(without --no-wait it waits), or stop that process.") from None
            announce(f"waiting for {who}, which is using {folder} (Ctrl-C stops waiting; --no-wait refuses "
                     "instead)…")
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        previous = _read_fd(fd)
        if previous is not None:
            announce(f"taking over the lock of {folder} from {previous.describe()}, which ended without releasing it "
                     "(it was killed); checking what it left behind")
        try:
            _write_fd(fd, Holder.me(purpose))
        except OSError as exc:  # ENOSPC, EDQUOT: the lock is held; only who holds it cannot be recorded
            announce(f"note: holding the lock {path} without recording who holds it ({exc.strerror or exc}); a "
                     "command waiting for it will not be able to name this one. Free space on that filesystem.")
        _held[key] = [fd, 1]
        try:
            yield Lock(Path(folder), path, previous, waited)
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                _write_fd(fd, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def unwritable(path: Path, exc: OSError, what: str) -> str:
    """One-screen message for a path that cannot be written: what, why, and the fix for that errno."""
    import errno
    other = "mount it read-write, or set SLMOPS_FOUNDRY_CACHE / SLMOPS_BUILD_DIR to another folder"
    fixes = {errno.EROFS: f"The filesystem is read-only: `check` and `run` still work, installing does not ({other})",
             errno.ENOSPC: "The filesystem is full: free space on it (`invoke doctor` shows how much is free)",
             errno.EDQUOT: "The disk quota is used up: free space or raise the quota",
             errno.EACCES: f"This user may not write there: fix the permissions ({other})",
             errno.EPERM: f"This user may not write there: fix the permissions ({other})",
             errno.ENOTDIR: "A file stands where a folder is needed: move it away or choose another folder",
             errno.EEXIST: "A file stands where a folder is needed: move it away or choose another folder"}
    return (f"Cannot write {what} ({path}): {exc.strerror or exc}. "
            f"{fixes.get(exc.errno, 'Check that folder with `invoke doctor`')}.")


def held(folder: Path) -> bool:
    """Whether this process holds the lock of ``folder``."""
    path = lock_path(folder)
    return path.exists() and str(path.resolve()) in _held
