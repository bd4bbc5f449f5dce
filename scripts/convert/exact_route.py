"""What the convert step does around Olive when weights are carried rather than re-quantized: a quantized GGUF's
blocks exactly (recipe ``conversion.gguf: "exact"``, :mod:`scripts.convert.gguf_exact`) and/or a LoRA adapter kept as
its own branch (``conversion.adapter: "branch"``, :mod:`scripts.convert.lora_branch`).

Order: Olive builds the structure (:func:`builder_settings`), :func:`carry` replaces the weights and adds the branches,
then the attention scale is folded (it scales the query's offset and branch terms too, exactly: a power of two), and
:func:`check_carried` proves every GGUF weight is deployed bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from scripts.convert.gguf_blocks import supported_types
from scripts.convert.gguf_exact import head_size, read_exact_weights, rewrite_folder
from scripts.convert.graph_check import check_exact
from scripts.convert.lora_branch import branch_folder
from scripts.convert.olive import exact_base
from scripts.recipe.spec import Conversion
from scripts.sources.gguf import weight_types


@dataclass(frozen=True)
class Carried:
    """What is carried into the graph: the GGUF whose blocks are kept (None: the builder quantizes) and the adapter kept
    as a branch (None: none, or merged before converting)."""

    gguf: Path | None = None
    adapter: Path | None = None
    adapter_bits: int = 32

    @property
    def any(self) -> bool:
        return self.gguf is not None or self.adapter is not None


def has_blocks(gguf: Path) -> bool:
    """Whether every matrix of ``gguf`` is stored in a block type carried exactly (a float GGUF has no blocks to keep:
    it converts like any FP32 model). Before the import step has kept the file, True: the convert step decides."""
    if not gguf.is_file():
        return True
    types = set(weight_types(gguf))
    return bool(types) and types <= set(supported_types())


def builder_settings(conversion: Conversion, carried: Carried) -> tuple[Conversion, bool]:
    """The conversion Olive builds with, and whether the embedding shares the LM head's table."""
    return (exact_base(conversion), True) if carried.gguf else (conversion, False)


def carry(folder: Path, conversion: Conversion, carried: Carried) -> str | None:
    """Rewrite the built graph in ``folder``; one line saying what was carried, None when nothing is."""
    level = conversion.quantization.accuracy_level
    if carried.gguf:
        report = rewrite_folder(folder, carried.gguf, level, carried.adapter, carried.adapter_bits)
        return report.describe()
    if carried.adapter:
        count = branch_folder(folder, carried.adapter, carried.adapter_bits, level)
        return f"LoRA branch ({carried.adapter_bits}-bit) beside {count} projections"
    return None


def check_carried(folder: Path, carried: Carried, folded: int, where: str) -> None:
    """Every GGUF weight in the graph equals the GGUF's dequantized value (query rows by the folded scale)."""
    if carried.gguf:
        factor = 1.0 / math.sqrt(head_size(folder)) if folded else 1.0
        check_exact(Path(folder) / "model.onnx", read_exact_weights(carried.gguf), factor, where)
