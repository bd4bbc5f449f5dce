"""Test hooks for fault injection: named points in the code where a test can make this process die or wait.

``checkpoint("install:swapped")`` does nothing unless a test asked for that point through the environment:

- ``SLMOPS_TEST_KILL_AT=<point>``: the process sends itself SIGKILL there (no cleanup, no ``finally``, no atexit:
  what a power cut of the process, an OOM kill or ``kill -9`` does).
- ``SLMOPS_TEST_PAUSE_AT=<point>`` with ``SLMOPS_TEST_PAUSE_FIFO=<path of a named pipe>``: the process writes
  ``slmops-test: paused at <point> (pid N)`` to stderr and blocks until the test opens the pipe for writing and closes
  it (no sleeps: the test reads the line, does its thing, then releases).
- ``SLMOPS_TEST_NO_EXCHANGE=1``: :func:`scripts.core.fileops.exchange` fails with EINVAL, as on a filesystem without
  ``RENAME_EXCHANGE``, so the two-rename replacement and its recovery can be tested here.

The points (``<label>`` is the folder being replaced: ``install``, ``convert``, ``package``, ``source``, ``merge``;
``version``: the kept copy of a version, ``rollback``: the installed folder during `invoke rollback`):

| point | where |
|---|---|
| ``pipeline:locked`` | a pipeline holds its recipe lock and has recovered its build folders; no step ran yet |
| ``step:<name>:start`` / ``step:<name>:ran`` | a step is about to run / has run but its stamp is not written yet |
| ``convert:olive-running`` | Olive (a child process) has started converting |
| ``convert:olive-done`` | Olive has written the converted model into the staging folder |
| ``<label>:staged`` | the new folder is complete beside the old one, nothing swapped yet |
| ``<label>:swapped`` | the new folder is in place, the old one not yet removed |
| ``<label>:old-moved`` | (no ``RENAME_EXCHANGE``) the old folder is renamed away, the new one not yet in place |
| ``rollback:start`` | `invoke rollback` has verified the kept version and holds the lock; nothing copied yet |
| ``chat:reply`` | ``invoke run`` has printed the first piece of a reply |
"""
from __future__ import annotations

import os
import select
import signal

KILL_ENV = "SLMOPS_TEST_KILL_AT"
PAUSE_ENV = "SLMOPS_TEST_PAUSE_AT"
PAUSE_FIFO_ENV = "SLMOPS_TEST_PAUSE_FIFO"
NO_EXCHANGE_ENV = "SLMOPS_TEST_NO_EXCHANGE"


def exchange_disabled() -> bool:
    """Whether a test asked to behave as on a filesystem without ``RENAME_EXCHANGE``."""
    return os.environ.get(NO_EXCHANGE_ENV) == "1"


def checkpoint(point: str) -> None:
    """Die or pause here when a test asked for ``point`` (see the module docstring); otherwise return at once."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == point:
        os.write(2, f"slmops-test: paused at {point} (pid {os.getpid()})\n".encode())
        _wait_for_release(os.environ[PAUSE_FIFO_ENV])


def _wait_for_release(fifo: str) -> None:
    """Block until a writer has opened ``fifo`` and closed it. Polls in short slices instead of blocking in one system
    call, so a signal meant for this process (Ctrl-C in a test) is acted on even when the kernel delivered it to
    another thread (the Foundry runtime's native threads), which would not interrupt a blocking ``open``."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            events = poller.poll(200)  # ms; Python runs pending signal handlers between slices
            if any(event & select.POLLHUP for _, event in events):
                return
            if events:
                os.read(fd, 4096)
    finally:
        os.close(fd)
