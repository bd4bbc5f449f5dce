"""Tests for scripts/convert/graph_check.py: reading quantization facts from ONNX graphs and checking them against a recipe."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from scripts.core.errors import GraphCheckError
from scripts.convert.graph_check import GraphSummary, QuantNode, summarise_graph, verify_quantization
from scripts.recipe.spec import Conversion, Quantization


def conversion(precision="int4", block_size=32, symmetric=True, accuracy_level=4) -> Conversion:
    # the fixture's graph is the builder's default: logits for every position (no prune_lm_head)
    return Conversion(precision, Quantization(block_size, symmetric, accuracy_level, "default"), prune_lm_head=False)


@pytest.fixture(scope="module")
def tiny_summary(tiny_onnx_model) -> GraphSummary:
    return summarise_graph(tiny_onnx_model / "model.onnx")


# ----- the fixture's real graph (model builder defaults: int4, block 32, symmetric, accuracy level 4) -------------
def test_summary_of_tiny_model(tiny_summary):
    matmuls = [n for n in tiny_summary.quant_nodes if n.op_type == "MatMulNBits"]
    assert tiny_summary.op_counts["MatMulNBits"] == len(matmuls) > 0
    # 2 layers: attention in/out and MLP projections, plus the lm_head, are all quantized
    assert len(matmuls) >= 2 * 3 + 1
    assert tiny_summary.float_matmuls == 0
    assert {n.bits for n in matmuls} == {4}
    assert {n.block_size for n in matmuls} == {32}
    assert {n.accuracy_level for n in matmuls} == {4}
    assert {n.has_zero_points for n in matmuls} == {False}
    assert all(n.name for n in matmuls)
    assert tiny_summary.describe().startswith(f"{len(tiny_summary.quant_nodes)} quantized nodes (bits [4], "
                                              "block_size [32], accuracy_level [4], zero points [False]); "
                                              "0 float MatMul")


def test_matching_settings_pass(tiny_summary):
    verify_quantization(tiny_summary, conversion(), "model.onnx")


def test_different_block_size_fails_naming_block_size(tiny_summary):
    n = len(tiny_summary.quant_nodes)
    with pytest.raises(GraphCheckError) as info:
        verify_quantization(tiny_summary, conversion(block_size=64), "build/onnx/model.onnx")
    message = str(info.value)
    assert message.startswith("build/onnx/model.onnx: the converted graph does not match the recipe:")
    assert f"block_size: asked 64, found [32] in {n} of {n} MatMulNBits nodes" in message
    assert "accuracy_level" not in message and "zero points" not in message
    assert "Olive accepted an option it did not apply" in message


def test_asymmetric_and_accuracy_level_mismatches_are_all_reported(tiny_summary):
    with pytest.raises(GraphCheckError) as info:
        verify_quantization(tiny_summary, conversion(symmetric=False, accuracy_level=1), "m")
    message = str(info.value)
    assert "accuracy_level: asked 1, found [4]" in message
    assert "zero points (asymmetric): asked True, found [False]" in message
    assert "block_size" not in message


def test_fp32_asked_but_graph_quantized(tiny_summary):
    with pytest.raises(GraphCheckError, match=r"fp32 was asked but the graph has \d+ quantized nodes"):
        verify_quantization(tiny_summary, conversion("fp32"), "m")


# ----- hand-made graphs and summaries ----------------------------------------------------------------------------
def save_graph(path: Path, nodes) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_summarise_hand_made_graph(tmp_path):
    path = save_graph(tmp_path / "model.onnx", [
        helper.make_node("MatMulNBits", ["A", "B", "S", "ZP"], ["Y1"], name="mm_asym", domain="com.microsoft",
                         bits=4, block_size=64, accuracy_level=0, K=8, N=8),
        helper.make_node("MatMulNBits", ["A", "B", "S", ""], ["Y2"], name="mm_sym", domain="com.microsoft",
                         bits=4, block_size=64, K=8, N=8),
        helper.make_node("GatherBlockQuantized", ["D", "I", "S2"], ["E"], name="embed", domain="com.microsoft",
                         block_size=32),
        helper.make_node("MatMul", ["A", "W"], ["Y"], name="float_mm"),
    ])
    summary = summarise_graph(path)
    by_name = {n.name: n for n in summary.quant_nodes}
    assert by_name["mm_asym"] == QuantNode("mm_asym", "MatMulNBits", 4, 64, 0, True)
    assert by_name["mm_sym"] == QuantNode("mm_sym", "MatMulNBits", 4, 64, None, False)  # empty input = no zp
    assert by_name["embed"] == QuantNode("embed", "GatherBlockQuantized", 4, 32, None, False)
    assert summary.float_matmuls == 1
    assert summary.op_counts == {"MatMulNBits": 2, "GatherBlockQuantized": 1, "MatMul": 1}


def test_int4_asked_but_graph_is_float():
    summary = GraphSummary({"MatMul": 5}, (), 5)
    assert summary.describe() == "no quantized nodes; 5 float MatMul"
    with pytest.raises(GraphCheckError, match=r"int4 was asked but the graph has no MatMulNBits node"):
        verify_quantization(summary, conversion(), "m")
    verify_quantization(summary, conversion("fp32"), "m")  # fp32 and float graph: fine


def test_partial_mismatch_counts_and_names_an_example():
    nodes = (QuantNode("a", "MatMulNBits", 4, 32, 4, False), QuantNode("b", "MatMulNBits", 4, 128, 4, False),
             QuantNode("c", "MatMulNBits", 8, 32, 4, False))
    summary = GraphSummary({"MatMulNBits": 3}, nodes, 0)
    with pytest.raises(GraphCheckError) as info:
        verify_quantization(summary, conversion(), "m")
    message = str(info.value)
    assert "block_size: asked 32, found [128] in 1 of 3 MatMulNBits nodes (e.g. b)" in message
    assert "bits: asked 4, found [8] in 1 of 3 MatMulNBits nodes (e.g. c)" in message


def test_asymmetric_graph_matches_asymmetric_recipe():
    nodes = (QuantNode("a", "MatMulNBits", 4, 32, 4, True),)
    verify_quantization(GraphSummary({"MatMulNBits": 1}, nodes, 0), conversion(symmetric=False), "m")
    with pytest.raises(GraphCheckError, match=r"zero points \(asymmetric\): asked False, found \[True\]"):
        verify_quantization(GraphSummary({"MatMulNBits": 1}, nodes, 0), conversion(symmetric=True), "m")


def mixed_conversion(eight_bit=("lm_head", "down_proj"), block=32, symmetric=False) -> Conversion:
    return Conversion("int4", Quantization(block, symmetric, 4, "default", eight_bit=eight_bit, eight_bit_block_size=64))


def test_mixed_int4_expects_eight_bit_groups_at_their_own_bits_and_block():
    nodes = (QuantNode("/model/layers.0/attn/qkv_proj/MatMul_Q4", "MatMulNBits", 4, 32, 4, True),
             QuantNode("/model/layers.0/mlp/down_proj/MatMul_Q8", "MatMulNBits", 8, 64, 4, False),
             QuantNode("/lm_head/MatMul_Q8", "MatMulNBits", 8, 64, 4, False))
    verify_quantization(GraphSummary({"MatMulNBits": 3}, nodes, 0), mixed_conversion(), "m")
    # a plain INT4 recipe refuses the same graph (its 8-bit nodes were not asked for)
    with pytest.raises(GraphCheckError, match=r"bits: asked 4, found \[8\] in 2 of 3"):
        verify_quantization(GraphSummary({"MatMulNBits": 3}, nodes, 0), mixed_conversion(()), "m")


def test_mixed_int4_names_a_group_left_at_four_bits_and_a_group_missing():
    nodes = (QuantNode("/model/layers.0/mlp/down_proj/MatMul_Q4", "MatMulNBits", 4, 32, 4, True),
             QuantNode("/model/layers.0/mlp/up_proj/MatMul_Q4", "MatMulNBits", 4, 32, 4, True))
    with pytest.raises(GraphCheckError) as info:
        verify_quantization(GraphSummary({"MatMulNBits": 2}, nodes, 0), mixed_conversion(), "m")
    message = str(info.value)
    assert "8-bit groups: bits: asked 8, found [4] in 1 of 1 MatMulNBits nodes (e.g. /model/layers.0/mlp/down_proj" \
        in message
    assert "eight_bit: asked lm_head at 8 bits, found no such quantized node" in message
