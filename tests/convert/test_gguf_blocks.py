"""Tests for scripts/convert/gguf_blocks.py: every supported GGUF block type reads into codes/scales/zero points/offsets
that dequantize to the ``gguf`` package's values bit for bit, survive packing for ONNX Runtime, and the operator facts
the layouts rely on hold in the pinned ONNX Runtime (8-bit blocks of 16, default zero points)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from scripts.convert.gguf_blocks import (READERS, UnsupportedBlocks, block_sum_matrix, concat_rows, from_gguf,
                                         matmul_nbits_arrays, row_order_unpermute, unpack_matmul_nbits)
from tests.gguf_writer import llama_permute, random_k_blocks


def _raw(qtype: str, rows: int, cols: int) -> np.ndarray:
    import gguf
    if qtype.endswith("_K"):
        return random_k_blocks(qtype, rows, cols)
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])


def _reference(qtype: str, raw: np.ndarray) -> np.ndarray:
    import gguf
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", sorted(READERS))
def test_blocks_dequantize_to_the_gguf_values_bit_for_bit(qtype):
    raw = _raw(qtype, 6, 512)
    blocks = from_gguf(qtype, raw, 6, 512)
    want = _reference(qtype, raw)
    assert np.array_equal(blocks.dequantize().view(np.uint32), want.view(np.uint32))
    arrays = matmul_nbits_arrays(blocks)
    back = unpack_matmul_nbits(arrays["B"], arrays["scales"], arrays["zero_points"], arrays["offsets"], blocks.bits,
                               blocks.block_size, 512)
    assert np.array_equal(back.dequantize().view(np.uint32), want.view(np.uint32))


def test_layouts_per_type():
    layout = {t: (b.bits, b.block_size, b.offsets is not None)
              for t in READERS for b in [from_gguf(t, _raw(t, 2, 256), 2, 256)]}
    assert layout["Q4_0"] == (4, 32, False) and layout["Q8_0"] == (8, 32, False)
    assert layout["Q4_1"] == (4, 32, True) and layout["Q4_K"] == (4, 32, True) and layout["Q5_K"] == (8, 32, True)
    assert layout["Q6_K"] == (8, 16, False)


def test_rows_of_different_types_stack_exactly_at_the_finest_layout():
    parts = [from_gguf(t, _raw(t, 4, 256), 4, 256) for t in ("Q4_1", "Q6_K", "Q4_0")]
    stacked = concat_rows(parts)
    assert (stacked.bits, stacked.block_size, stacked.offsets is not None) == (8, 16, True)
    want = np.concatenate([p.dequantize() for p in parts])
    # equal values; a part without offsets gets +0.0, which turns a -0.0 weight into +0.0 (the same number)
    assert np.array_equal(stacked.dequantize(), want)


def test_unsupported_type_says_what_to_do():
    with pytest.raises(UnsupportedBlocks, match="requantize"):
        from_gguf("IQ2_XXS", np.zeros((1, 66), np.uint8), 1, 256)


def test_row_order_undoes_llama_cpp_permutation():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    for heads in (4, 2):
        assert np.array_equal(llama_permute(w, heads)[row_order_unpermute(64, heads)], w)


def test_block_sum_matrix():
    x = np.arange(64, dtype=np.float32)
    assert np.array_equal(x @ block_sum_matrix(64, 32), [x[:32].sum(), x[32:].sum()])


def _run_op(node, inputs, feeds, out_shape, inits):
    import onnxruntime as ort
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q6_K", "Q5_K"])
def test_onnx_runtime_kernels_compute_with_these_layouts(qtype):
    """MatMulNBits (accuracy level 1) and GatherBlockQuantized read the packed blocks as the GGUF means them (the
    offset term added here the way the graph adds it)."""
    raw = _raw(qtype, 8, 256)
    blocks = from_gguf(qtype, raw, 8, 256)
    a = matmul_nbits_arrays(blocks)
    w = _reference(qtype, raw)
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    inits = [numpy_helper.from_array(a["B"], "B"), numpy_helper.from_array(a["scales"], "S")]
    names = ["A", "B", "S"]
    if a["zero_points"] is not None:
        inits.append(numpy_helper.from_array(a["zero_points"], "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=256, N=8, bits=blocks.bits,
                            block_size=blocks.block_size, accuracy_level=1)
    y = _run_op(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 256])], {"A": x}, [1, 8], inits)
    if a["offsets"] is not None:
        y = y + (x @ block_sum_matrix(256, blocks.block_size)) @ a["offsets"]
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5 * float(np.abs(x @ w.T).max()))
    if a["offsets"] is None:
        data = a["B"].reshape(8, -1)
        ids = np.array([[3, 0, 7]], np.int64)
        inits = [numpy_helper.from_array(data, "D"), numpy_helper.from_array(a["scales"], "S")] + (
            [numpy_helper.from_array(a["zero_points"], "Z")] if a["zero_points"] is not None else [])
        node = helper.make_node("GatherBlockQuantized", ["D", "I", "S"] + (["Z"] if len(inits) > 2 else []), ["Y"],
                                domain="com.microsoft", bits=blocks.bits, block_size=blocks.block_size, gather_axis=0,
                                quantize_axis=1)
        got = _run_op(node, [helper.make_tensor_value_info("I", TensorProto.INT64, [1, 3])], {"I": ids}, [1, 3, 256],
                      inits)
        assert np.array_equal(got[0], w[ids[0]])
