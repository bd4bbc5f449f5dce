"""The base model as the deployed graph computes it, for a fine-tune to train on (step ``deployed-base``).

A LoRA fine-tune kept as a branch (``conversion.adapter: "branch"``) beside a quantized base computes
``dequant(quant(W))·x + branch(x)``. Trained on the float ``W``, the adapter learns to correct a model that is not the
one deployed, and the rounding of ``W`` then shows up as error against the fine-tune. So, for a float source (or a
GGUF re-quantized), the chain quantizes the base first with the recipe's own conversion (the same builder, the same
layout), reads every quantized weight back out of that graph (:func:`scripts.convert.graph_check.graph_weights`,
``scale·(code − zero point)``) and writes a Hugging Face folder of the base holding exactly those values. The
fine-tune trains on it, the merged FP32 reference is it plus the adapter, and the convert step checks that the graph it
builds quantizes the base to the same values (:func:`weight_digests`), so what was trained is what is deployed, up to
the kernels' arithmetic. A GGUF carried exactly needs none of this: its import already is its dequantized blocks.

Runs in a worker process (torch, transformers): :func:`build`.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from scripts.convert.gguf_blocks import unpack_matmul_nbits
from scripts.convert.graph_check import graph_weights
from scripts.convert.lora_branch import builder_layout, node_key

HEAD_NODE = "/lm_head/MatMul"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_digests(model: onnx.ModelProto) -> dict[str, str]:
    """SHA-256 of every quantized projection's dequantized ``[N, K]`` float32 weight, by builder node name (what the
    convert step compares with the deployed base the fine-tune trained on)."""
    return _digests(graph_weights(model, tied=False))


def _digests(weights: dict[str, np.ndarray | str]) -> dict[str, str]:
    return {name: w if isinstance(w, str) else hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()
            for name, w in weights.items()}


def embedding_weight(model: onnx.ModelProto) -> np.ndarray | None:
    """The ``[vocab, hidden]`` table a ``GatherBlockQuantized`` embedding computes with; None for a float ``Gather``."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    lookup = next((n for n in model.graph.node if "input_ids" in n.input and n.op_type in ("Gather",
                                                                                        "GatherBlockQuantized")), None)
    if lookup is None or lookup.op_type == "Gather":
        return None
    a = {x.name: helper.get_attribute_value(x) for x in lookup.attribute}
    data_name = lookup.input[0]
    if data_name not in inits and data_name in producers and producers[data_name].op_type == "Reshape":
        data_name = producers[data_name].input[0]
    data = numpy_helper.to_array(inits[data_name])
    scales = numpy_helper.to_array(inits[lookup.input[2]]).astype(np.float32)
    zp = numpy_helper.to_array(inits[lookup.input[3]]) if len(lookup.input) > 3 and lookup.input[3] else None
    bits, block = int(a.get("bits", 4)), int(a["block_size"])
    vocab, blocks = scales.shape[0], scales.reshape(scales.shape[0], -1).shape[1]
    hidden = blocks * block
    packed = data.reshape(vocab, blocks, block * bits // 8)
    return unpack_matmul_nbits(packed, scales, zp, None, bits, block, hidden).dequantize()


def projection_rows(node: str, rows: np.ndarray, layout: dict[str, list[tuple[str, int]]]) -> dict[str, np.ndarray]:
    """A builder node's ``[N, K]`` weight split into the Hugging Face projections it packs, keyed
    ``layers.<i>.<proj>`` (``lm_head`` for the head) (pure). ``layout``:
    :func:`scripts.convert.lora_branch.builder_layout`, each node's projections and output rows."""
    if node.startswith(HEAD_NODE):
        return {"lm_head": rows}
    key = node_key(node)
    if key is None:
        raise ValueError(f"{node}: not a builder projection node")
    parts = layout[key]
    bounds = np.cumsum([n for _, n in parts])[:-1]
    return {proj: w for (proj, _), w in zip(parts, np.split(rows, bounds, axis=0))}


def _module(model, key: str):
    """The ``nn.Linear`` a ``layers.<i>.<proj>`` / ``lm_head`` key names in a causal LM (attention or MLP)."""
    if key == "lm_head":
        return model.get_output_embeddings()
    _, layer, proj = key.split(".")
    block = model.model.layers[int(layer)]
    for owner in ("self_attn", "mlp"):
        if hasattr(getattr(block, owner, None), proj):
            return getattr(getattr(block, owner), proj)
    raise KeyError(key)


def build(request: dict[str, Any]) -> dict[str, Any]:
    """Worker job: ``base_dir`` (the float Hugging Face base), ``onnx_dir`` (its graph at the recipe's conversion) →
    ``out_dir``: the base holding the graph's dequantized weights (the LM head untied from the embedding when the graph
    quantizes one and not the other)."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dir, out_dir = Path(request["base_dir"]), Path(request["out_dir"])
    graph = onnx.load(str(Path(request["onnx_dir"]) / "model.onnx"))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = model.config
    layout = builder_layout(graph)
    replaced, untied = 0, False
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    table = embedding_weight(graph)
    weights = graph_weights(graph, tied=False)
    for node, w in weights.items():
        if isinstance(w, str):
            raise ValueError(f"{node}: {w}")
        for key, rows in projection_rows(node, w, layout).items():
            if key == "lm_head" and tied:  # the graph's head is its own quantized copy: the HF model must say so
                model.config.tie_word_embeddings = False
                if hasattr(model.config, "get_text_config"):
                    model.config.get_text_config().tie_word_embeddings = False
                model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(rows.copy()))
                untied = True
            else:
                linear = _module(model, key)
                if tuple(linear.weight.shape) != rows.shape:
                    raise ValueError(f"{node} ({key}): graph {list(rows.shape)}, model {list(linear.weight.shape)}")
                linear.weight.data.copy_(torch.from_numpy(rows))
            replaced += 1
    if table is not None:
        model.get_input_embeddings().weight.data.copy_(torch.from_numpy(table[: cfg.vocab_size]))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for item in base_dir.iterdir():  # tokenizer, chat template, generation config: everything but the weights
        if item.is_file() and not item.name.endswith(_WEIGHT_FILES) and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)
    digests = _digests(weights)
    return {"summary": f"the base as the deployed graph computes it: {replaced} quantized matrices"
                       + (", the embedding table" if table is not None else "")
                       + (" (LM head untied from the embedding)" if untied else "") + f" → {out_dir}",
            "matrices": replaced, "untied": untied, "digests": digests}
