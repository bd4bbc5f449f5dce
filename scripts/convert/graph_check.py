"""Read a converted ONNX graph and check that it carries the quantization the recipe asked for.

Olive accepts option keys it then ignores, so the only proof that a setting took effect is the graph:
``MatMulNBits`` nodes carry ``bits``, ``block_size`` and ``accuracy_level`` attributes, and have a fourth
input (zero points) exactly when quantization is asymmetric.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from scripts.convert.gguf_blocks import UnsupportedBlocks, unpack_matmul_nbits
from scripts.convert.gguf_exact import node_projections
from scripts.convert.nibble_matmul import TAG as NIBBLE_TAG, nibble_input, read_nibbles
from scripts.convert.lm_head_prune import last_token_logits
from scripts.core.errors import GraphCheckError
from scripts.recipe.spec import Conversion
from scripts.recipe.precisions import get_precision, layer_kind

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
    initializer_bytes: dict[str, int] = field(default_factory=dict)  # by element type (FLOAT, UINT8, …)
    float_matmul_names: tuple[str, ...] = ()
    float_gathers: int = 0  # Gather nodes reading a float initializer table (an unquantized embedding)
    last_token_logits: bool | None = None  # logits output for the last position only (None: no logits output)

    def describe(self) -> str:
        if not self.quant_nodes:
            return f"no quantized nodes; {self.float_matmuls} float MatMul"
        values = lambda attr: sorted({getattr(n, attr) for n in self.quant_nodes}, key=str)  # noqa: E731
        text = (f"{len(self.quant_nodes)} quantized nodes (bits {values('bits')}, block_size {values('block_size')}, "
                f"accuracy_level {values('accuracy_level')}, zero points {values('has_zero_points')}); "
                f"{self.float_matmuls} float MatMul")
        gathers = [n for n in self.quant_nodes if n.op_type == "GatherBlockQuantized"]
        if gathers or self.float_gathers:
            text += f"; embedding {'quantized' if gathers else 'float'}"
        return text

    def weight_bytes_by_type(self) -> str:
        """``FLOAT 12.3 MB, UINT8 45.6 MB``: initializer bytes per element type, largest first."""
        return ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(self.initializer_bytes.items(), key=lambda kv: -kv[1]))


def is_side_term(node_name: str) -> bool:
    """A node of a term added beside a projection (a GGUF's block offsets, a LoRA branch), not a weight left float."""
    return any(tag in node_name for tag in ("/block_offsets/", "/blocksum/", ".lora_A/", ".lora_B/", "/branch_add",
                                            NIBBLE_TAG))


def summarise_graph(model_onnx: Path) -> GraphSummary:
    """Quantization facts of ``model.onnx`` (external weights are not loaded)."""
    model = onnx.load(str(model_onnx), load_external_data=False)
    nodes = []
    for node in model.graph.node:
        if node.op_type in QUANT_OPS and not is_side_term(node.name):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            # Both ops take zero points as their fourth input: (A, B, scales, zp) / (data, indices, scales, zp).
            has_zp = len(node.input) > 3 and bool(node.input[3])
            nodes.append(QuantNode(node.name, node.op_type, attrs.get("bits", 4), attrs.get("block_size"),
                                   attrs.get("accuracy_level"), has_zp))
    counts = Counter(n.op_type for n in model.graph.node if not is_side_term(n.name))
    inits = {i.name: i for i in model.graph.initializer}
    by_type: Counter = Counter()
    for init in inits.values():
        elems = 1
        for d in init.dims:
            elems *= d
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        by_type[onnx.TensorProto.DataType.Name(init.data_type)] += elems * itemsize
    float_matmuls = tuple(n.name for n in model.graph.node if n.op_type == "MatMul" and not is_side_term(n.name))
    float_gathers = sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits
                        and inits[n.input[0]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                        and len(inits[n.input[0]].dims) == 2)
    return GraphSummary(dict(counts), tuple(nodes), counts.get("MatMul", 0), dict(by_type), float_matmuls, float_gathers,
                        last_token_logits(model.graph))



def verify_quantization(summary: GraphSummary, conversion: Conversion, where: str) -> None:
    """Raise :class:`GraphCheckError` when the graph does not have what ``conversion`` asked for."""
    problems: list[str] = []
    matmuls = [n for n in summary.quant_nodes if n.op_type == "MatMulNBits"]
    bits = get_precision(conversion.precision).bits
    if bits is None:
        if summary.quant_nodes:
            problems.append(f"{conversion.precision} was asked but the graph has {len(summary.quant_nodes)} quantized "
                            "nodes")
    else:
        q = conversion.quantization
        if not matmuls:
            problems.append(f"{conversion.precision} was asked but the graph has no MatMulNBits node")
        eight = set(q.eight_bit) if bits == 4 else set()
        groups = {"": [n for n in matmuls if layer_kind(n.name) not in eight],
                  "8-bit groups: ": [n for n in matmuls if layer_kind(n.name) in eight]}
        for label_prefix, nodes in groups.items():
            is_eight = bool(label_prefix)
            checks = (("bits", 8 if is_eight else bits),
                      ("block_size", q.eight_bit_block_size if is_eight else q.block_size),
                      ("accuracy_level", q.accuracy_level),
                      ("has_zero_points", False if is_eight else not q.symmetric))
            for attr, wanted in checks:
                if attr == "accuracy_level" and wanted == 0:
                    wanted_values = (0, None)  # 0 = unset: the attribute may be absent
                elif attr == "bits" and q.algorithm.startswith("k_quant"):
                    wanted_values = (4, 8)  # k-quant mixes: the LM head and some layers are 8-bit by design
                else:
                    wanted_values = (wanted,)
                wrong = [n for n in nodes if getattr(n, attr) not in wanted_values]
                if wrong:
                    found = sorted({getattr(n, attr) for n in wrong}, key=str)
                    label = "zero points (asymmetric)" if attr == "has_zero_points" else attr
                    problems.append(f"{label_prefix}{label}: asked {wanted}, found {found} in {len(wrong)} of "
                                    f"{len(nodes)} MatMulNBits nodes (e.g. {wrong[0].name})")
        missing = sorted(eight - {layer_kind(n.name) for n in matmuls})
        if missing:
            problems.append(f"eight_bit: asked {', '.join(missing)} at 8 bits, found no such quantized node")
        problems += _embedding_and_head_problems(summary, q, bits)
    problems += _option_problems(summary, conversion)
    if problems:
        raise GraphCheckError(f"{where}: the converted graph does not match the recipe:\n  - " + "\n  - ".join(problems)
                              + "\nOlive accepted an option it did not apply. Check conversion.quantization in the "
                              "recipe against `olive run` options, or report the mismatch.")


def _option_problems(summary: GraphSummary, conversion: Conversion) -> list[str]:
    if summary.last_token_logits is not None and summary.last_token_logits != conversion.prune_lm_head:
        return ["prune_lm_head: asked " + ("logits for the last position only, found them for every position"
                                           if conversion.prune_lm_head else
                                           "logits for every position, found them for the last one only")]
    return []


def verify_options(summary: GraphSummary, conversion: Conversion, where: str) -> None:
    """The graph options (``prune_lm_head``) of a graph whose weights were carried, not quantized by the recipe's
    settings (their own proof: :func:`check_exact`)."""
    problems = _option_problems(summary, conversion)
    if problems:
        raise GraphCheckError(f"{where}: the converted graph does not match the recipe:\n  - " + "\n  - ".join(problems))


def _embedding_and_head_problems(summary: GraphSummary, q, bits: int) -> list[str]:
    """``quantization.embeddings`` → a GatherBlockQuantized of the asked bits/block size and no float table left;
    ``quantization.lm_head`` → no float LM-head MatMul left (or exactly that one when it is kept in float)."""
    problems = []
    gathers = [n for n in summary.quant_nodes if n.op_type == "GatherBlockQuantized"]
    if q.embeddings:
        if not gathers:
            problems.append("embeddings: asked quantized, found no GatherBlockQuantized node"
                            + (f" ({summary.float_gathers} float Gather table)" if summary.float_gathers else ""))
        for n in gathers:
            if n.bits != bits or n.block_size != q.block_size:
                problems.append(f"embeddings: asked {bits}-bit block {q.block_size}, found {n.bits}-bit block "
                                f"{n.block_size} ({n.name})")
    elif gathers:
        problems.append(f"embeddings: asked float, found {len(gathers)} GatherBlockQuantized node(s)")
    head_float = [name for name in summary.float_matmul_names if "lm_head" in name]
    others = [name for name in summary.float_matmul_names if "lm_head" not in name]
    if q.lm_head and head_float:
        problems.append(f"lm_head: asked quantized, found float MatMul {head_float[0]}")
    if not q.lm_head and summary.float_matmul_names and not head_float:
        problems.append("lm_head: asked float, found no float LM-head MatMul")
    if others:
        problems.append(f"{len(others)} MatMul node(s) left in float (e.g. {others[0]})")
    return problems


# ----- a GGUF carried exactly (conversion.gguf "exact", scripts/convert/gguf_exact.py) --------------------------------

def _side_offsets(model: onnx.ModelProto, node, inits: dict) -> np.ndarray | None:
    """The block-offset matrix M ``[K/block, N]`` added to ``node``'s output (through a Cast when stored as float16)."""
    name = f"{node.input[1].rsplit('.weight', 1)[0]}.block_offsets"
    return numpy_helper.to_array(inits[name]).astype(np.float32) if name in inits else None


def graph_weights(model: onnx.ModelProto, tied: bool) -> dict[str, np.ndarray | str]:
    """Per GGUF-backed ``MatMulNBits`` node, the float32 ``[N, K]`` weight the graph computes with:
    ``scale·(code − zero point)`` plus its block offsets; 8-bit codes read as nibbles
    (:mod:`scripts.convert.nibble_matmul`) are read back as 8-bit codes. A string says why a node cannot be read."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    arr = lambda name: numpy_helper.to_array(inits[name]) if name else None  # noqa: E731
    out: dict[str, np.ndarray | str] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node_projections(node.name, tied) is None:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        zp = arr(node.input[3]) if len(node.input) > 3 else None
        offsets = _side_offsets(model, node, inits)
        try:
            nibbles = nibble_input(node, producers, inits)
            if nibbles is None:
                blocks = unpack_matmul_nbits(arr(node.input[1]), arr(node.input[2]), zp, offsets, int(a["bits"]),
                                             int(a["block_size"]), int(a["K"]))
            else:
                blocks = read_nibbles(arr(node.input[1]), arr(node.input[2]), zp, offsets, nibbles[1], int(a["K"]),
                                      int(a["block_size"]))
        except UnsupportedBlocks as exc:
            out[node.name] = str(exc)
            continue
        out[node.name] = blocks.dequantize()
    return out


def verify_exact(model: onnx.ModelProto, weights: dict, query_factor: float = 1.0) -> list[str]:
    """Every GGUF matrix (``weights``: :func:`scripts.convert.gguf_exact.read_exact_weights`) against what the graph
    computes with, bit for bit; the query rows divided back by a folded attention scale ``query_factor`` (a power of
    two: still exact). One line per weight that differs; empty when all are exact. A tied embedding must read the LM
    head's codes and scales (one copy)."""
    tied = "lm_head" not in weights
    problems, computed = [], graph_weights(model, tied)
    for name, w in computed.items():
        keys = node_projections(name, tied)
        if isinstance(w, str):
            problems.append(f"{name} ({'+'.join(keys)}): {w}")
            continue
        expected = np.concatenate([weights[k].dequantize() for k in keys], axis=0)
        if query_factor != 1.0 and keys[0].endswith("q_proj"):
            rows = weights[keys[0]].shape[0]
            w = w.copy()
            w[:rows] /= np.float32(query_factor)
        if w.shape != expected.shape:
            problems.append(f"{name}: shape {list(w.shape)}, GGUF {list(expected.shape)}")
        elif not np.array_equal(w, expected):  # float equality: identical values (a zero's sign aside)
            bad = int(np.sum(w != expected))
            problems.append(f"{name} ({'+'.join(keys)}): {bad} of {w.size} weights differ from the GGUF's dequantized "
                            f"values (max |Δ| {float(np.max(np.abs(w - expected))):.3g})")
    if not computed:
        problems.append("no MatMulNBits node stands for a GGUF tensor")
    lookups = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")), None)
    if tied and head is not None:
        producers = {o: n for n in model.graph.node for o in n.output}
        for n in lookups:
            source = producers.get(n.input[0])
            data = source.input[0] if source is not None and source.op_type == "Reshape" else n.input[0]
            if data != head.input[1] or n.input[2] != head.input[2]:
                problems.append(f"{n.name}: the tied embedding does not read the LM head's codes and scales")
    return problems


def check_exact(model_onnx: Path, weights: dict, query_factor: float, where: str) -> None:
    """:func:`verify_exact` on ``model_onnx``; :class:`GraphCheckError` naming every weight that is not exact."""
    problems = verify_exact(onnx.load(str(model_onnx)), weights, query_factor)
    if problems:
        raise GraphCheckError(f"{where}: the deployed weights are not the GGUF's:\n  - " + "\n  - ".join(problems)
                              + "\nReport this with the GGUF's tensor types (`invoke tune` lists them), or set "
                              "conversion.gguf to \"requantize\".")
