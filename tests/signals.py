"""Test helper: children that a test sends Ctrl-C (SIGINT) to must not inherit an *ignored* SIGINT.

A shell starts background jobs (`cmd &`, `nohup … &`) with SIGINT ignored, their children inherit that, and Python
started with SIGINT ignored installs no KeyboardInterrupt handler: a suite run from such a job would hang in the
Ctrl-C tests (seen: `invoke run` paused forever with SigIgn holding SIGINT). Pass ``preexec_fn=ctrl_c_reaches_it``."""
from __future__ import annotations

import signal


def ctrl_c_reaches_it() -> None:
    """In the forked child, before exec: SIGINT back to its default, so the Python child installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
