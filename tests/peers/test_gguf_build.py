"""Tests for scripts/peers/gguf_build.py: which GGUF builds are planned (and cached), how an unknown BPE
pre-tokenizer is recognised, and — where llama-cpp-python is installed — a real F32 → Q4_0 / Q4_K_M build of the tiny
model with llama.cpp's converter and quantizer."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from scripts.core.errors import PeerError
from scripts.peers import gguf_build
from scripts.peers.gguf_build import (build_ggufs, check_types, GGUF_TYPES, gguf_path, plan_steps,
                                      pre_tokenizer_by_regex, split_regexes)
from scripts.sources.demo_tokenizer import QWEN2_PRETOKENIZE_REGEX

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (optional peer: "
                                     "pip install -r requirements-peer.txt); CI installs only requirements.txt")


def fake_hf(tmp_path: Path) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    return hf


# ----- planning ----------------------------------------------------------------------------------------------------
def test_quantized_types_are_built_from_the_f32_base(tmp_path):
    hf, out = fake_hf(tmp_path), tmp_path / "out"
    steps = plan_steps(hf, out, ["q4_0", "q4_k_m"], "0.3.36", 2, converter=lambda: tmp_path)
    assert [s.name for s in steps] == ["gguf-f32", "gguf-q4_0", "gguf-q4_k_m"]
    base, q4_0, q4_k_m = steps
    assert base.inputs == [hf] and base.outputs == [gguf_path(out, "f32")]
    assert base.settings == {"outtype": "f32", "llama-cpp-python": "0.3.36"}
    assert q4_0.inputs == [gguf_path(out, "f32")] and q4_0.outputs == [out / "model-q4_0.gguf"]
    assert q4_0.settings["ftype"] == "LLAMA_FTYPE_MOSTLY_Q4_0"
    assert q4_k_m.settings["ftype"] == "LLAMA_FTYPE_MOSTLY_Q4_K_M"
    assert all(s.code == ["scripts.peers.gguf_build"] for s in steps)


def test_converter_types_need_no_base(tmp_path):
    steps = plan_steps(fake_hf(tmp_path), tmp_path / "o", ["f16"], "1", 2, converter=lambda: tmp_path)
    assert [s.name for s in steps] == ["gguf-f16"] and steps[0].settings["outtype"] == "f16"
    steps = plan_steps(fake_hf(tmp_path / "x"), tmp_path / "o", ["f32", "q4_0", "f32"], "1", 2, lambda: tmp_path)
    assert [s.name for s in steps] == ["gguf-f32", "gguf-q4_0"]


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(PeerError) as info:
        check_types(["q4_0", "q3_xs"])
    assert "'q3_xs'" in str(info.value) and ", ".join(GGUF_TYPES) in str(info.value)


def test_builds_are_cached_until_the_model_or_the_version_changes(tmp_path, monkeypatch):
    """The worker calls are faked (they write the files): what is tested is the step plan and its stamps."""
    calls = []

    def fake_worker(target, request, **kwargs):
        calls.append((target.split(":")[1], request.get("outtype") or request["ftype"]))
        Path(request["outfile"]).parent.mkdir(parents=True, exist_ok=True)
        Path(request["outfile"]).write_text(target)
        return {"file": request["outfile"]}

    monkeypatch.setattr(gguf_build, "run_in_worker", fake_worker)
    monkeypatch.setattr(gguf_build, "ensure_converter", lambda version, downloads: tmp_path / "converter")
    hf, out = fake_hf(tmp_path), tmp_path / "out"
    paths = build_ggufs(hf, out, ["q4_0", "q4_k_m"], "0.3.36", 2)
    assert paths == {"q4_0": out / "model-q4_0.gguf", "q4_k_m": out / "model-q4_k_m.gguf"}
    assert calls == [("hf_to_gguf_job", "f32"), ("quantize_job", "LLAMA_FTYPE_MOSTLY_Q4_0"),
                     ("quantize_job", "LLAMA_FTYPE_MOSTLY_Q4_K_M")]
    build_ggufs(hf, out, ["q4_0", "q4_k_m"], "0.3.36", 2)
    assert len(calls) == 3, "nothing changed: every file reused"
    (hf / "config.json").write_text('{"changed": true}')
    build_ggufs(hf, out, ["q4_0"], "0.3.36", 2)
    assert calls[3:] == [("hf_to_gguf_job", "f32")], "a changed model rebuilds the base; Q4_0 is rebuilt only if it differs"
    build_ggufs(hf, out, ["q4_0"], "0.3.37", 2)
    assert [c[0] for c in calls[4:]] == ["hf_to_gguf_job", "quantize_job"], "another llama-cpp-python rebuilds"


# ----- pre-tokenizer recognition ------------------------------------------------------------------------------------
def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def test_qwen2_regex_is_recognised_as_in_the_demo_tokenizer():
    doc = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(QWEN2_PRETOKENIZE_REGEX), BYTE_LEVEL_NO_REGEX]}}
    assert split_regexes(doc["pre_tokenizer"]) == [QWEN2_PRETOKENIZE_REGEX]
    assert pre_tokenizer_by_regex(doc) == "qwen2"


def test_plain_byte_level_is_gpt2():
    assert pre_tokenizer_by_regex({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}) == "gpt-2"


@pytest.mark.parametrize("pre", [
    None,
    split(r"\p{N}"),                                                                       # unknown regex
    {"type": "Sequence", "pretokenizers": [split(QWEN2_PRETOKENIZE_REGEX), split(r"\d")]},  # two regexes
    {"type": "Sequence", "pretokenizers": [split(QWEN2_PRETOKENIZE_REGEX), {"type": "ByteLevel"}]},  # + GPT-2's
    {"type": "Metaspace", "replacement": "▁"},
])
def test_anything_else_is_not_guessed(pre):
    assert pre_tokenizer_by_regex({"pre_tokenizer": pre}) is None


# ----- real builds (llama-cpp-python installed) ----------------------------------------------------------------------
@needs_llama_cpp
def test_real_build_of_the_tiny_model(tiny_ggufs, tiny_hf_model):
    from gguf import GGUFReader
    out, paths, announced = tiny_ggufs
    assert [a for a in announced if a.startswith("✓")][:3] and all(p.is_file() for p in paths.values())
    f32 = GGUFReader(gguf_path(out, "f32"))
    assert str(f32.fields["general.architecture"].contents()) == "qwen2"
    assert str(f32.fields["tokenizer.ggml.pre"].contents()) == "gpt-2"
    config = json.loads((tiny_hf_model / "config.json").read_text())
    assert f32.fields["qwen2.block_count"].contents() == config["num_hidden_layers"]
    types = {t.tensor_type.name for t in GGUFReader(paths["q4_0"]).tensors}
    assert "Q4_0" in types and "F32" in types, types  # norms stay F32
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    assert sizes["q4_0"] < gguf_path(out, "f32").stat().st_size / 3
    assert set(json.loads((out / "stamps" / "gguf-q4_k_m.json").read_text())) >= {"fingerprint", "result"}
