"""Tests for scripts/convert/nibble_matmul.py: every 8-bit GGUF block type read as 4-bit nibbles over the interleaved
input ``[x, 16·x]`` plus its block offsets reads back to the GGUF's dequantized values, and ONNX Runtime's 4-bit kernel
computes the dequantized product with it at accuracy level 1 (to float rounding); at level 4 (int8 activations) 8-bit
codes stay 8-bit, which is the more accurate there."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scripts.convert.gguf_blocks import UnsupportedBlocks, block_sum_matrix, from_gguf, matmul_nbits_arrays
from scripts.convert.lora_branch import GraphEdit
from scripts.convert.nibble_matmul import carried_as_nibbles, interleave, nibble_arrays, nibble_input, read_nibbles
from tests.convert.test_gguf_blocks import _raw, _reference, _run_op

EIGHT_BIT = ["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"]
N, K = 24, 512


def _blocks(qtype):
    raw = _raw(qtype, N, K)
    return from_gguf(qtype, raw, N, K), _reference(qtype, raw)


def nibble_graph(blocks, level: int) -> onnx.ModelProto:
    """``x [1, positions, K]`` → the nibble ``MatMulNBits`` (its offset term is added by the caller)."""
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, N])])
    edit = GraphEdit(graph)
    arrays = nibble_arrays(blocks)
    a = interleave(edit, "x", K, "w", {})
    edit.new_nodes.append(helper.make_node(
        "MatMulNBits", [a, edit.put("w.weight", arrays["B"]), edit.put("w.scales", arrays["scales"]),
                        edit.put("w.zp", arrays["zero_points"])], ["y"], name="w/MatMul", domain="com.microsoft",
        N=N, accuracy_level=level, **arrays["attrs"]))
    edit.finish()
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("qtype", EIGHT_BIT)
def test_the_nibble_form_reads_back_to_the_gguf_values(qtype):
    blocks, want = _blocks(qtype)
    a = nibble_arrays(blocks)
    assert a["attrs"] == {"K": 2 * K, "bits": 4, "block_size": 2 * blocks.block_size}
    assert a["B"].tobytes() == blocks.codes.tobytes()  # the same bytes, one per 8-bit code
    back = read_nibbles(a["B"], a["scales"], a["zero_points"], a["offsets"], np.array([1, 16], np.float32), 2 * K,
                        2 * blocks.block_size)
    assert np.array_equal(back.dequantize(), want)  # float equality: a zero's sign aside


def _relative_error(qtype, level, nibbles: bool) -> float:
    """Of one ONNX Runtime ``MatMulNBits`` (the nibble form, or the plain 8-bit node) plus the offset term, against
    the float64 product with the GGUF's dequantized weight."""
    blocks, w = _blocks(qtype)
    x = np.random.default_rng(2).standard_normal((1, 5, K)).astype(np.float32)
    if nibbles:
        offsets = nibble_arrays(blocks)["offsets"]
        got = run(nibble_graph(blocks, level), x)
    else:
        a = matmul_nbits_arrays(blocks)
        offsets = a["offsets"]
        inits = [numpy_helper.from_array(a["B"], "B"), numpy_helper.from_array(a["scales"], "S")]
        if a["zero_points"] is not None:
            inits.append(numpy_helper.from_array(a["zero_points"], "Z"))
        node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"][:len(inits) + 1], ["Y"], domain="com.microsoft",
                                K=K, N=N, bits=8, block_size=blocks.block_size, accuracy_level=level)
        got = _run_op(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, K])], {"x": x}, [1, 5, N],
                      inits)
    if offsets is not None:
        got = got + (x @ block_sum_matrix(K, blocks.block_size)) @ offsets
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    return float(np.abs(got - want).max()) / float(np.abs(want).max())


@pytest.mark.parametrize("qtype", EIGHT_BIT)
def test_the_4bit_kernel_computes_the_dequantized_product_at_level_1(qtype):
    blocks, _ = _blocks(qtype)
    assert carried_as_nibbles(blocks, 1)
    assert _relative_error(qtype, 1, nibbles=True) < 1e-5  # float32 rounding (measured 0.6–3.2e-6)


def test_at_level_4_eight_bit_codes_stay_8_bit():
    """int8 activations: the nibble form would quantize x with the int8 scale of 16·x, the 8-bit kernel does not."""
    blocks, _ = _blocks("Q5_0")
    assert not carried_as_nibbles(blocks, 4) and not carried_as_nibbles(_blocks("Q4_0")[0], 1)
    assert _relative_error("Q5_0", 4, nibbles=True) > 4 * _relative_error("Q5_0", 4, nibbles=False)


def test_the_graph_says_which_input_a_node_interleaves():
    blocks, _ = _blocks("Q8_0")
    graph = nibble_graph(blocks, 1).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "MatMulNBits")
    source, factors = nibble_input(node, producers, inits)
    assert source == "x" and factors.tolist() == [1.0, 16.0]
    inits["w.nibble_axes"].CopyFrom(numpy_helper.from_array(np.array([-2], np.int64), "w.nibble_axes"))
    with pytest.raises(UnsupportedBlocks, match="not interleaved"):
        nibble_input(node, producers, inits)


def test_a_node_read_differently_does_not_read_back_as_the_gguf():
    blocks, want = _blocks("Q8_0")
    a = nibble_arrays(blocks)
    args = (a["B"], a["scales"])
    with pytest.raises(UnsupportedBlocks, match="factors"):
        read_nibbles(*args, a["zero_points"], a["offsets"], np.array([1, 15], np.float32), 2 * K, 64)
    shifted = read_nibbles(*args, a["zero_points"] + np.uint8(0x01), a["offsets"], np.array([1, 16], np.float32),
                           2 * K, 64)
    assert shifted.zero_points[0, 0] == 17 and not np.array_equal(shifted.dequantize(), want)
    no_zp = read_nibbles(*args, None, a["offsets"], np.array([1, 16], np.float32), 2 * K, 64)
    assert not np.array_equal(no_zp.dequantize(), want)  # MatMulNBits' default 4-bit zero point is 8, not 0


def test_only_8bit_codes_and_exact_offsets_have_a_nibble_form():
    four, _ = _blocks("Q4_0")
    with pytest.raises(UnsupportedBlocks, match="8-bit"):
        nibble_arrays(four)
    q5k, _ = _blocks("Q5_K")
    both = q5k.__class__(q5k.codes, q5k.scales, np.full_like(q5k.zero_points, 16), q5k.offsets, 8, q5k.block_size)
    with pytest.raises(UnsupportedBlocks, match="both a zero point and an offset"):
        nibble_arrays(both)
