"""The recipe's ``runtime`` block: how ONNX Runtime runs the deployed model (``genai_config.json``
``model.decoder.session_options``), for Foundry Local and raw ONNX Runtime GenAI alike.

``intra_op_threads``: the ONNX Runtime intra-op thread pool size, ``"physical"`` (the physical cores of the machine
that runs the package step; the default) or a whole number. ONNX Runtime GenAI's own default did not use both cores
of a 2-vCPU machine (FIELD-NOTES.md, "Threads"); with the physical core count written, a 256-token prefill of a
0.5B INT4 model went from ~1.6 s to ~0.9 s and decode from ~50 to 80–90 tok/s on a quiet machine.

``prefill_chunk``: ONNX Runtime GenAI's ``search.chunk_size``: a prompt longer than this is run through the model in
chunks of this many tokens (the KV cache fills chunk by chunk; the logits are the same). The activations of one chunk
instead of the whole prompt: on the 0.5B shape at an 8,192-token prompt, peak memory 1,621 → 871 MB in raw GenAI and
1,042 → 835 MB through Foundry Local (which chunks by 2,048 when the file says nothing), prefill time unchanged within
the noise (docs/performance.md). 0 writes nothing (the runtime's default).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from scripts.core.schema import defaults_from, Field, Obj

PHYSICAL = "physical"
MAX_THREADS = 256


def _threads_check(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value == PHYSICAL else f"{value!r} is not allowed; use {PHYSICAL!r} or a whole number"
    return None if 1 <= value <= MAX_THREADS else f"{value} is out of range; allowed: 1 to {MAX_THREADS}"


SCHEMA = Obj({
    "intra_op_threads": Field((str, int), default=PHYSICAL, check=_threads_check,
                              help="ONNX Runtime intra-op threads written to genai_config.json session_options: "
                                   f"{PHYSICAL!r} (physical cores where the package step runs) or a number"),
    "prefill_chunk": Field(int, default=512, check=lambda v: None if v == 0 or 16 <= v <= 65536 else
                           f"{v} is out of range; allowed: 0 (the runtime's default) or 16 to 65536",
                           help="prompt tokens per prefill pass (genai_config.json search.chunk_size): a long "
                                "prompt's activations for one chunk at a time, not the whole prompt; 0: the "
                                "runtime's default (Foundry Local: 2,048; raw GenAI: no chunking)"),
})


def physical_cores() -> int:
    """Physical CPU cores of this machine (logical CPUs when psutil cannot tell; at least 1)."""
    import psutil
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


@dataclass(frozen=True)
@defaults_from(SCHEMA)
class RuntimeSpec:
    """``runtime`` keys of a recipe, as written (``intra_op_threads`` may still be ``"physical"``)."""

    intra_op_threads: str | int
    prefill_chunk: int

    def threads(self) -> int:
        """The thread count to write: the number, or this machine's physical cores."""
        return physical_cores() if self.intra_op_threads == PHYSICAL else int(self.intra_op_threads)

    def session_options(self) -> dict[str, Any]:
        """The ``model.decoder.session_options`` entries this spec sets."""
        return {"intra_op_num_threads": self.threads()}

    def search_options(self) -> dict[str, Any]:
        """The ``search`` entries this spec sets (``chunk_size``, when not left to the runtime)."""
        return {"chunk_size": self.prefill_chunk} if self.prefill_chunk else {}
