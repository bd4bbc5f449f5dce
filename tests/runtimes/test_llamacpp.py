"""Tests for scripts/runtimes/llamacpp.py: the llama.cpp peer backend. Registration and the "not a GGUF" error run
everywhere; the worker runs on the tiny model's GGUF files where llama-cpp-python is installed."""
from __future__ import annotations

import importlib.util

import pytest
from tokenizers import Tokenizer

from scripts.core.errors import MeasurementError, PeerError
from scripts.proof.measure import bench_request, measure, Profile, run_worker
from scripts.runtimes.backends import BACKEND_CLASSES, make_backend, render_chat
from scripts.runtimes.llamacpp import LlamaCppBackend

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (optional peer: "
                                     "pip install -r requirements-peer.txt); CI installs only requirements.txt")
TINY = Profile("tiny", lengths=(16,), max_prompt_tokens=48, new_tokens=4, warmup=1, repeats=2)
CONVS = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "What is the capital of France?"}]]


def test_registered_under_its_peer_name(tmp_path):
    assert BACKEND_CLASSES["llama.cpp"] is LlamaCppBackend
    assert isinstance(make_backend("llama.cpp", tmp_path / "m.gguf", threads=2), LlamaCppBackend)


@needs_llama_cpp
def test_a_folder_is_not_a_gguf(tmp_path):
    with pytest.raises(PeerError, match="is not a GGUF file"):
        LlamaCppBackend(tmp_path, threads=1).load()


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q4_0", "q4_k_m"])
def test_peer_worker_measures_the_tiny_gguf(tiny_ggufs, tiny_onnx_model, quant):
    _, paths, _ = tiny_ggufs
    options = {"threads": 2, "n_ctx": 512, "chat_dir": str(tiny_onnx_model)}
    r = measure("llama.cpp", paths[quant], TINY, options, prompt_dir=tiny_onnx_model, context=512)
    assert r.backend == "llama.cpp" and r.load_seconds > 0 and r.size_bytes == paths[quant].stat().st_size
    assert [x.target for x in r.lengths] == [16, TINY.max_prompt_tokens]
    tok = Tokenizer.from_file(str(tiny_onnx_model / "tokenizer.json"))
    for x, (_, messages) in zip(r.lengths, bench_request(tiny_onnx_model, TINY, 512)["prompts"]):
        assert x.ttft.n == TINY.repeats and x.new_tokens >= 1
        hf = len(tok.encode(render_chat(tiny_onnx_model, messages), add_special_tokens=False).ids)
        assert x.prompt_tokens == hf, "llama.cpp's tokenizer counts the same prompt tokens as the HF tokenizer"


@needs_llama_cpp
def test_f32_gguf_answers_as_pytorch_greedy(tiny_ggufs, tiny_hf_model, tiny_onnx_model):
    """Same weights (F32), same chat template, same greedy decoding: the same tokens as the original model."""
    out, _, _ = tiny_ggufs
    job = {"kind": "answers", "conversations": CONVS, "max_new_tokens": 6}
    peer = run_worker("llama.cpp", out / "model-f32.gguf", [job], {"threads": 2, "n_ctx": 512,
                                                                     "chat_dir": str(tiny_onnx_model)})
    torch = run_worker("torch", tiny_hf_model, [job])
    got = [a["text"] for a in peer["jobs"][0]["answers"]]
    assert got == [a["text"] for a in torch["jobs"][0]["answers"]]
    assert all(a["tokens"] >= 1 for a in peer["jobs"][0]["answers"])


@needs_llama_cpp
def test_prompt_beyond_the_context_is_a_clear_error(tiny_ggufs, tiny_onnx_model):
    _, paths, _ = tiny_ggufs
    job = {"kind": "answers", "conversations": [[{"role": "user", "content": "word " * 400}]], "max_new_tokens": 4}
    with pytest.raises(MeasurementError, match=r"prompt tokens \+ 4 new tokens exceed llama.cpp's context of \d+ tokens"):
        run_worker("llama.cpp", paths["q4_0"], [job], {"threads": 1, "n_ctx": 128, "chat_dir": str(tiny_onnx_model)})


@needs_llama_cpp
def test_peer_scores_every_position_for_fidelity_to_its_f32(tiny_ggufs):
    """Q4_0's fidelity to the F32 GGUF it was quantized from, with the same definitions as ours (KLD, top-1)."""
    folder, paths, _ = tiny_ggufs
    f32 = folder / "model-f32.gguf"
    window = list(range(3, 40))
    same = run_worker("llama.cpp", f32, [{"kind": "fidelity", "windows": [window], "reference_dir": str(f32)},
                                         {"kind": "logits", "windows": [window]}], {"threads": 2})
    assert same["jobs"][0]["top1"] == 1.0 and same["jobs"][0]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert len(same["jobs"][1]["windows"][0]["argmax"]) == len(window) - 1
    quantized = run_worker("llama.cpp", paths["q4_0"], [{"kind": "fidelity", "windows": [window],
                                                          "reference_dir": str(f32)}], {"threads": 2})
    assert quantized["jobs"][0]["kld_mean"] > 0


@needs_llama_cpp
def test_peer_generates_exactly_the_tokens_asked(tiny_ggufs, tiny_onnx_model):
    from dataclasses import replace
    _, paths, _ = tiny_ggufs
    options = {"threads": 2, "n_ctx": 512, "chat_dir": str(tiny_onnx_model)}
    r = measure("llama.cpp", paths["q4_0"], replace(TINY, new_tokens=24, exact_new_tokens=True), options,
                prompt_dir=tiny_onnx_model, context=512)
    assert [x.new_tokens for x in r.lengths] == [24, 24]
