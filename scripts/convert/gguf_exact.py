"""Carry a GGUF's quantized blocks into a GenAI-builder graph exactly (recipe ``conversion.gguf: "exact"``).

The builder graph (INT4, block 32, round-to-nearest, embedding shared with the LM head) gives the structure: one
``MatMulNBits`` per projection (q/k/v packed as ``qkv_proj``), ``/lm_head/MatMul`` and the embedding
``GatherBlockQuantized`` reading the LM head's codes. Every node that stands for a GGUF tensor gets the tensor's own
codes, scales and zero points (:mod:`scripts.convert.gguf_blocks`); a float-offset grid (Q4_1, Q5_1, Q4_K, Q5_K) adds its
offset beside the integer kernel: ``y = MatMulNBits(x) + blocksums(x)·M`` (ONNX Runtime keeps its fast integer kernel;
float zero points would not). 8-bit codes (Q8_0, Q5_0/Q5_1, Q5_K, Q6_K, and packed nodes holding any of them) are
read by the 4-bit kernel as nibbles (:mod:`scripts.convert.nibble_matmul`) unless the level is 4 (int8 activations,
where the 8-bit kernel is fast): ONNX Runtime has no fast FP32 kernel for 8-bit weights. Every node runs at the
recipe's ``accuracy_level``. A tied embedding reads the LM head's codes and scales: one copy. A LoRA adapter kept as a
branch (:mod:`scripts.convert.lora_branch`) is added beside the same nodes.

Rows of ``attn_q``/``attn_k`` are stored permuted by llama.cpp (``convert_hf_to_gguf.py`` ``permute``); they are put
back in Hugging Face order (whole rows move; blocks run along K). :func:`scripts.convert.graph_check.verify_exact`
reads the rewritten graph back and compares every weight with the ``gguf`` package's dequantized values, bit for bit.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from scripts.convert.gguf_blocks import (ExactBlocks, UnsupportedBlocks, concat_rows, from_gguf, matmul_nbits_arrays,
                                         row_order_unpermute)
from scripts.convert.lora_branch import (LAYER_NODE, PACKED, GraphEdit, LowRank, branch_terms, layout_from_shapes,
                                         node_branches, node_key, read_adapter)
from scripts.convert.nibble_matmul import carried_as_nibbles, interleave, nibble_arrays
from scripts.core.errors import ConversionError

log = logging.getLogger(__name__)

#: llama.cpp tensor name (after ``blk.N.``) → the Hugging Face projection it stands for.
GGUF_PROJECTIONS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
#: Architectures whose attn_q/attn_k rows llama.cpp's converter permutes.
PERMUTED_QK = ("llama",)
EMBED, LM_HEAD = "embed_tokens", "lm_head"


class ExactGraphError(ConversionError):
    """The graph and the GGUF do not fit together (a missing node or tensor, a shape that differs)."""


def read_exact_weights(path: Path) -> dict[str, ExactBlocks]:
    """The GGUF's matrices as :class:`ExactBlocks`, keyed ``layers.N.q_proj`` …, ``embed_tokens`` and ``lm_head``
    (only when untied), rows in Hugging Face order. Raises :class:`UnsupportedBlocks` for a type with no exact form."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path), "r")
    arch = reader.fields["general.architecture"].contents()
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_kv = int(kv.contents()) if kv is not None else n_head
    out: dict[str, ExactBlocks] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])  # GGUF lists ne0 (the contiguous one: K) first
        try:
            blocks = from_gguf(t.tensor_type.name, np.asarray(t.data), rows, cols)
        except UnsupportedBlocks as exc:
            raise UnsupportedBlocks(f"{path.name}: {t.name}: {exc}") from None
        name = t.name.removesuffix(".weight")
        if name in ("token_embd", "output"):
            out[EMBED if name == "token_embd" else LM_HEAD] = blocks
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
        proj = GGUF_PROJECTIONS.get(m.group(2)) if m else None
        if proj is None:
            raise ExactGraphError(f"{path.name}: tensor {t.name} has no Hugging Face projection known here; set "
                                  "conversion.gguf to \"requantize\".")
        if proj in ("q_proj", "k_proj") and arch in PERMUTED_QK:
            blocks = blocks.take_rows(row_order_unpermute(rows, n_head if proj == "q_proj" else n_kv))
        out[f"layers.{m.group(1)}.{proj}"] = blocks
    return out


def node_projections(node_name: str, tied: bool) -> list[str] | None:
    """The weight keys a builder ``MatMulNBits`` node computes, in its row order; None for other nodes."""
    if node_name.startswith("/lm_head/MatMul"):
        return [EMBED if tied else LM_HEAD]
    m = LAYER_NODE.match(node_name)
    if not m:
        return None
    layer, proj = m.groups()
    return [f"layers.{layer}.{p}" for p in PACKED.get(proj, (proj,))]


@dataclass
class ExactReport:
    nodes: int = 0
    offset_nodes: int = 0
    nibble_nodes: int = 0
    branch_nodes: int = 0
    types: dict = field(default_factory=dict)

    def describe(self) -> str:
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(self.types.items()))
        text = f"{self.nodes} weights carried exactly from the GGUF ({types}); block-offset term on {self.offset_nodes}"
        text += f"; 8-bit codes as 4-bit nibbles on {self.nibble_nodes}" if self.nibble_nodes else ""
        return text + (f"; LoRA branch on {self.branch_nodes}" if self.branch_nodes else "")


def _offsets_input(edit: GraphEdit, name: str, offsets: np.ndarray, half_ok: bool) -> str:
    """The offset matrix as a graph value: float16 when that is exact (Q4_1's m is a float16; K-quant offsets
    dmin·mn often are not) and cast once (ONNX Runtime folds the Cast at load), else float32. Offsets feeding the
    query stay float32, so that folding the attention scale (a power of two) into them stays exact."""
    half = offsets.astype(np.float16)
    if not half_ok or not np.array_equal(half.astype(np.float32), offsets):
        return edit.put(name, offsets)
    return edit.node("Cast", [edit.put(name, half)], f"{name}/Cast", to=onnx.TensorProto.FLOAT)


def _offset_term(edit: GraphEdit, x: str, k: int, block: int, offsets: np.ndarray, base: str, sums: dict) -> str:
    """``blocksums(x)·M``; the block sums (Reshape + ReduceSum) shared by nodes reading the same input."""
    if (x, block) not in sums:
        shape = edit.put(f"{base}.blocksum_shape", np.array([0, 0, k // block, block], np.int64))
        r = edit.node("Reshape", [x, shape], f"{base}/blocksum/Reshape")
        axes = edit.put(f"{base}.blocksum_axes", np.array([-1], np.int64))
        sums[(x, block)] = edit.node("ReduceSum", [r, axes], f"{base}/blocksum/ReduceSum", keepdims=0)
    m = _offsets_input(edit, f"{base}.block_offsets", offsets, half_ok="/attn/" not in base or "o_proj" in base)
    return edit.node("MatMul", [sums[(x, block)], m], f"{base}/block_offsets/MatMul")


def _rewrite_matmul(edit: GraphEdit, node, blocks: ExactBlocks, accuracy_level: int, branch: LowRank | None,
                    branch_bits: int, caches: dict, report: ExactReport) -> None:
    """Give ``node`` the exact blocks (8-bit ones in the nibble form: :mod:`scripts.convert.nibble_matmul`), its offset
    term and branch, all at ``accuracy_level``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = int(attrs["K"]), int(attrs["N"])
    if blocks.shape != (n, k):
        raise ExactGraphError(f"{node.name}: the graph computes N={n} × K={k}, the GGUF holds {list(blocks.shape)}")
    x, base = node.input[0], node.input[1].rsplit(".weight", 1)[0]
    nibbles = carried_as_nibbles(blocks, accuracy_level)
    if nibbles:
        arrays = nibble_arrays(blocks)
        a = interleave(edit, x, k, base, caches.setdefault("nibble", {}))
        zp_name = f"{base}.weight_zp_nibble"
    else:
        arrays = matmul_nbits_arrays(blocks)
        arrays["attrs"] = {"bits": blocks.bits, "block_size": blocks.block_size}
        a, zp_name = x, f"{base}.weight_zp_exact"
    inputs = [a, edit.put(node.input[1], arrays["B"]), edit.put(node.input[2], arrays["scales"])]
    if arrays["zero_points"] is not None:
        inputs.append(edit.put(zp_name, arrays["zero_points"]))
    node.input[:] = inputs
    for key, value in {**arrays["attrs"], "accuracy_level": accuracy_level}.items():
        for old in [old for old in node.attribute if old.name == key]:
            node.attribute.remove(old)
        node.attribute.append(helper.make_attribute(key, value))
    terms = []
    if arrays["offsets"] is not None:
        terms.append(_offset_term(edit, x, k, blocks.block_size, arrays["offsets"], base,
                                  caches.setdefault("blocksums", {})))
        report.offset_nodes += 1
    if branch is not None:
        terms += branch_terms(edit, x, branch, base, branch_bits, accuracy_level)
        report.branch_nodes += 1
    edit.add_terms(node, terms, base)
    report.nibble_nodes += nibbles


def _rewrite_embedding(edit: GraphEdit, head, table: ExactBlocks, tied: bool, head_nibbles: bool) -> None:
    """Point the embedding lookup at exact blocks: the LM head's codes (tied: one copy) or its own table."""
    lookups = [n for n in edit.graph.node if n.op_type in ("GatherBlockQuantized", "Gather") and "input_ids" in n.input]
    if len(lookups) != 1:
        raise ExactGraphError(f"expected one embedding lookup on input_ids, found {len(lookups)}")
    old = lookups[0]
    vocab, hidden = table.shape
    if tied and not head_nibbles:
        data, scales, zp = head.input[1], head.input[2], (head.input[3] if len(head.input) > 3 else "")
        offsets = f"{head.input[1].rsplit('.weight', 1)[0]}.block_offsets"
        offsets = offsets if offsets in edit.inits else None
    else:  # its own 8-bit zero points and offsets; a tied head read as nibbles still shares its codes and scales
        arrays = matmul_nbits_arrays(table)
        if tied:
            data, scales = head.input[1], head.input[2]
        else:
            data = edit.put("model.embed_tokens.exact_codes", arrays["B"])
            scales = edit.put("model.embed_tokens.exact_scales", arrays["scales"])
        zp = edit.put("model.embed_tokens.exact_zp", arrays["zero_points"]) if arrays["zero_points"] is not None else ""
        offsets = (edit.put("model.embed_tokens.block_offsets", arrays["offsets"]) if arrays["offsets"] is not None
                   else None)
    shape = edit.put("/model/constants/exact/embedding_shape", np.array([vocab, hidden * table.bits // 8], np.int64))
    base, ids, out = "/model/embed_tokens/exact", old.input[1], old.output[0]
    flat = edit.node("Reshape", [data, shape], f"{base}/Reshape")
    gathered = edit.node("GatherBlockQuantized", [flat, ids, scales] + ([zp] if zp else []),
                         f"{base}/GatherBlockQuantized", domain="com.microsoft", bits=table.bits,
                         block_size=table.block_size, gather_axis=0, quantize_axis=1)
    if offsets is None:
        edit.new_nodes[-1].output[0] = out
    else:  # M [blocks, vocab]: the token's column, each block's offset broadcast over its elements
        nb = hidden // table.block_size
        m = edit.node("Gather", [offsets, ids], f"{base}/offsets/Gather", axis=1)
        if edit.inits[offsets].data_type != onnx.TensorProto.FLOAT:
            m = edit.node("Cast", [m], f"{base}/offsets/Cast", to=onnx.TensorProto.FLOAT)
        m = edit.node("Transpose", [m], f"{base}/offsets/Transpose", perm=[1, 2, 0])
        m = edit.node("Unsqueeze", [m, edit.put(f"{base}/last_axis", np.array([-1], np.int64))], f"{base}/Unsqueeze")
        m = edit.node("Expand", [m, edit.put(f"{base}/block", np.array([1, 1, nb, table.block_size], np.int64))],
                      f"{base}/offsets/Expand")
        m = edit.node("Reshape", [m, edit.put(f"{base}/out_shape", np.array([0, 0, hidden], np.int64))],
                      f"{base}/offsets/Reshape")
        edit.new_nodes.append(helper.make_node("Add", [gathered, m], [out], name=f"{base}/Add"))
    edit.graph.node.remove(old)


def rewrite(model: onnx.ModelProto, weights: dict[str, ExactBlocks], accuracy_level: int = 4,
            branches: dict[str, LowRank] | None = None, branch_bits: int = 32) -> ExactReport:
    """Rewrite ``model`` (weights loaded) in place. ``branches``: per builder node key (``layers.N.qkv_proj``) a LoRA
    branch. The builder's own (re-quantized) weights are dropped."""
    edit = GraphEdit(model.graph)
    tied = LM_HEAD not in weights
    report, caches, head, seen = ExactReport(), {}, None, set()
    for node in [n for n in edit.graph.node if n.op_type == "MatMulNBits"]:
        keys = node_projections(node.name, tied)
        if keys is None:
            continue
        missing = [k for k in keys if k not in weights]
        if missing:
            raise ExactGraphError(f"{node.name}: the GGUF has no weight for {missing[0]}")
        blocks = concat_rows([weights[k] for k in keys])
        branch = (branches or {}).get(node_key(node.name) or "")
        _rewrite_matmul(edit, node, blocks, accuracy_level, branch, branch_bits, caches, report)
        report.nodes += 1
        report.types[blocks.source_type] = report.types.get(blocks.source_type, 0) + 1
        seen.update(keys)
        head = node if node.name.startswith("/lm_head/") else head
    if head is None:
        raise ExactGraphError("the graph has no /lm_head/MatMul MatMulNBits node (was it built at int4?)")
    unused = sorted(set(weights) - seen - {EMBED})
    if unused:
        raise ExactGraphError(f"GGUF weights with no node in the graph: {', '.join(unused[:5])}")
    edit.graph.node.extend(edit.new_nodes)
    edit.new_nodes = []
    _rewrite_embedding(edit, head, weights[EMBED], tied, carried_as_nibbles(weights[EMBED], accuracy_level))
    edit.finish()
    return report


def rewrite_folder(folder: Path, gguf_path: Path, accuracy_level: int, adapter_dir: Path | None = None,
                   branch_bits: int = 32) -> ExactReport:
    """:func:`rewrite` on ``folder/model.onnx`` (saved in place, weights in ``model.onnx.data``), with the LoRA adapter
    at ``adapter_dir`` as a branch when given."""
    folder = Path(folder)
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    weights = read_exact_weights(Path(gguf_path))
    branches = None
    if adapter_dir is not None:
        pairs, scale = read_adapter(Path(adapter_dir))
        nodes = sorted({k for n in model.graph.node if n.op_type == "MatMulNBits" and (k := node_key(n.name))})
        branches = node_branches(pairs, scale, layout_from_shapes({k: v.shape for k, v in weights.items()}, nodes))
    report = rewrite(model, weights, accuracy_level, branches, branch_bits)
    for stale in (folder / "model.onnx.data",):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=1024)
    log.info("%s: %s", folder, report.describe())
    return report


def head_size(folder: Path) -> int:
    """``genai_config.json``'s head size (the attention-scale factor is its inverse square root)."""
    return int(json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
               ["head_size"])
