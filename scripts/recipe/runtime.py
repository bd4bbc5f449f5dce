"""The recipe's ``runtime`` block: how ONNX Runtime runs the deployed model (``genai_config.json``
``model.decoder.session_options``), for Foundry Local and raw ONNX Runtime GenAI alike.

``intra_op_threads``: the ONNX Runtime intra-op thread pool size, ``"physical"`` (the physical cores of the machine
that runs the package step; the default) or a whole number. ONNX Runtime GenAI's own default did not use both cores
of a 2-vCPU machine (FIELD-NOTES.md, "Threads"); with the physical core count written, a 256-token prefill of a
0.5B INT4 model went from ~1.6 s to ~0.9 s and decode from ~50 to 80–90 tok/s on a quiet machine.
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

    def threads(self) -> int:
        """The thread count to write: the number, or this machine's physical cores."""
        return physical_cores() if self.intra_op_threads == PHYSICAL else int(self.intra_op_threads)

    def session_options(self) -> dict[str, Any]:
        """The ``model.decoder.session_options`` entries this spec sets."""
        return {"intra_op_num_threads": self.threads()}
