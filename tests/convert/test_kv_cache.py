"""Tests for scripts/convert/kv_cache.py: per-channel scales (rotary pairs bounded by their norm), the int8-cache
rewrite of a real builder graph run by ONNX Runtime GenAI (close to the float cache, and really quantized: scales far
too small saturate it), and the refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from scripts.convert.kv_cache import (GQA, KvCacheError, KvScales, apply, cache_names, calibration_ids, channel_scales,
                                      quantize_kv_cache)
from scripts.proof.measure import run_worker


def test_channel_scales_are_each_channels_largest_magnitude_over_127():
    x = np.zeros((1, 2, 3, 4), np.float32)  # [batch, kv_heads, tokens, head_size]
    x[0, 0, :, 0] = [1.0, -2.54, 0.5]
    x[0, 1, 2, 3] = 12.7
    s = channel_scales(x)
    assert s.shape == (8,) and s.dtype == np.float32
    assert s[0] == pytest.approx(2.54 / 127) and s[7] == pytest.approx(0.1)
    assert s[1] == pytest.approx(1e-8 / 127)  # never non-zero: the smallest positive scale, never 0


@pytest.mark.parametrize("layout, partner", [("half", 2), ("interleaved", 1)])
def test_rotary_pairs_share_the_pairs_largest_norm(layout, partner):
    x = np.zeros((1, 1, 2, 4), np.float32)
    x[0, 0, 0, 0], x[0, 0, 0, partner] = 3.0, 4.0  # one token: the pair (0, partner) has norm 5
    s = channel_scales(x, layout)
    assert s[0] == pytest.approx(5 / 127) and s[partner] == pytest.approx(5 / 127)
    assert channel_scales(x)[0] == pytest.approx(3 / 127)  # per channel alone: a rotation could leave the range


def _logits(folder):
    window = {"kind": "logits", "windows": [list(range(3, 60))]}
    return run_worker("genai", folder, [window])["jobs"][0]["windows"][0]


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory, tiny_onnx_model):
    folder = tmp_path_factory.mktemp("kv") / "int8"
    shutil.copytree(tiny_onnx_model, folder)
    assert quantize_kv_cache(folder) == 2  # the tiny model's 2 layers
    return folder


def test_int8_cache_graph_runs_in_genai_close_to_the_float_cache(int8_build, tiny_onnx_model):
    graph = onnx.load(str(int8_build / "model.onnx"), load_external_data=False).graph
    config = json.loads((int8_build / "genai_config.json").read_text())
    names = set(sum(cache_names(config), []))
    cache = [v for v in list(graph.input) + list(graph.output) if v.name in names]
    assert len(cache) == 8 and all(v.type.tensor_type.elem_type == TensorProto.INT8 for v in cache)
    gqa = [n for n in graph.node if n.op_type == GQA]
    assert all(len(n.input) == 14 and {a.name for a in n.attribute} >= {"k_quant_type", "kv_cache_bit_width"}
               for n in gqa)
    ref, got = _logits(tiny_onnx_model), _logits(int8_build)
    agree = np.mean(np.asarray(ref["argmax"]) == np.asarray(got["argmax"]))
    assert agree >= 0.9, f"top-1 agreement with the float cache {agree:.2f}"
    assert np.abs(np.asarray(ref["nll"]) - np.asarray(got["nll"])).mean() < 0.05


def test_the_cache_is_really_int8_scales_far_too_small_saturate_it(tmp_path, tiny_onnx_model):
    folder = tmp_path / "tiny-scales"
    shutil.copytree(tiny_onnx_model, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    width = config["model"]["decoder"]["num_key_value_heads"] * config["model"]["decoder"]["head_size"]
    tiny = [np.full(width, 1e-6, np.float32)] * 2
    apply(model, config, KvScales(tiny, tiny))
    onnx.save(model, str(folder / "model.onnx"))
    ref, got = _logits(tiny_onnx_model), _logits(folder)
    assert np.abs(np.asarray(ref["nll"]) - np.asarray(got["nll"])).mean() > 0.05


def test_refusals_say_what_to_do(int8_build, tiny_onnx_model):
    config = json.loads((int8_build / "genai_config.json").read_text())
    model = onnx.load(str(int8_build / "model.onnx"), load_external_data=False)
    width = config["model"]["decoder"]["num_key_value_heads"] * config["model"]["decoder"]["head_size"]
    ones = [np.ones(width, np.float32)] * 2
    with pytest.raises(KvCacheError, match="already has a quantized cache"):
        apply(model, config, KvScales(ones, ones))
    plain = onnx.load(str(tiny_onnx_model / "model.onnx"), load_external_data=False)
    with pytest.raises(KvCacheError, match="1 calibrated layers for 2"):
        apply(plain, config, KvScales(ones[:1], ones[:1]))
    for node in plain.graph.node:
        if node.op_type == GQA:
            node.op_type = "MultiHeadAttention"
    with pytest.raises(KvCacheError, match='set conversion.kv_cache to "float"'):
        apply(plain, config, KvScales(ones, ones))


def test_calibration_ids_fit_the_context(tiny_onnx_model):
    config = json.loads((tiny_onnx_model / "genai_config.json").read_text())
    ids = calibration_ids(tiny_onnx_model, {**config, "model": {**config["model"], "context_length": 100}})
    assert len(ids) == 100
