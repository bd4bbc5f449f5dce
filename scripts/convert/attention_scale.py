"""Fold the attention scale into the query projection (recipe ``conversion.fold_attention_scale``).

ONNX Runtime's CPU ``GroupQueryAttention`` computes ``Q·Kᵀ`` once per query head with ``alpha`` = its ``scale``
(1/√head_size). MLAS takes its matrix-vector fast path for a one-token step only when ``alpha`` is 1; otherwise it packs
the whole key cache before multiplying — for every query head, every layer, every generated token. At 2,000 tokens of
context that was 40 % of a 0.5B model's decode step (``invoke profile``). Multiplying the query rows of the projection
that feeds the attention (its weight scales, or float weights, and bias) by the same factor and setting ``scale`` to 1
gives the same scores. Applied only where the factor is a power of two (head sizes 4, 16, 64, 256 …): the product is then
exact and the logits bit-identical; other head sizes are left as built and reported.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

log = logging.getLogger(__name__)

GQA = "GroupQueryAttention"


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def _query_scalables(gqa, producers, uses, inits) -> list[tuple[str, int | None]] | str:
    """The initializers that scale the query, each with its output-feature count (rows, a MatMulNBits' ``N`` or a
    bias's length; None: a float ``[K, N]`` weight, whose columns are the features) — or why the query cannot be
    scaled. The query may be a sum (``Add``) of terms: a bias, the projection, and terms added beside it (a GGUF's
    block offsets, a LoRA branch: :mod:`scripts.convert.gguf_exact`), each scaled at its last MatMul."""
    found = _terms(gqa.input[0], producers, inits, depth=0)
    if isinstance(found, str):
        return found
    shared = [name for name, _ in found if uses[name] > 1]
    if shared:
        return f"{shared[0]} is shared with other nodes"
    return found


def _terms(value: str, producers, inits, depth: int) -> list[tuple[str, int | None]] | str:
    node = producers.get(value)
    if node is None:
        return "the query comes from a graph input, not a MatMul"
    if node.op_type == "Add" and depth < 4:
        found: list[tuple[str, int | None]] = []
        for x in node.input:
            part = [(x, int(np.prod(inits[x].dims)))] if x in inits else _terms(x, producers, inits, depth + 1)
            if isinstance(part, str):
                return part
            found += part
        return found
    if node.op_type == "MatMul":
        weight = node.input[1]
        cast = producers.get(weight)
        if cast is not None and cast.op_type == "Cast" and cast.input[0] in inits:
            weight = cast.input[0]
        if weight not in inits:
            return "the query MatMul's weight is not an initializer"
        return [(weight, None)]
    if node.op_type == "MatMulNBits":
        n_out = int(_attrs(node)["N"])
        if len(node.input) < 3 or node.input[2] not in inits:
            return "the query MatMulNBits has no initializer scales"
        found = [(node.input[2], n_out)]  # [N, blocks] or [N * blocks], row-major
        if len(node.input) > 5 and node.input[5]:
            if node.input[5] not in inits:
                return "the query MatMulNBits bias is not an initializer"
            found.append((node.input[5], n_out))
        return found
    return f"the query comes from {node.op_type}, not a MatMul"


def _scale_features(array: np.ndarray, n_out: int | None, rows: int, factor: float) -> np.ndarray:
    """``array`` with its first ``rows`` output features multiplied by ``factor``. Pure."""
    out = array.copy()
    view = out.reshape(-1, out.shape[-1])[:, :rows] if n_out is None else out.reshape(n_out, -1)[:rows]
    view *= np.asarray(factor, dtype=out.dtype)
    return out


def fold(model: onnx.ModelProto, head_size: int) -> tuple[int, list[str]]:
    """Rewrite ``model`` in place; return (attention nodes folded, reasons for those left as built)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    uses = Counter(x for n in graph.node for x in n.input)
    inits = {i.name: i for i in graph.initializer}
    folded, skipped = 0, []
    for gqa in (n for n in graph.node if n.op_type == GQA):
        a = _attrs(gqa)
        factor = a.get("scale") or 1.0 / math.sqrt(head_size)
        if factor == 1.0:
            continue
        if math.frexp(factor)[0] != 0.5:
            skipped.append(f"{gqa.name}: scale {factor:.6g} is not a power of two (folding would round)")
            continue
        scalables = _query_scalables(gqa, producers, uses, inits)
        if isinstance(scalables, str):
            skipped.append(f"{gqa.name}: {scalables}")
            continue
        rows = int(a["num_heads"]) * head_size
        for name, n_out in scalables:
            array = _scale_features(numpy_helper.to_array(inits[name]), n_out, rows, factor)
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        _set_attr(gqa, "scale", 1.0)
        folded += 1
    return folded, skipped


def fold_attention_scale(folder: Path) -> tuple[int, list[str]]:
    """:func:`fold` on ``folder/model.onnx`` (head size from ``genai_config.json``), saved in place with its weights
    where they were (one file, or ``model.onnx.data``). Returns what :func:`fold` returns; nothing is written when
    nothing was folded."""
    import json
    folder = Path(folder)
    head_size = int(json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
                    ["head_size"])
    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    if len(locations) > 1:
        return 0, [f"{path}: weights in {len(locations)} external files; left as built"]
    load_external_data_for_model(model, str(folder))  # the one parse, then the weights beside it
    folded, skipped = fold(model, head_size)
    for why in skipped:
        log.info("attention scale left in place: %s", why)
    if folded and locations:
        (folder / next(iter(locations))).unlink()  # rewritten whole below (the weights are in memory)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=next(iter(locations)), size_threshold=1024)
    elif folded:
        onnx.save(model, str(path))
    return folded, skipped
