"""Store the KV cache as int8 (recipe ``conversion.kv_cache: "int8"``).

At long context a decode step is dominated by attention over the cache: ONNX Runtime's CPU ``GroupQueryAttention``
reads every cached key and value of every layer for every new token, in FP32 on our CPU graphs. ONNX Runtime 1.31's
CPU kernel also takes an int8 cache (attributes ``k_quant_type``/``v_quant_type`` and ``kv_cache_bit_width``, scale
inputs 12 and 13): it quantizes each new key and value on write and dequantizes inside its products, a quarter of
the bytes read. Measured on one 0.5B-shaped layer (14 query heads, 2 KV heads, 64 dims) at 8,192 tokens of context, a
decode step's attention with past and present sharing one buffer (as GenAI runs it): FP32 5.3 ms, int8 per channel
4.2 ms, int8 per tensor 2.8 ms (2 threads, load ~4). Both ONNX Runtime GenAI 0.14 and Foundry Local's 0.18 run such a
graph; the cache buffers then hold int8.

The scales are static, per channel (``kv_num_heads × head_size`` per layer, for keys and for values): each channel's
largest magnitude on calibration text (:func:`scripts.core.english_text.calibration_text`, disjoint from the text the
fidelity gate scores) over 127. Keys are cached after the rotary embedding, which turns each pair of channels by an
angle that grows with the position: calibration on a thousand tokens does not see every angle of the slow pairs, so
both channels of a pair get the pair's largest *norm* (any rotation of a seen pair stays in range). A value outside
the calibrated range saturates. This is not exact: the fidelity gate measures the build against FP32
(float cache) like any other quantization, and the recipe keeps the float cache unless asked.

Everything graph-related here is pure (:func:`plan_rewrite`, :func:`apply`); :func:`quantize_kv_cache` does the I/O.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from scripts.core.english_text import calibration_text
from scripts.core.errors import ConversionError

log = logging.getLogger(__name__)

GQA = "GroupQueryAttention"
#: GroupQueryAttention's inputs before the optional key and value scales (query … head_sink).
SCALE_INPUT = 12
QUANT_TYPE = "PER_CHANNEL"
BITS = 8
CODE_MAX = 127.0
SCALE_NAME = "/model/kv_cache_scales/{kind}_scale.{layer}"
#: Tokens of calibration text run through the float-cache graph once (one prefill; a 0.5B model takes seconds).
CALIBRATION_TOKENS = 1024


class KvCacheError(ConversionError):
    """The graph cannot take an int8 KV cache (no GroupQueryAttention, a cache input that does not match)."""


@dataclass(frozen=True)
class KvScales:
    """Per layer, the key and the value scales (``kv_num_heads × head_size`` each)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]


def channel_scales(present: np.ndarray, rotary: str | None = None) -> np.ndarray:
    """Per-channel scales of one layer's cache ``[batch, kv_heads, tokens, head_size]``: the largest magnitude of each
    (head, dimension) over the tokens, over 127 (a channel never seen non-zero gets the smallest positive scale).
    ``rotary`` ("half": channel i pairs with i + head_size/2; "interleaved": 2i with 2i+1) bounds both channels of a
    pair by the pair's largest norm. Flattened head-major, the layout the kernel reads."""
    x = np.asarray(present, dtype=np.float32)
    if rotary:
        d = x.shape[-1]
        a, b = (x[..., :d // 2], x[..., d // 2:]) if rotary == "half" else (x[..., 0::2], x[..., 1::2])
        norm = np.sqrt(a * a + b * b).max(axis=(0, 2))  # [kv_heads, head_size / 2]
        amax = np.concatenate([norm, norm], axis=-1) if rotary == "half" else np.repeat(norm, 2, axis=-1)
    else:
        amax = np.abs(x).max(axis=(0, 2))
    return (np.maximum(amax.reshape(-1), np.float32(1e-8)) / np.float32(CODE_MAX)).astype(np.float32)


def rotary_layout(node: onnx.NodeProto) -> str:
    """How a GroupQueryAttention node pairs its rotary channels (the keys it caches are rotated either way)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return "interleaved" if attrs.get("rotary_interleaved") else "half"


def cache_names(genai_config: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    """The graph's past key, past value, present key and present value names per layer (``genai_config.json``)."""
    dec = genai_config["model"]["decoder"]
    n = int(dec["num_hidden_layers"])
    ins, outs = dec["inputs"], dec["outputs"]
    return ([ins["past_key_names"] % i for i in range(n)], [ins["past_value_names"] % i for i in range(n)],
            [outs["present_key_names"] % i for i in range(n)], [outs["present_value_names"] % i for i in range(n)])


def attention_nodes(graph: onnx.GraphProto, present_keys: Sequence[str]) -> list[onnx.NodeProto]:
    """The GroupQueryAttention node of each layer, found by the present key it writes (layer order)."""
    by_output = {out: node for node in graph.node if node.op_type == GQA for out in node.output}
    missing = [name for name in present_keys if name not in by_output]
    if missing:
        raise KvCacheError(f"no {GQA} node writes {missing[0]} ({len(missing)} of {len(present_keys)} layers): an "
                           "int8 KV cache needs ONNX Runtime's GroupQueryAttention in every layer; set "
                           "conversion.kv_cache to \"float\" for this model.")
    return [by_output[name] for name in present_keys]


def apply(model: onnx.ModelProto, genai_config: dict, scales: KvScales) -> int:
    """Rewrite ``model`` in place for an int8 cache with ``scales``; the number of layers rewritten. Pure (no I/O)."""
    past_k, past_v, pres_k, pres_v = cache_names(genai_config)
    graph = model.graph
    nodes = attention_nodes(graph, pres_k)
    if len(scales.keys) != len(nodes) or len(scales.values) != len(nodes):
        raise KvCacheError(f"{len(scales.keys)} calibrated layers for {len(nodes)} attention layers.")
    for layer, node in enumerate(nodes):
        if any(a.name == "k_quant_type" for a in node.attribute):
            raise KvCacheError(f"layer {layer}'s {GQA} already has a quantized cache.")
        if len(node.input) > SCALE_INPUT:
            raise KvCacheError(f"layer {layer}'s {GQA} has {len(node.input)} inputs; expected at most {SCALE_INPUT}.")
        while len(node.input) < SCALE_INPUT:
            node.input.append("")
        for kind, values in (("k", scales.keys[layer]), ("v", scales.values[layer])):
            name = SCALE_NAME.format(kind=kind, layer=layer)
            graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
            node.input.append(name)
        node.attribute.extend([helper.make_attribute("k_quant_type", QUANT_TYPE),
                               helper.make_attribute("v_quant_type", QUANT_TYPE),
                               helper.make_attribute("kv_cache_bit_width", BITS)])
    cache = set(past_k + past_v + pres_k + pres_v)
    for value in list(graph.input) + list(graph.output):
        if value.name in cache:
            value.type.tensor_type.elem_type = TensorProto.INT8
    return len(nodes)


def calibrate(model_path: Path, genai_config: dict, ids: Sequence[int], threads: int = 2) -> KvScales:
    """Run the float-cache graph once over ``ids`` (an empty past) and take each layer's cache scales."""
    import onnxruntime as ort
    past_k, past_v, pres_k, pres_v = cache_names(genai_config)
    layouts = [rotary_layout(n) for n in attention_nodes(onnx.load(str(model_path), load_external_data=False).graph,
                                                          pres_k)]
    dec = genai_config["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    n = len(ids)
    empty = np.zeros((1, int(dec["num_key_value_heads"]), 0, int(dec["head_size"])), np.float32)
    feeds = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    feed = {i.name: (empty if i.name in past_k or i.name in past_v else feeds.get(i.name))
            for i in session.get_inputs()}
    unknown = [name for name, value in feed.items() if value is None]
    if unknown:
        raise KvCacheError(f"calibration cannot feed the graph's input {unknown[0]}.")
    outputs = dict(zip(pres_k + pres_v, session.run(pres_k + pres_v, feed)))
    return KvScales([channel_scales(outputs[k], layout) for k, layout in zip(pres_k, layouts)],
                    [channel_scales(outputs[v]) for v in pres_v])


def calibration_ids(folder: Path, genai_config: dict, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """``tokens`` tokens of the calibration text in ``folder``'s tokenizer (fewer when the context is shorter)."""
    from tokenizers import Tokenizer
    limit = min(tokens, int(genai_config["model"].get("context_length") or tokens))
    ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(calibration_text(),
                                                                          add_special_tokens=False).ids
    return ids[:limit]


def quantize_kv_cache(folder: Path, ids: Sequence[int] | None = None) -> int:
    """Calibrate ``folder``'s graph on ``ids`` (default: :func:`calibration_ids`) and rewrite it in place for an int8
    KV cache (its external weights are untouched); the number of layers rewritten."""
    folder = Path(folder)
    genai_config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    ids = calibration_ids(folder, genai_config) if ids is None else ids
    path = folder / genai_config["model"]["decoder"]["filename"]
    threads = int((genai_config["model"]["decoder"].get("session_options") or {}).get("intra_op_num_threads") or 2)
    scales = calibrate(path, genai_config, ids, threads)
    model = onnx.load(str(path), load_external_data=False)
    count = apply(model, genai_config, scales)
    onnx.save(model, str(path))
    log.info("KV cache int8 (per channel) in %d layers, calibrated on %d tokens", count, len(ids))
    return count
