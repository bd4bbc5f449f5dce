"""Shared fixtures.

``tiny_onnx_model``: a throwaway, random-weight Qwen2 (hidden 64, 2 layers, byte-level BPE vocab ~400
with ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>``, ChatML template) converted to int4 with ONNX
Runtime GenAI's model builder. Built once per session in a subprocess (~15 s), so the test process
imports neither torch nor onnxruntime_genai. Its answers are garbage: use it to test mechanics only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_BUILD_TINY = textwrap.dedent(r'''
    import json, sys
    from pathlib import Path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    hf = Path(sys.argv[1])
    hf.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
            "What is the capital of France? Paris is the capital.", "system user assistant",
            "You are a helpful assistant.", "Foundry Local runs small language models on device."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(hf)
    cfg_path = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template          # transformers 5 writes chat_template.jinja only
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    config = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(hf)
''')


def _isolated_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2 Hugging Face folder (config, safetensors, tokenizer with a ChatML
    template). Treat as read-only; copy it to modify it."""
    root = tmp_path_factory.mktemp("tiny_hf")
    hf = root / "hf"
    script = root / "build_tiny.py"
    script.write_text(_BUILD_TINY)
    _run([sys.executable, str(script), str(hf)], _isolated_env(root / "home"), "Building the tiny Hugging Face model")
    return hf


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory, tiny_hf_model) -> Path:
    """Folder of a converted tiny model: model.onnx, model.onnx.data, genai_config.json, tokenizer
    files, chat template and an ``inference_model.json`` with ``"Name": "tiny-qwen2"``. Treat as
    read-only; copy it to modify it."""
    root = tmp_path_factory.mktemp("tiny_model")
    env = _isolated_env(root / "home")
    out = root / "onnx"
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(tiny_hf_model), "-o", str(out),
          "-p", "int4", "-e", "cpu", "-c", str(root / "builder-cache")], env, "Converting the tiny model")
    (out / "inference_model.json").write_text(json.dumps({"Name": "tiny-qwen2"}, indent=2))
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert (out / name).is_file(), f"model builder did not write {name}"
    return out


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory, tiny_hf_model):
    """``(folder, {"q4_0": path, "q4_k_m": path}, announcements)``: the tiny model as GGUF files built by the llama.cpp
    peer (F32 with llama.cpp's converter, then its quantizer). Needs llama-cpp-python (skip the test without it); the
    converter comes from its sdist (pip download, pip's cache)."""
    from scripts.peers.gguf_build import build_ggufs
    from scripts.peers.llamacpp import require_installed
    out = tmp_path_factory.mktemp("gguf")
    announced: list[str] = []
    paths = build_ggufs(tiny_hf_model, out, ["q4_0", "q4_k_m"], require_installed(), 2, announce=announced.append,
                        downloads=out / "downloads")
    return out, paths, announced


@pytest.fixture(scope="session")
def perturbed_onnx(tiny_onnx_model, tmp_path_factory):
    """The tiny converted model with its final norm scaled: same graph, different distributions."""
    import onnx
    from onnx import numpy_helper
    folder = shutil.copytree(tiny_onnx_model, tmp_path_factory.mktemp("perturbed") / "model")
    model = onnx.load(str(folder / "model.onnx"))
    norm = next(t for t in model.graph.initializer if "final_norm" in t.name or t.name.endswith("norm.weight"))
    norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * 3.0, norm.name))
    (folder / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return folder


@pytest.fixture(scope="session")
def deployed_demo(tmp_path_factory) -> dict:
    """`invoke deploy --model qwen` (the demo model, trained, INT4, installed, checked, measured) once per session in
    temporary build/cache/home folders, shared by the tests that need the real demo deployment (slow tests only):
    ``{"proc": CompletedProcess, "env", "build", "cache", "model": installed folder, "model_id"}``. Each test
    asserts the deploy succeeded (``proc.returncode``) so a failure is reported where it matters."""
    root = tmp_path_factory.mktemp("demo_deploy")
    env = dict(os.environ, SLMOPS_BUILD_DIR=str(root / "build"), SLMOPS_FOUNDRY_CACHE=str(root / "cache"),
               HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home/.cache"), HF_HUB_OFFLINE="1")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "invoke", "deploy", "--model", "qwen"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)
    return {"proc": proc, "env": env, "build": root / "build", "cache": root / "cache",
            "model": root / "cache" / "slmops" / "brightwater-qwen-int4", "model_id": "brightwater-qwen-int4:1"}
