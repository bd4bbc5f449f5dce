"""Bandwidth bound: bytes read per token from ONNX graphs and safetensors headers; the bound itself."""
import json
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scripts.proof.bandwidth import (bound_tokens_per_s, bytes_per_token, fraction_of_bound, measure_bandwidth,
                               onnx_bytes_per_token, safetensors_bytes_per_token)


def _onnx(path, shared: bool):
    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")  # 3200 bytes, row 32
    w = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")  # 256 bytes
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["y", "emb_t"], ["logits"]))
        nodes.append(helper.make_node("Transpose", ["emb"], ["emb_t"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [emb, w])
    onnx.save(helper.make_model(graph), path)


def test_gathered_table_counts_one_row_unless_shared(tmp_path):
    _onnx(tmp_path / "a.onnx", shared=False)
    assert onnx_bytes_per_token(tmp_path / "a.onnx") == 32 + 256
    _onnx(tmp_path / "b.onnx", shared=True)
    assert onnx_bytes_per_token(tmp_path / "b.onnx") == 3200 + 256


def _safetensors(path, tensors):
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_safetensors_embedding_row_when_untied(tmp_path):
    _safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": ("F32", [10, 4], 160), "lm_head.weight": ("F32", [10, 4], 160),
        "model.layers.0.w": ("BF16", [4, 4], 32)})
    assert safetensors_bytes_per_token(tmp_path) == 16 + 160 + 32
    (tmp_path / "config.json").write_text("{}")
    assert bytes_per_token(tmp_path) == 208


def test_bound_and_fraction():
    assert bound_tokens_per_s(1_000_000_000, 10.0) == 10
    assert fraction_of_bound(5.0, 1_000_000_000, 10.0) == 0.5
    assert fraction_of_bound(None, 1, 1.0) is None
    with pytest.raises(ValueError):
        bound_tokens_per_s(0, 1.0)


def test_measure_bandwidth_small_buffer():
    bw = measure_bandwidth(buffer_mb=8, repeats=3, warmup=1)
    assert bw.gb_per_s > 0 and bw.repeats == 3
