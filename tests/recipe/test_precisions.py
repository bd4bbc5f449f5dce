"""Tests for scripts/recipe/precisions.py and the precision handling in recipes, the Olive workflow and the graph check
(all pure or on tiny hand-made graphs; the real conversions are in tests/test_compare.py)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from scripts.core.errors import ConversionError, GraphCheckError, RecipeError
from scripts.convert.graph_check import GraphSummary, QuantNode, verify_quantization
from scripts.convert.olive import olive_config, reconcile_genai_outputs
from scripts.recipe.precisions import EMBED_GATHER, LM_HEAD, TutorialFormError, smallest_precision, translate_tutorial_conversion
from scripts.recipe.load import parse_recipe
from scripts.recipe.spec import Conversion, Quantization


def recipe_doc(tmp_path: Path, conversion: dict) -> dict:
    (tmp_path / "hf").mkdir(exist_ok=True)
    return {"model": {"source": "hf", "family": "chatml"}, "conversion": conversion,
            "foundry": {"name": "t"}}


def conv(precision="int4", block=32, sym=True, acc=4, algo="default", emb=False, head=True) -> Conversion:
    return Conversion(precision, Quantization(block, sym, acc, algo, emb, head))


# ----- recipes ---------------------------------------------------------------------------------------------------
def test_fp16_is_refused_on_load_with_the_reason_and_alternatives(tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_doc(tmp_path, {"precision": "fp16"}), tmp_path / "r.json")
    message = str(info.value)
    assert "conversion.precision: 'fp16' refused" in message
    assert "FP16 is for GPU targets" in message and "FP16 is not supported on CPU" in message
    assert '"int8"' in message and '"int4"' in message and '"fp32"' in message


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4", "auto"])
def test_other_precisions_load(tmp_path, precision):
    r = parse_recipe(recipe_doc(tmp_path, {"precision": precision}), tmp_path / "r.json")
    assert r.conversion.precision == precision and r.conversion.auto_threshold == 0.98


def test_int8_refuses_int4_only_algorithms(tmp_path):
    with pytest.raises(RecipeError, match="k_quant_mixed.*INT4 algorithm"):
        parse_recipe(recipe_doc(tmp_path, {"precision": "int8", "quantization": {"algorithm": "k_quant_mixed"}}),
                     tmp_path / "r.json")


def test_tutorial_form_is_translated_with_notes(tmp_path):
    tutorial = {"type": "ModelBuilder", "config": {"precision": "int4",
                                                   "quantization_config": {"block_size": 128, "is_symmetric": False}}}
    r = parse_recipe(recipe_doc(tmp_path, tutorial), tmp_path / "r.json")
    ours = parse_recipe(recipe_doc(tmp_path, {"precision": "int4", "quantization": {"block_size": 128,
                                                                                     "symmetric": False}}),
                        tmp_path / "r.json")
    assert r.conversion == ours.conversion
    assert r.conversion.quantization.block_size == 128 and r.conversion.quantization.symmetric is False
    assert any("quantization_config.block_size → conversion.quantization.block_size = 128" in n for n in r.notes)
    assert any("Olive 0.13 ignores quantization_config" in n for n in r.notes)
    assert ours.notes == ()


def test_tutorial_form_unknown_key_is_an_error(tmp_path):
    doc = recipe_doc(tmp_path, {"config": {"precision": "int4", "quantization_config": {"blocksize": 64}}})
    with pytest.raises(RecipeError) as info:
        parse_recipe(doc, tmp_path / "r.json")
    assert "conversion.config.quantization_config.blocksize: unknown key" in str(info.value)
    assert "block_size" in str(info.value)


def test_tutorial_form_cannot_be_mixed_with_ours():
    with pytest.raises(TutorialFormError, match="cannot be combined"):
        translate_tutorial_conversion({"config": {"precision": "int4"}, "precision": "int8"})
    with pytest.raises(TutorialFormError, match="only \"ModelBuilder\""):
        translate_tutorial_conversion({"type": "OnnxQuantization", "config": {}})
    assert translate_tutorial_conversion({"config": {"int4_block_size": 64}}) == (
        {"quantization": {"block_size": 64}}, ["config.int4_block_size → conversion.quantization.block_size = 64"])


def test_tutorial_fp16_is_still_refused(tmp_path):
    with pytest.raises(RecipeError, match="FP16 is for GPU targets"):
        parse_recipe(recipe_doc(tmp_path, {"config": {"precision": "fp16"}}), tmp_path / "r.json")


# ----- Olive workflow --------------------------------------------------------------------------------------------
def test_fp16_never_reaches_olive(tmp_path):
    with pytest.raises(ConversionError, match="refused before building"):
        olive_config(conv("fp16"), tmp_path, tmp_path, tmp_path)


def test_int8_is_fp32_builder_then_8bit_rtn_pass(tmp_path):
    passes = olive_config(conv("int8", block=64, sym=False, acc=1), tmp_path, tmp_path, tmp_path)["passes"]
    assert list(passes) == ["builder", "rtn8"]
    assert passes["builder"] == {"type": "ModelBuilder", "precision": "fp32",
                                 "extra_options": {"prune_lm_head": True, "shared_embeddings": False}}
    assert passes["rtn8"] == {"type": "OnnxBlockWiseRtnQuantization", "bits": 8, "block_size": 64,
                              "is_symmetric": False, "accuracy_level": 1, "nodes_to_exclude": [EMBED_GATHER]}
    with_emb = olive_config(conv("int8", emb=True), tmp_path, tmp_path, tmp_path)["passes"]["rtn8"]
    assert "nodes_to_exclude" not in with_emb
    no_head = olive_config(conv("int8", emb=True, head=False), tmp_path, tmp_path, tmp_path)["passes"]["rtn8"]
    assert no_head["nodes_to_exclude"] == [LM_HEAD]


def test_int4_embeddings_add_a_gather_only_pass(tmp_path):
    passes = olive_config(conv("int4", block=128, emb=True), tmp_path, tmp_path, tmp_path)["passes"]
    assert passes["embed4"] == {"type": "OnnxBlockWiseRtnQuantization", "bits": 4, "block_size": 128,
                                "is_symmetric": True, "accuracy_level": 4, "nodes_to_include": [EMBED_GATHER]}
    assert passes["builder"]["int4_block_size"] == 128
    plain = olive_config(conv("int4"), tmp_path, tmp_path, tmp_path)["passes"]
    assert list(plain) == ["builder"]
    head = olive_config(conv("int4", head=False), tmp_path, tmp_path, tmp_path)["passes"]["builder"]
    assert head["int4_nodes_to_exclude"] == [LM_HEAD]


def test_unresolved_auto_never_reaches_olive(tmp_path):
    with pytest.raises(ConversionError, match="auto"):
        olive_config(conv("auto"), tmp_path, tmp_path, tmp_path)


def test_genai_config_follows_outputs_renamed_by_the_rtn_pass(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits_Q8"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits_Q8", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    cfg = {"model": {"decoder": {"filename": "model.onnx", "inputs": {"input_ids": "input_ids"},
                                 "outputs": {"logits": "logits", "present_key_names": "present.%d.key"}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    assert reconcile_genai_outputs(tmp_path) == ["outputs.logits: logits → logits_Q8"]
    outputs = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["outputs"]
    assert outputs == {"logits": "logits_Q8", "present_key_names": "present.%d.key"}
    assert reconcile_genai_outputs(tmp_path) == []


# ----- graph check -----------------------------------------------------------------------------------------------
def summary(bits=8, block=32, gather=True, float_names=()) -> GraphSummary:
    nodes = [QuantNode(f"/model/layers.0/mlp/MatMul_Q{bits}", "MatMulNBits", bits, block, 4, False),
             QuantNode(f"/lm_head/MatMul_Q{bits}", "MatMulNBits", bits, block, 4, False)]
    if gather:
        nodes.append(QuantNode(f"/model/embed_tokens/Gather_Q{bits}", "GatherBlockQuantized", bits, block, None,
                               False))
    return GraphSummary({"MatMulNBits": 2}, tuple(nodes), len(float_names), {"UINT8": 100, "FLOAT": 10},
                        tuple(float_names), 0 if gather else 1)


def test_int8_graph_passes_and_int4_request_fails_on_bits():
    verify_quantization(summary(), conv("int8", emb=True), "m")
    with pytest.raises(GraphCheckError, match=r"bits: asked 4, found \[8\]"):
        verify_quantization(summary(), conv("int4", emb=True), "m")


def test_embedding_request_is_checked_in_the_graph():
    with pytest.raises(GraphCheckError, match="embeddings: asked quantized, found no GatherBlockQuantized"):
        verify_quantization(summary(gather=False), conv("int8", emb=True), "m")
    with pytest.raises(GraphCheckError, match="embeddings: asked float, found 1 GatherBlockQuantized"):
        verify_quantization(summary(), conv("int8", emb=False), "m")
    wrong_gather = QuantNode("/model/embed_tokens/Gather_Q8", "GatherBlockQuantized", 8, 32, None, False)
    mixed = GraphSummary({}, summary(block=64).quant_nodes[:2] + (wrong_gather,), 0)
    with pytest.raises(GraphCheckError, match="embeddings: asked 8-bit block 64, found 8-bit block 32"):
        verify_quantization(mixed, conv("int8", block=64, emb=True), "m")


def test_float_matmuls_left_behind_are_reported():
    with pytest.raises(GraphCheckError, match=r"1 MatMul node\(s\) left in float"):
        verify_quantization(summary(float_names=("/model/layers.0/attn/MatMul",)), conv("int8", emb=True), "m")
    with pytest.raises(GraphCheckError, match="lm_head: asked quantized, found float MatMul /lm_head/MatMul"):
        verify_quantization(summary(float_names=("/lm_head/MatMul",)), conv("int8", emb=True), "m")
    verify_quantization(summary(float_names=("/lm_head/MatMul",)), conv("int8", emb=True, head=False), "m")


# ----- the smallest precision that qualifies (compare) -----------------------------------------------------------
def test_auto_picks_the_smallest_within_the_threshold():
    winner, reasons = smallest_precision({"fp32": 1.0, "int8": 0.99, "int4": 0.95}, 0.98, {"fp16": "FP16 is for GPU: x"})
    assert winner == "int8"
    assert reasons[0].startswith("int4: eval accuracy 95.0 % = 95.0 % of FP32's 100.0 %, below the 98 % threshold")
    assert reasons[1].endswith("→ chosen (smallest that qualifies)")
    assert reasons[2] == "fp16: not tried (FP16 is for GPU)"
    assert reasons[3].endswith("(qualifies, but larger)")


def test_auto_takes_int4_when_it_qualifies_and_fp32_when_nothing_else_does():
    assert smallest_precision({"fp32": 0.9, "int8": 0.9, "int4": 0.89}, 0.98)[0] == "int4"
    assert smallest_precision({"fp32": 0.9, "int8": 0.5, "int4": None}, 0.98)[0] == "fp32"
    with pytest.raises(ValueError):
        smallest_precision({"int4": 1.0}, 0.98)


def test_smallest_precision_also_requires_fidelity_to_fp32():
    """On a real model exact answers can tie while the distribution drifts: fidelity misses disqualify."""
    accuracies = {"fp32": 1.0, "int8": 1.0, "int4": 1.0}
    winner, reasons = smallest_precision(accuracies, 0.98, None, {"int4": ["top-1 agreement 71.0 % < 90 %"], "int8": []})
    assert winner == "int8"
    assert "int4: eval accuracy 100.0 %" in reasons[0] and "fidelity to FP32 misses: top-1 agreement 71.0 %" in reasons[0]
    assert "fidelity to FP32 within the recipe's thresholds → chosen" in reasons[1]


def test_layer_kind_reads_builder_node_names():
    from scripts.recipe.precisions import layer_kind, matmul_names
    assert layer_kind("/model/layers.3/attn/qkv_proj/MatMul_Q4") == "qkv_proj"
    assert layer_kind("/model/layers.3/attn/v_proj/MatMul") == "qkv_proj"
    assert layer_kind("/model/layers.12/mlp/down_proj/MatMulNBits") == "down_proj"
    assert layer_kind("/lm_head/MatMul_Q8") == "lm_head"
    assert layer_kind("/model/embed_tokens/Gather_Q4") is None
    names = matmul_names(["o_proj", "up_proj"], 2)
    assert names == ["/model/layers.0/attn/o_proj/MatMul", "/model/layers.1/attn/o_proj/MatMul",
                     "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.1/mlp/up_proj/MatMul"]
    assert {layer_kind(n) for n in matmul_names(["qkv_proj", "lm_head"], 3)} == {"qkv_proj", "lm_head"}
