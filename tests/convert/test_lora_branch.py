"""Tests for scripts/convert/lora_branch.py: a LoRA kept as its own branch computes what the merged model computes —
on an FP32 builder graph of a float source, and beside a GGUF's exact blocks (:mod:`scripts.convert.gguf_exact`) at
accuracy level 1 — and its 8-bit form stays close while taking less room."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from scripts.convert.gguf_exact import read_exact_weights, rewrite
from scripts.convert.graph_check import summarise_graph, verify_exact
from scripts.convert.lora_branch import (add_branches, builder_layout, layout_from_shapes, node_branches,
                                         quantize_8bit, read_adapter)
from tests.conftest import _isolated_env, _run
from tests.convert.test_gguf_exact import build_case, ort_logits

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(hf, out, seed: int = 0):
    """A rank-4 LoRA on every projection with random (non-zero) B, saved as PEFT does; and the merged model's logits
    function."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(out))
    merged = peft_model.merge_and_unload().eval()

    def logits(ids):
        with torch.no_grad():
            return merged(torch.tensor([ids])).logits[0].numpy()
    return logits, merged.config


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0"])  # Q8_0: every projection read as nibbles (nibble_matmul)
def gguf_case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("branch")
    gguf_path, hf, built = build_case(root, request.param)
    merged_logits, config = make_adapter(hf, root / "adapter")
    return gguf_path, hf, built, root / "adapter", merged_logits, config


def test_branch_beside_exact_gguf_blocks_equals_the_merged_fp32_model(gguf_case):
    gguf_path, _, built, adapter, merged_logits, config = gguf_case
    model = onnx.load(str(built / "model.onnx"))
    weights = read_exact_weights(gguf_path)
    pairs, scale = read_adapter(adapter)
    nodes = sorted({f"layers.{i}.{p}" for i in range(config.num_hidden_layers)
                    for p in ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")})
    branches = node_branches(pairs, scale, layout_from_shapes({k: v.shape for k, v in weights.items()}, nodes))
    report = rewrite(model, weights, accuracy_level=1, branches=branches)
    assert report.branch_nodes == len(nodes)
    assert report.nibble_nodes == (len(nodes) + 1 if weights["layers.0.o_proj"].bits == 8 else 0)
    assert verify_exact(model, weights) == []  # the base is still exactly the GGUF's
    ids = list(range(4, 40))
    want = merged_logits(ids)
    got = ort_logits(model, ids, config)
    assert float(np.abs(got - want).max()) < 2e-5 * float(np.abs(want).max())
    assert summarise_graph_float_matmuls(model) == 0  # branch MatMuls are side terms, not float weights


def summarise_graph_float_matmuls(model, tmp=None) -> int:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, str(Path(d) / "m.onnx"), save_as_external_data=True, location="m.data")
        return summarise_graph(Path(d) / "m.onnx").float_matmuls


def test_branch_on_a_float_builder_graph_equals_the_merged_model(gguf_case, tmp_path):
    _, hf, _, adapter, merged_logits, config = gguf_case
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp_path / "fp32"), "-e",
          "cpu", "-c", str(tmp_path / "cache"), "-p", "fp32"], _isolated_env(tmp_path / "home"), "Converting")
    model = onnx.load(str(tmp_path / "fp32" / "model.onnx"))
    pairs, scale = read_adapter(adapter)
    assert add_branches(model, node_branches(pairs, scale, builder_layout(model))) == 5 * config.num_hidden_layers
    ids = list(range(4, 40))
    want = merged_logits(ids)
    np.testing.assert_allclose(ort_logits(model, ids, config), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_eight_bit_branch_is_close_and_smaller(gguf_case):
    gguf_path, _, built, adapter, merged_logits, config = gguf_case
    weights = read_exact_weights(gguf_path)
    pairs, scale = read_adapter(adapter)
    nodes = sorted({f"layers.{i}.{p}" for i in range(config.num_hidden_layers)
                    for p in ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")})
    branches = node_branches(pairs, scale, layout_from_shapes({k: v.shape for k, v in weights.items()}, nodes))
    sizes = {}
    for bits in (32, 16, 8):
        model = onnx.load(str(built / "model.onnx"))
        rewrite(model, weights, accuracy_level=1, branches=branches, branch_bits=bits)
        sizes[bits] = sum(len(i.raw_data) for i in model.graph.initializer if ".lora_" in i.name)
        ids = list(range(4, 40))
        want = merged_logits(ids)
        got = ort_logits(model, ids, config)
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
        tolerance = {32: 2e-5, 16: 2e-3, 8: 2e-2}[bits]
        assert float(np.abs(got - want).max()) < tolerance * float(np.abs(want).max())
    assert sizes[8] < sizes[32] and sizes[16] < sizes[32]  # rank 4: padding to 16 eats most of 8-bit's gain


def test_quantize_8bit_round_trip():
    w = np.random.default_rng(0).standard_normal((48, 20)).astype(np.float32)
    blocks = quantize_8bit(w)
    assert blocks.block_size == 16 and blocks.bits == 8
    np.testing.assert_allclose(blocks.dequantize().T, w, atol=float(np.abs(w).max()) / 127)
