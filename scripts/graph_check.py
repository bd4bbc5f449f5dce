"""Read a converted ONNX graph and check that it carries the quantization the recipe asked for.

Olive accepts option keys it then ignores, so the only proof that a setting took effect is the graph:
``MatMulNBits`` nodes carry ``bits``, ``block_size`` and ``accuracy_level`` attributes, and have a fourth
input (zero points) exactly when quantization is asymmetric.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from .errors import GraphCheckError
from .recipe import Conversion

QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized")


@dataclass(frozen=True)
class QuantNode:
    name: str
    op_type: str
    bits: int | None
    block_size: int | None
    accuracy_level: int | None
    has_zero_points: bool


@dataclass(frozen=True)
class GraphSummary:
    op_counts: dict[str, int]
    quant_nodes: tuple[QuantNode, ...]
    float_matmuls: int  # MatMul nodes left in float

    def describe(self) -> str:
        if not self.quant_nodes:
            return f"no quantized nodes; {self.float_matmuls} float MatMul"
        values = lambda attr: sorted({getattr(n, attr) for n in self.quant_nodes}, key=str)  # noqa: E731
        return (f"{len(self.quant_nodes)} quantized nodes (bits {values('bits')}, block_size {values('block_size')}, "
                f"accuracy_level {values('accuracy_level')}, zero points {values('has_zero_points')}); "
                f"{self.float_matmuls} float MatMul")


def summarise_graph(model_onnx: Path) -> GraphSummary:
    """Quantization facts of ``model.onnx`` (external weights are not loaded)."""
    model = onnx.load(str(model_onnx), load_external_data=False)
    nodes = []
    for node in model.graph.node:
        if node.op_type in QUANT_OPS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            # Both ops take zero points as their fourth input: (A, B, scales, zp) / (data, indices, scales, zp).
            has_zp = len(node.input) > 3 and bool(node.input[3])
            nodes.append(QuantNode(node.name, node.op_type, attrs.get("bits", 4), attrs.get("block_size"),
                                   attrs.get("accuracy_level"), has_zp))
    counts = Counter(n.op_type for n in model.graph.node)
    return GraphSummary(dict(counts), tuple(nodes), counts.get("MatMul", 0))


def verify_quantization(summary: GraphSummary, conversion: Conversion, where: str) -> None:
    """Raise :class:`GraphCheckError` when the graph does not have what ``conversion`` asked for."""
    problems: list[str] = []
    matmuls = [n for n in summary.quant_nodes if n.op_type == "MatMulNBits"]
    if conversion.precision == "fp32":
        if summary.quant_nodes:
            problems.append(f"fp32 was asked but the graph has {len(summary.quant_nodes)} quantized nodes")
    elif conversion.precision == "int4":
        q = conversion.quantization
        if not matmuls:
            problems.append("int4 was asked but the graph has no MatMulNBits node")
        checks = (("bits", 4), ("block_size", q.block_size), ("accuracy_level", q.accuracy_level),
                  ("has_zero_points", not q.symmetric))
        for attr, wanted in checks:
            wrong = [n for n in matmuls if getattr(n, attr) != wanted]
            if wrong:
                found = sorted({getattr(n, attr) for n in wrong}, key=str)
                label = "zero points (asymmetric)" if attr == "has_zero_points" else attr
                problems.append(f"{label}: asked {wanted}, found {found} in {len(wrong)} of {len(matmuls)} "
                                f"MatMulNBits nodes (e.g. {wrong[0].name})")
    if problems:
        raise GraphCheckError(f"{where}: the converted graph does not match the recipe:\n  - " + "\n  - ".join(problems)
                              + "\nOlive accepted an option it did not apply. Check conversion.quantization in the "
                              "recipe against `olive run` options, or report the mismatch.")
