"""Tests for scripts/convert/builder_compat.py: the pinned GenAI builder's expectations of transformers 5 configs.
A tiny Gemma 3 (refused before: the 0.14.1 builder reads ``rope_local_base_freq``) converts through Olive, computes
the logits of its PyTorch original, and answers through Foundry Local."""
from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.convert import builder_compat
from scripts.proof.measure import run_worker
from tests.deploy_helper import deploy_doc


def test_the_gemma3_quirk_is_needed_with_the_pinned_transformers_and_derives_the_local_rope_base():
    from transformers import Gemma3TextConfig
    assert [q.attribute for q in builder_compat.missing()] == ["rope_local_base_freq"]
    config = Gemma3TextConfig(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert [q.derive(config) for q in builder_compat.CONFIG_ATTRIBUTES] == [1e4]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from scripts.sources.tiny import build_tiny_model
    root = tmp_path_factory.mktemp("gemma3")
    return build_tiny_model("gemma", root / "hf", architecture="Gemma3ForCausalLM"), root


def test_tiny_gemma3_converts_matches_pytorch_and_answers_through_foundry(tiny_gemma3):
    folder, root = tiny_gemma3
    doc = {"model": {"source": str(folder)}, "conversion": {"precision": "fp32"}, "foundry": {"name": "tiny-gemma3"},
           "generation": {"do_sample": False}}
    outcomes, out = deploy_doc(doc, root)
    assert "family: gemma (detected from Gemma3ForCausalLM" in out
    assert outcomes["check"]["result"]["listed"] is True and outcomes["check"]["result"]["answer"] is not None
    package = root / "build" / "recipe" / "package"  # the recipe is named after its file, recipe.json
    assert json.loads((package / "genai_config.json").read_text())["model"]["type"] == "gemma3_text"
    ids = list(range(3, 40))
    job = {"kind": "logits", "windows": [ids]}
    onnx = run_worker("genai", package, [job])["jobs"][0]["windows"][0]
    torch = run_worker("torch", folder, [job])["jobs"][0]["windows"][0]
    agreement = np.mean(np.asarray(onnx["argmax"]) == np.asarray(torch["argmax"]))
    assert agreement >= 0.95, agreement  # a wrong local RoPE base would scramble the sliding-window layers
    assert abs(np.mean(onnx["nll"]) - np.mean(torch["nll"])) < 0.05
