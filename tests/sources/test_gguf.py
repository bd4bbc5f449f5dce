"""Tests for scripts/sources/gguf.py and the ``gguf`` source kind: a tiny GGUF made here with the ``gguf`` package
is dequantized into a Hugging Face folder that computes the same logits; a GGUF of an architecture transformers
cannot read is refused before any tensor is read; the import is a Make-style step; and the folder deploys through
Olive and Foundry Local."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.core.errors import ModelSourceError, RecipeError
from scripts.pipeline import Pipeline
from scripts.commands.tune import source_weight_types
from scripts.recipe.load import parse_recipe
from scripts.sources.gguf import (check_architecture, dequantize, loadable_architectures, read_metadata,
                                  requantization_note, weight_types)
from tests.deploy_helper import deploy_doc
from tests.gguf_writer import make_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path, model, tokenizer = make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.F32.gguf")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def dequantized(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-chat"
    return out, dequantize(tiny_gguf[0], out)


def write_fake_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_dequantized_folder_is_a_complete_hf_model_with_the_same_logits(tiny_gguf, dequantized):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _path, original, _tok = tiny_gguf
    folder, result = dequantized
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["bos_token_id"] is not None and config["eos_token_id"] is not None
    assert result["architecture"] == "llama" and result["chat_template"] is True
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Who founded the orchard?", add_special_tokens=False)])
    with torch.no_grad():
        assert (model(ids).logits - original(ids).logits).abs().max().item() < 1e-4


def test_weight_types_count_matrix_parameters_per_storage_type(tiny_gguf, dequantized, tmp_path):
    _path, model, _tok = tiny_gguf
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)  # embedding = tied LM head
    assert dequantized[1]["weight_types"] == {"F32": matrices}  # the import records them for later notes
    q41, _m, _t = make_tiny_gguf(tmp_path / "tiny.Q4_1.gguf", qtype="Q4_1")
    assert weight_types(q41) == {"Q4_1": matrices}


def test_requantization_note_says_why_a_quantized_gguf_loses_fidelity_at_four_bits():
    assert requantization_note(None) is None and requantization_note({}) is None
    assert requantization_note({"F32": 100, "F16": 50}) is None  # a float GGUF is an ordinary source
    offset = requantization_note({"Q4_1": 90, "Q6_K": 5, "F32": 5})
    assert "95%" in offset and "mostly Q4_1" in offset and "float offset" in offset and "float zero points" in offset
    assert 'conversion.gguf "exact" (INT4) carries its blocks unchanged' in offset and "fine-tune" not in offset
    plain = requantization_note({"Q4_0": 10})
    assert "100%" in plain and "second time" in plain and "float offset" not in plain
    assert "rounds the change away" in requantization_note({"Q4_K": 10}, merged_finetune=True)


def test_unreadable_architecture_is_refused_before_loading_naming_what_can_be_read(tmp_path):
    path = write_fake_gguf(tmp_path / "olmo.gguf", "olmo2")
    assert read_metadata(path, ("general.architecture",)) == {"general.architecture": "olmo2"}
    with pytest.raises(ModelSourceError) as info:
        check_architecture(path)
    message = str(info.value)
    assert "GGUF architecture 'olmo2' cannot be read by the pinned transformers" in message
    assert "llama" in loadable_architectures() and "llama" in message and "--model-path DIR" in message


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(ModelSourceError, match="is not a readable GGUF file"):
        check_architecture(bad)


def test_gguf_as_model_source_and_model_path(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    path = tiny_gguf[0]
    recipe = parse_recipe({"model": {"source": str(path)}, "foundry": {"name": "g"}}, tmp_path / "r.json")
    assert recipe.source.kind == "gguf" and recipe.source.info.step == "gguf-import"
    assert recipe.source.folder == tmp_path / "build" / "gguf" / path.stem
    assert recipe.source.step_inputs() == [path]
    override = parse_recipe({"model": {"source": "demo"}, "foundry": {"name": "g"}}, tmp_path / "r.json",
                            model_path=path)
    assert override.source.kind == "gguf"
    with pytest.raises(RecipeError, match=r"GGUF file .*missing\.gguf does not exist"):
        parse_recipe({"model": {"source": "missing.gguf"}, "foundry": {"name": "g"}}, tmp_path / "r.json")


def test_gguf_deploys_through_olive_and_foundry_and_a_rerun_skips_every_step(tiny_gguf, tmp_path, monkeypatch):
    doc = {"model": {"source": str(tiny_gguf[0])}, "conversion": {"precision": "int4"},
           "foundry": {"name": "tiny-gguf"}, "generation": {"do_sample": False}}
    first, out = deploy_doc(doc, tmp_path)
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))  # where deploy_doc built it
    types = first["gguf-import"]["result"]["weight_types"]
    assert list(types) == ["F32"]
    assert source_weight_types(Pipeline(parse_recipe(doc, tmp_path / "recipe.json"))) == types  # what tune reads
    first = {name: o["skipped"] for name, o in first.items()}
    assert first["gguf-import"] is False and first["check"] is False
    assert "family: chatml (detected from the tokenizer's chat template" in out  # LlamaForCausalLM speaking ChatML
    assert (tmp_path / "cache" / "slmops" / "tiny-gguf" / "inference_model.json").is_file()
    again, _ = deploy_doc(doc, tmp_path)
    assert all(o["skipped"] for o in again.values()), again  # nothing changed: every step skipped
