"""Keep the runtime's large per-request buffers from piling up in per-thread C heaps (Linux, glibc).

ONNX Runtime GenAI allocates a request's KV cache for the model's whole ``search.max_length`` (SmolLM2-135M at its
8192 context: 30 layers × K and V × 3 heads × 8192 × 64 × 4 B = 377 MB) and frees it when the request ends. glibc
gives each thread that allocates its own heap ("arena", up to 8 per core) and an arena keeps what it once held for
reuse by *its* threads. Foundry Local serves requests from a pool of threads, so every new thread that serves a
request adds one retained KV buffer: measured through Foundry Local on SmolLM2, RSS 676 MB after the first request →
1,865 MB after 500 on a loaded machine, in ~390 MB steps (more threads join when the machine is busy).

One arena for the process (``mallopt(M_ARENA_MAX, 1)``, what ``MALLOC_ARENA_MAX=1`` does) lets the next request
reuse the buffer the last one freed, whichever thread serves it: with three CPU hogs beside it, a 300-request soak
stayed at 664 → 692 MB (+4.2 %) instead of 667 → 1,473 MB, at the same speed (150 s vs 144 s, noise). Rejected: a
fixed mmap threshold (``M_MMAP_THRESHOLD`` 1 MiB) kept RSS flat at ~296 MB between requests but made every request
fault its KV pages in afresh: +80 % time for 24-token answers.

Called before a runtime loads a model, in every process of ours that runs one; only arenas created afterwards are
affected, which is every runtime thread. Users embedding the runtime in their own process set ``MALLOC_ARENA_MAX=1``.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc <malloc.h>


def one_heap_for_all_threads() -> bool:
    """Limit glibc to one malloc arena in this process from now on; False where that does not apply (not Linux,
    not glibc) or glibc refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library: no mallopt
        return False
    ok = bool(mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(1)))
    log.debug("mallopt(M_ARENA_MAX, 1) → %s", ok)
    return ok
