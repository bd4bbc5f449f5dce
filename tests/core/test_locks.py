"""Tests for scripts/core/locks.py: folder locks held by real processes, waited for, refused, and taken over from a process
killed with SIGKILL. No sleeps: every hand-over is a line on a pipe."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from scripts.core.errors import BusyError
from scripts.core.locks import hold, held, lock_path, read_holder
from scripts.core.settings import REPO_ROOT

# Holds the lock of argv[1], says "locked", then: "release" waits for a line on stdin; "die" SIGKILLs itself;
# "fork-and-die" starts a child (which inherits nothing) and SIGKILLs itself.
HOLDER = r"""
import os, signal, subprocess, sys
from pathlib import Path
from scripts.core.locks import hold
with hold(Path(sys.argv[1]), "testing the lock"):
    if sys.argv[2] == "fork-and-die":
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        print(child.pid, flush=True)
    print("locked", flush=True)
    if sys.argv[2] != "release":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


def start_holder(folder: Path, mode: str = "release") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), mode], cwd=REPO_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc


def wait_locked(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "locked"


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0


def test_holder_record_is_written_while_held_and_erased_after(tmp_path):
    folder = tmp_path / "build" / "recipe"
    with hold(folder, "building recipe r") as lock:
        assert lock.path == lock_path(folder) == tmp_path / "build" / ".recipe.lock"
        record = read_holder(lock.path)
        assert record.pid == os.getpid() and record.purpose == "building recipe r"
        assert held(folder) and lock.stale is None and not lock.waited
    assert read_holder(lock.path) is None and not held(folder)
    assert lock.path.exists(), "the lock file is never deleted"


def test_hold_is_reentrant_within_a_process(tmp_path):
    with hold(tmp_path / "f", "outer"):
        with hold(tmp_path / "f", "inner", wait=False):
            assert read_holder(lock_path(tmp_path / "f")).purpose == "outer"
        assert held(tmp_path / "f")
    assert not held(tmp_path / "f")


def test_busy_lock_with_no_wait_is_refused_naming_the_holder(tmp_path):
    proc = start_holder(tmp_path / "f")
    try:
        wait_locked(proc)
        with pytest.raises(BusyError) as info:
            with hold(tmp_path / "f", "second", wait=False):
                pass
        message = str(info.value)
        assert f"{tmp_path / 'f'} is in use by pid {proc.pid} (`-c " in message
        assert "testing the lock, since " in message and "without --no-wait it waits" in message
        assert info.value.exit_code == 75
    finally:
        release(proc)


def test_busy_lock_is_waited_for_with_a_message(tmp_path):
    proc = start_holder(tmp_path / "f")
    wait_locked(proc)
    said, waiting, got = [], threading.Event(), []

    def second():
        with hold(tmp_path / "f", "second", announce=lambda m: (said.append(m), waiting.set())) as lock:
            got.append((lock, read_holder(lock.path).pid))

    thread = threading.Thread(target=second)
    thread.start()
    assert waiting.wait(timeout=60)
    assert said[0].startswith(f"waiting for pid {proc.pid} (")
    assert "Ctrl-C stops waiting; --no-wait refuses instead" in said[0]
    assert not got, "must not get the lock while the holder runs"
    release(proc)
    thread.join(timeout=60)
    lock, pid = got[0]
    assert lock.waited and lock.stale is None and pid == os.getpid()
    assert len(said) == 1, "a clean release leaves no stale record"


def test_lock_of_a_killed_holder_is_taken_over_and_reported(tmp_path):
    proc = start_holder(tmp_path / "f", "die")
    wait_locked(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert read_holder(lock_path(tmp_path / "f")).pid == proc.pid, "its record survives the kill"
    said = []
    with hold(tmp_path / "f", "next", wait=False, announce=said.append) as lock:
        assert lock.stale.pid == proc.pid and lock.stale.purpose == "testing the lock"
    assert said == [f"taking over the lock of {tmp_path / 'f'} from {lock.stale.describe()}, which ended without "
                    "releasing it (it was killed); checking what it left behind"]


def test_a_child_process_never_keeps_its_parents_lock(tmp_path):
    proc = start_holder(tmp_path / "f", "fork-and-die")
    child = psutil.Process(int(proc.stdout.readline()))
    try:
        wait_locked(proc)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert child.is_running()
        with hold(tmp_path / "f", "next", wait=False) as lock:  # free although the child still runs
            assert lock.stale.pid == proc.pid
    finally:
        child.kill()
