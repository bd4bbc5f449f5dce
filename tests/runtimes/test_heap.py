"""Tests for scripts/runtimes/heap.py: with one malloc arena, a large buffer freed by one thread is reused by the next,
whichever thread asks; without it glibc keeps one per thread heap (what made a Foundry Local soak grow)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.core.settings import REPO_ROOT

CHILD = r"""
import ctypes, json, sys, threading
from scripts.runtimes.heap import one_heap_for_all_threads
fixed = one_heap_for_all_threads() if sys.argv[1] == "fixed" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 8 << 20

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def work():
    for _ in range(3):
        p = libc.malloc(SIZE)
        ctypes.memset(p, 1, SIZE)
        libc.free(p)

before = rss()
for _ in range(2):
    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
print(json.dumps({"fixed": fixed, "growth": rss() - before}))
"""


def growth(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_one_arena_keeps_one_buffer_not_one_per_thread():
    fixed, default = growth("fixed"), growth("default")
    assert fixed["fixed"] is True
    assert fixed["growth"] <= 9 << 20, fixed  # at most the one 8 MB buffer stays for reuse
    assert default["growth"] >= 16 << 20, default  # without it, several threads' heaps each keep one
