"""Tests for scripts/convert/attention_scale.py: the attention scale folded into the query projection gives the same
logits (bit-identical: the factor is a power of two) on real builder graphs, INT4 and FP32; what cannot be folded
exactly is left as built, with the reason."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, TensorProto

from scripts.convert.attention_scale import _scale_features, fold, fold_attention_scale
from scripts.proof.measure import run_worker
from tests.conftest import _isolated_env, _run


def _gqa_scales(folder):
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [helper.get_attribute_value(a) for n in graph.node if n.op_type == "GroupQueryAttention"
            for a in n.attribute if a.name == "scale"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_hf_model, tiny_onnx_model):
    root = tmp_path_factory.mktemp("fold")
    fp32 = root / "fp32"
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(tiny_hf_model), "-o", str(fp32),
          "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], _isolated_env(root / "home"), "Converting")
    return {"int4": tiny_onnx_model, "fp32": fp32}


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_folded_graph_gives_the_same_logits(builds, tmp_path, precision):
    original = builds[precision]
    folded_dir = tmp_path / precision
    shutil.copytree(original, folded_dir)
    assert set(_gqa_scales(original)) <= {0.0, 0.25}  # head size 16: 1/4 (0 = the default, 1/sqrt(head size))
    folded, skipped = fold_attention_scale(folded_dir)
    assert folded == 2 and skipped == []  # the tiny model's 2 layers
    assert _gqa_scales(folded_dir) == [1.0, 1.0]
    window = {"kind": "logits", "windows": [list(range(3, 60))]}
    a, b = (run_worker("genai", d, [window])["jobs"][0]["windows"][0] for d in (original, folded_dir))
    assert a["argmax"] == b["argmax"]
    np.testing.assert_array_equal(a["nll"], b["nll"])
    assert fold_attention_scale(folded_dir) == (0, [])  # already folded: nothing to do, nothing rewritten


def test_scale_features_takes_the_query_rows_in_each_layout():
    flat = np.arange(12, dtype=np.float32)  # MatMulNBits scales [N * blocks]: N = 6 features, 2 blocks each
    assert _scale_features(flat, 6, 2, 0.5).tolist() == [0, 0.5, 1, 1.5] + list(range(4, 12))
    two_d = np.ones((6, 2), dtype=np.float32)
    assert _scale_features(two_d, 6, 2, 0.25)[:, 0].tolist() == [0.25, 0.25, 1, 1, 1, 1]
    weight = np.ones((3, 6), dtype=np.float32)  # float MatMul [K, N]: features are columns
    assert _scale_features(weight, None, 2, 0.5)[0].tolist() == [0.5, 0.5, 1, 1, 1, 1]
    assert flat[1] == 1  # the input is not modified


def _toy(scale: float, shared: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((8, 24), dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sk", "tl"], ["y", "k", "v"],
                              domain="com.microsoft", num_heads=2, kv_num_heads=1, scale=scale)]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["other"]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph)


def test_what_cannot_be_folded_exactly_is_left_with_the_reason():
    model = _toy(scale=1 / 3)
    assert fold(model, head_size=6)[0] == 0 and "not a power of two" in fold(model, head_size=6)[1][0]
    shared = _toy(scale=0.5, shared=True)
    count, why = fold(shared, head_size=4)
    assert count == 0 and "shared with other nodes" in why[0]
    ok = _toy(scale=0.5)
    assert fold(ok, head_size=4) == (1, [])
    w = numpy_helper.to_array(ok.graph.initializer[0])
    assert (w[:, :8] == 0.5).all() and (w[:, 8:] == 1).all()  # 2 query heads × 4: the key and value columns untouched
