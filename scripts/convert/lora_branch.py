"""A LoRA adapter kept as its own branch beside each projection instead of merged into the weights (recipe
``conversion.adapter: "branch"``): ``y = base(x) + (x·A)·(s·B)``, ``s = alpha / r`` folded into ``B``. The base stays
exactly as it was quantized (or exactly the GGUF's blocks, :mod:`scripts.convert.gguf_exact`), so the fine-tune's change
— 1–8 % of a weight's RMS for the SmolLM2 recipe, under one 4-bit step — is never rounded onto the base's grid.

For a packed builder node (``qkv_proj``: q, k, v) the per-projection pairs become one: ``A = [A_q | A_k | A_v]``
(``[K, 3r]``) and a block-diagonal ``B`` (``[3r, N_q + N_k + N_v]``); a projection the adapter does not target gets
zero columns. The branch is FP32 MatMuls, or at ``bits`` 8 two ``MatMulNBits`` (symmetric round-to-nearest, blocks of
32 or 16 along K).

Also here: :class:`GraphEdit`, the small initializer/node helper both graph rewrites use.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from scripts.convert.gguf_blocks import ExactBlocks, matmul_nbits_arrays
from scripts.core.errors import ConversionError

#: Builder node (after ``/model/layers.N/attn|mlp/``) → the projections it computes, in its row order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(\w+)/MatMul")
_ADAPTER_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LowRank:
    """A LoRA branch for one builder node: ``x·a·b``, the scale folded into ``b``. a ``[K, r]``, b ``[r, N]``."""

    a: np.ndarray
    b: np.ndarray


@dataclass
class GraphEdit:
    """Initializers set by name and nodes collected for one later ``extend`` (then a topological sort)."""

    graph: onnx.GraphProto
    inits: dict = field(default_factory=dict)
    new_nodes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inits = {i.name: i for i in self.graph.initializer}

    def put(self, name: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]
        return name

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        out = f"{name}/output_0"
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain or None, **attrs))
        return out

    def add_terms(self, node, terms: list[str], base: str) -> None:
        """``node``'s output becomes its own result plus ``terms`` (its consumers see the sum under the old name)."""
        if not terms:
            return
        out = node.output[0]
        node.output[0] = f"{out}/integer"
        total = node.output[0]
        for i, term in enumerate(terms[:-1]):
            total = self.node("Add", [total, term], f"{base}/branch_add_{i}")
        self.new_nodes.append(helper.make_node("Add", [total, terms[-1]], [out], name=f"{base}/branch_add"))

    def finish(self) -> None:
        """Add the collected nodes, drop what nobody reads, and sort the graph."""
        self.graph.node.extend(self.new_nodes)
        self.new_nodes = []
        drop_unused(self.graph)
        topological_sort(self.graph)


def topological_sort(graph: onnx.GraphProto) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(x in known for x in n.input)]
        if not ready:
            raise ConversionError(f"the rewritten graph has a dangling input or a cycle near {pending[0].name}")
        for n in ready:
            known.update(n.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (a replaced lookup), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | outputs
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ----- the adapter --------------------------------------------------------------------------------------------------

def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """``{"layers.N.q_proj": (A [r, K], B [N, r])}`` of a PEFT LoRA folder and its scale ``lora_alpha / r``."""
    from safetensors.numpy import load_file
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora") or config.get("use_rslora"):
        raise ConversionError(f"{adapter_dir}: DoRA / rsLoRA adapters are not kept as a plain branch; set "
                              "conversion.adapter to \"merge\".")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConversionError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors, or "
                              "set conversion.adapter to \"merge\".")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(weights)).items():
        m = _ADAPTER_KEY.search(key)
        if m is None:
            raise ConversionError(f"{adapter_dir}: adapter tensor {key} is not a decoder projection's LoRA A/B; set "
                                  "conversion.adapter to \"merge\".")
        pairs.setdefault(f"layers.{m.group(1)}.{m.group(2)}", {})[m.group(3)] = value.astype(np.float32)
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}, float(config["lora_alpha"]) / float(config["r"])


def node_key(node_name: str) -> str | None:
    """``/model/layers.3/attn/qkv_proj/MatMul_Q4`` → ``layers.3.qkv_proj``; None for other nodes."""
    m = LAYER_NODE.match(node_name)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def node_branches(pairs: dict[str, tuple[np.ndarray, np.ndarray]], scale: float,
                  layout: dict[str, list[tuple[str, int]]]) -> dict[str, LowRank]:
    """Per builder node (``layers.N.qkv_proj``) its :class:`LowRank`; ``layout``: per node, its projections and their
    output sizes in row order."""
    out = {}
    for node, parts in layout.items():
        if not any(p in pairs for p, _ in parts):
            continue
        total = sum(n for _, n in parts)
        a_cols, b_rows, col = [], [], 0
        for proj, n in parts:
            if proj in pairs:
                a, b = pairs[proj]  # PEFT: A [r, K], B [N, r]
                if b.shape[0] != n:
                    raise ConversionError(f"adapter {proj}: {b.shape[0]} outputs, the model's projection has {n}")
                a_cols.append(a.T)
                rows = np.zeros((a.shape[0], total), np.float32)
                rows[:, col:col + n] = (b * np.float32(scale)).T
                b_rows.append(rows)
            col += n
        out[node] = LowRank(np.ascontiguousarray(np.concatenate(a_cols, axis=1), dtype=np.float32),
                            np.ascontiguousarray(np.concatenate(b_rows, axis=0)))
    unused = sorted(set(pairs) - {p for parts in layout.values() for p, _ in parts})
    if unused:
        raise ConversionError(f"adapter weights for {', '.join(unused[:4])} have no node in the graph")
    return out


def layout_from_shapes(shapes: dict[str, tuple[int, int]], nodes: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Per node key (``layers.N.qkv_proj``) its projections and output sizes, from ``[N, K]`` weight shapes."""
    out = {}
    for node in nodes:
        layer, proj = node.rsplit(".", 1)
        out[node] = [(f"{layer}.{p}", shapes[f"{layer}.{p}"][0]) for p in PACKED.get(proj, (proj,))]
    return out


# ----- the branch in the graph --------------------------------------------------------------------------------------

def quantize_8bit(w: np.ndarray) -> ExactBlocks:
    """Symmetric 8-bit round-to-nearest of a float ``[K, N]`` matrix, blocks of 32 along K (16 when K is not a
    multiple of 32)."""
    k, n = w.shape
    block = 32 if k % 32 == 0 else 16
    if k % block:
        raise ConversionError(f"a low-rank matrix with {k} rows cannot be blocked by 16 or 32 at 8 bits; use "
                              "conversion.adapter_bits 32")
    rows = np.ascontiguousarray(w.T, dtype=np.float32).reshape(n, k // block, block)
    scale = np.abs(rows).max(axis=-1) / np.float32(127.0)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    codes = (np.clip(np.rint(rows / safe[..., None]), -127, 127) + 128).astype(np.uint8)
    return ExactBlocks(codes.reshape(n, k), scale.astype(np.float32), np.full(scale.shape, 128, np.uint8), None, 8,
                       block, "int8")


def low_rank_matmul(edit: GraphEdit, x: str, w: np.ndarray, name: str, bits: int, accuracy_level: int) -> str:
    """``x·w`` for a float ``w [K, N]``: a float MatMul (at ``bits`` 16 stored as float16, cast once at load), or at
    ``bits`` 8 a ``MatMulNBits``."""
    if bits == 32:
        return edit.node("MatMul", [x, edit.put(name, w)], f"{name}/MatMul")
    if bits == 16:
        half = edit.node("Cast", [edit.put(name, w.astype(np.float16))], f"{name}/Cast", to=onnx.TensorProto.FLOAT)
        return edit.node("MatMul", [x, half], f"{name}/MatMul")
    blocks = quantize_8bit(w)
    arrays = matmul_nbits_arrays(blocks)
    return edit.node("MatMulNBits", [x, edit.put(f"{name}.weight_Q8", arrays["B"]),
                                     edit.put(f"{name}.scales", arrays["scales"])],
                     f"{name}/MatMulNBits", domain="com.microsoft", K=w.shape[0], N=w.shape[1], bits=8,
                     block_size=blocks.block_size, accuracy_level=4)  # no FP32 8-bit kernel: nibble_matmul


def branch_terms(edit: GraphEdit, x: str, branch: LowRank, base: str, bits: int, accuracy_level: int) -> list[str]:
    """``(x·A)·B`` as graph nodes. At 8 bits the rank is padded with zeros to a multiple of 16 (the smallest block
    ``MatMulNBits`` takes along B's K): the padding adds exactly nothing."""
    a, b = branch.a, branch.b
    if bits == 8 and a.shape[1] % 16:
        pad = 16 - a.shape[1] % 16
        a = np.concatenate([a, np.zeros((a.shape[0], pad), np.float32)], axis=1)
        b = np.concatenate([b, np.zeros((pad, b.shape[1]), np.float32)], axis=0)
    h = low_rank_matmul(edit, x, a, f"{base}.lora_A", bits, accuracy_level)
    return [low_rank_matmul(edit, h, b, f"{base}.lora_B", bits, accuracy_level)]


def add_branches(model: onnx.ModelProto, branches: dict[str, LowRank], bits: int = 32,
                 accuracy_level: int = 4) -> int:
    """Put each branch beside its builder node (``MatMulNBits`` or float ``MatMul``) in ``model``; the count."""
    edit = GraphEdit(model.graph)
    done = set()
    for node in list(model.graph.node):
        key = node_key(node.name)
        if node.op_type not in ("MatMulNBits", "MatMul") or key not in branches:
            continue
        base = f"/model/{key}"
        edit.add_terms(node, branch_terms(edit, node.input[0], branches[key], base, bits, accuracy_level), base)
        done.add(key)
    missing = sorted(set(branches) - done)
    if missing:
        raise ConversionError(f"no projection node for the adapter's {', '.join(missing[:4])} in the graph")
    edit.finish()
    return len(done)


def builder_layout(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """Per builder projection node its projections and output sizes, from the graph alone (a packed ``qkv_proj`` is
    split by the attention's head counts)."""
    heads = next((({a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in model.graph.node
                  if n.op_type == "GroupQueryAttention"), {})
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        key = node_key(node.name)
        if key is None or node.op_type not in ("MatMulNBits", "MatMul"):
            continue
        if node.op_type == "MatMulNBits":
            n = int(next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N"))
        else:
            n = int(inits[node.input[1]].dims[1])
        layer, proj = key.rsplit(".", 1)
        if proj == "qkv_proj":
            q, kv = int(heads["num_heads"]), int(heads["kv_num_heads"])
            size = n // (q + 2 * kv)
            out[key] = [(f"{layer}.q_proj", q * size), (f"{layer}.k_proj", kv * size), (f"{layer}.v_proj", kv * size)]
        elif proj == "gate_up_proj":
            out[key] = [(f"{layer}.gate_proj", n // 2), (f"{layer}.up_proj", n // 2)]
        else:
            out[key] = [(f"{layer}.{proj}", n)]
    return out


def branch_folder(folder: Path, adapter_dir: Path, bits: int = 32, accuracy_level: int = 4) -> int:
    """The adapter at ``adapter_dir`` added as branches to ``folder/model.onnx`` (a builder graph of a float source),
    saved in place with its weights in ``model.onnx.data``; the number of nodes given a branch."""
    folder = Path(folder)
    model = onnx.load(str(folder / "model.onnx"))
    pairs, scale = read_adapter(Path(adapter_dir))
    count = add_branches(model, node_branches(pairs, scale, builder_layout(model)), bits, accuracy_level)
    (folder / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return count
