"""Tests for scripts/convert/gguf_exact.py (and graph_check.verify_exact): tiny GGUFs of each block type, written by
the test, dequantized by transformers and built by the GenAI builder (INT4 rtn, shared embedding); after the rewrite the
ONNX logits equal the dequantized FP32 model's at accuracy level 1, every weight verifies bit for bit, and a weight
that is not the GGUF's is named."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from scripts.convert.attention_scale import fold
from scripts.convert.gguf_exact import node_projections, read_exact_weights, rewrite
from scripts.convert.graph_check import verify_exact
from scripts.sources.gguf import KEPT_GGUF, dequantize
from tests.conftest import _isolated_env, _run
from tests.gguf_writer import make_tiny_gguf

INT4_SHARED = ["-p", "int4", "--extra_options", "int4_block_size=32", "int4_is_symmetric=true", "int4_algo_config=rtn",
               "shared_embeddings=true"]
K_SHAPE = {"hidden": 256, "intermediate": 512}
CASES = {  # name: (type of every matrix, per-tensor types, tiny_llama shape)
    "Q4_0": ("Q4_0", None, {}),
    "Q4_1": ("Q4_1", None, {}),
    "Q8_0": ("Q8_0", None, {}),
    "Q4_1+Q8_0-embedding": ("Q4_1", {"token_embd.weight": "Q8_0"}, {}),
    "Q4_K": ("Q4_K", None, K_SHAPE),
    "Q6_K": ("Q6_K", None, K_SHAPE),
    "Q4_K_M-like": ("Q4_K", {"blk.0.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K",
                             "token_embd.weight": "Q6_K"}, K_SHAPE),
}


def build_case(root, name):
    """(GGUF path, dequantized HF folder, builder INT4 folder) of one case."""
    qtype, types, shape = CASES[name]
    gguf_path, _, _ = make_tiny_gguf(root / "m.gguf", qtype, types=types, **shape)
    hf = root / "hf"
    dequantize(gguf_path, hf)
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(root / "int4"), "-e",
          "cpu", "-c", str(root / "cache")] + INT4_SHARED, _isolated_env(root / "home"), "Converting")
    return gguf_path, hf, root / "int4"


def ort_logits(model: onnx.ModelProto, ids: list[int], config) -> np.ndarray:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    head = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, config.num_key_value_heads, 0, head), np.float32)
    return session.run(["logits"], feeds)[0][0]


def torch_logits(hf, ids):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model.config


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(tmp_path_factory.mktemp(request.param.replace("+", "_")), request.param)


def test_exact_graph_computes_the_dequantized_model(case):
    gguf_path, hf, built = case
    ids = list(range(5, 45))
    want, config = torch_logits(hf, ids)
    model = onnx.load(str(built / "model.onnx"))
    weights = read_exact_weights(gguf_path)
    report = rewrite(model, weights, accuracy_level=1)
    assert report.nodes == 2 * 5 + 1  # per layer: qkv_proj (packed), o_proj, gate_proj, up_proj, down_proj; lm_head
    assert verify_exact(model, weights) == []
    # every node on the fast float 4-bit kernel: 8-bit codes as nibbles (scripts/convert/nibble_matmul.py)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert {(a["bits"], a["accuracy_level"]) for a in attrs} == {(4, 1)}
    eight_bit = [n.name for n in nodes if max(weights[k].bits for k in node_projections(n.name, "lm_head" not in weights)) == 8]
    assert sorted(n.name for n in nodes if "/nibble/" in n.input[0]) == sorted(eight_bit)
    assert report.nibble_nodes == len(eight_bit)
    got = ort_logits(model, ids, config)
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) < 2e-5 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # one table: the embedding reads the tied LM head's codes, nothing float is left
    tables = {tuple(i.dims) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert not tables & {(config.vocab_size, config.hidden_size), (config.hidden_size, config.vocab_size)}
    assert sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node) == 1


def test_fold_after_rewrite_stays_exact(case):
    gguf_path, hf, built = case
    model = onnx.load(str(built / "model.onnx"))
    weights = read_exact_weights(gguf_path)
    rewrite(model, weights, accuracy_level=1)
    ids = list(range(3, 30))
    _, config = torch_logits(hf, ids)
    before = ort_logits(model, ids, config)
    head = config.hidden_size // config.num_attention_heads
    folded, skipped = fold(model, head)
    assert folded == config.num_hidden_layers and not skipped
    assert verify_exact(model, weights, query_factor=1 / np.sqrt(head)) == []
    np.testing.assert_allclose(ort_logits(model, ids, config), before, rtol=1e-5, atol=1e-5)


def test_a_weight_that_is_not_the_ggufs_is_named(case):
    gguf_path, _, built = case
    model = onnx.load(str(built / "model.onnx"))
    weights = read_exact_weights(gguf_path)
    rewrite(model, weights, accuracy_level=1)
    scales = next(i for i in model.graph.initializer if i.name.startswith("model.layers.1.mlp.up_proj")
                  and i.name.endswith("weight_scale"))
    array = numpy_helper.to_array(scales).copy()
    array[0, 0] *= 1.001
    scales.CopyFrom(numpy_helper.from_array(array, scales.name))
    problems = verify_exact(model, weights)
    assert len(problems) == 1 and "layers.1.up_proj" in problems[0]


def test_a_nibble_head_that_is_not_the_ggufs_is_named(case):
    """The 8-bit LM head read as nibbles: one code byte changed, or the input read as [x, 15·x], is named."""
    gguf_path, _, built = case
    weights = read_exact_weights(gguf_path)
    if weights["embed_tokens"].bits != 8:
        pytest.skip("a 4-bit LM head: no nibble form")
    for corrupt in ("code", "factors"):
        model = onnx.load(str(built / "model.onnx"))
        rewrite(model, weights, accuracy_level=1)
        head = next(n for n in model.graph.node if n.name.startswith("/lm_head/"))
        producers = {o: n for n in model.graph.node for o in n.output}
        name = head.input[1] if corrupt == "code" else producers[producers[head.input[0]].input[0]].input[1]
        tensor = next(i for i in model.graph.initializer if i.name == name)
        array = numpy_helper.to_array(tensor).copy().reshape(-1)
        if corrupt == "code":  # one high nibble (the code ±16) in row 0's first block with a nonzero scale
            table = weights["embed_tokens"]
            array[int(np.flatnonzero(table.scales[0])[0]) * table.block_size + 1] ^= np.uint8(0x10)
        else:
            array[1] = 15.0
        array = array.reshape(numpy_helper.to_array(tensor).shape)
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        problems = verify_exact(model, weights)
        assert len(problems) == 1 and problems[0].startswith("/lm_head/") and "embed_tokens" in problems[0], problems


def test_at_level_4_eight_bit_codes_stay_8_bit_and_exact(case):
    gguf_path, _, built = case
    model = onnx.load(str(built / "model.onnx"))
    weights = read_exact_weights(gguf_path)
    report = rewrite(model, weights, accuracy_level=4)
    assert report.nibble_nodes == 0 and verify_exact(model, weights) == []


def test_the_dequantized_folder_keeps_its_gguf(case):
    gguf_path, hf, _ = case
    assert (hf / KEPT_GGUF).read_bytes() == gguf_path.read_bytes()


def test_builder_requantization_is_what_exact_replaces(tmp_path):
    """The point of the route: the builder's own INT4 of a Q4_1 GGUF is not the GGUF (a second rounding)."""
    gguf_path, hf, built = build_case(tmp_path, "Q4_1")
    model = onnx.load(str(built / "model.onnx"))
    problems = verify_exact(model, read_exact_weights(gguf_path))
    assert len(problems) >= 5
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)

