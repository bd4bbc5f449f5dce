"""Tests for scripts/convert/olive.py: the Olive workflow we emit, failure explanations, and run_olive (one real
Olive subprocess on a deliberately broken model; the rest with a fake subprocess)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from scripts.convert import olive as olive_convert
from scripts.core.errors import ConversionError
from scripts.core.settings import REPO_ROOT
from scripts.convert.olive import explain_failure, olive_config, run_olive
from scripts.recipe.spec import Conversion, Quantization


def conversion(precision="int4", block_size=32, symmetric=True, accuracy_level=4, algorithm="default") -> Conversion:
    return Conversion(precision, Quantization(block_size, symmetric, accuracy_level, algorithm))


def all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in all_keys(v)}
    return set()


# ----- olive_config ---------------------------------------------------------------------------------------
def test_int4_options_use_the_keys_olive_reads(tmp_path):
    cfg = olive_config(conversion(block_size=128, symmetric=False, accuracy_level=1), tmp_path / "hf",
                       tmp_path / "out", tmp_path / "cache")
    builder = cfg["passes"]["builder"]
    assert (builder["type"], builder["precision"]) == ("ModelBuilder", "int4")
    assert (builder["int4_block_size"], builder["int4_is_symmetric"], builder["int4_accuracy_level"]) == (128, False, 1)
    assert "int4_algo_config" not in builder  # "default" algorithm: leave Olive's default
    assert "quantization_config" not in all_keys(cfg)
    assert cfg["input_model"] == {"type": "HfModel", "model_path": str(tmp_path / "hf")}
    assert cfg["output_dir"] == str(tmp_path / "out") and cfg["cache_dir"] == str(tmp_path / "cache")
    assert cfg["systems"]["local_system"]["accelerators"] == [
        {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]
    json.dumps(cfg)  # written to olive_config.json as is


def test_non_default_algorithm_emits_int4_algo_config(tmp_path):
    builder = olive_config(conversion(algorithm="k_quant_mixed"), tmp_path, tmp_path, tmp_path)["passes"]["builder"]
    assert builder["int4_algo_config"] == "k_quant_mixed"
    default = olive_config(conversion(), tmp_path, tmp_path, tmp_path)["passes"]["builder"]
    assert "int4_algo_config" not in default


def test_fp32_has_no_int4_options(tmp_path):
    builder = olive_config(conversion("fp32"), tmp_path, tmp_path, tmp_path)["passes"]["builder"]
    assert builder["type"] == "ModelBuilder" and builder["precision"] == "fp32"
    assert not [key for key in builder if key.startswith("int4_")]


def test_search_options_are_passed_to_the_builder(tmp_path):
    builder = olive_config(conversion(), tmp_path, tmp_path, tmp_path, search={"max_length": 256})["passes"]["builder"]
    assert builder["search"] == {"max_length": 256}


# ----- explain_failure ------------------------------------------------------------------------------------
RESHAPE_LOG = """\
[2026-01-05 10:00:01,100] [INFO] [run.py:99:run_engine] Running workflow default_workflow
[2026-01-05 10:00:01,200] [INFO] [engine.py:665:_run_pass] Running pass builder:modelbuilder
GroupQueryAttention support: True
[2026-01-05 10:00:03,167] [ERROR] [engine.py:728:_run_pass] Pass run failed.
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/olive/engine/engine.py", line 716, in _run_pass
    output_model_config = host.run_pass(p, input_model_config, output_model_path)
  File "/venv/lib/python3.11/site-packages/onnxruntime/quantization/matmul_nbits_quantizer.py", line 212, in quantize
    packed, scales, zero_points = self.qbits_block_quant(b_ndarray)
  File "/venv/lib/python3.11/site-packages/onnxruntime/quantization/matmul_nbits_quantizer.py", line 180, in qbits
    fp32weight = fp32weight.reshape(-1, block_size)
ValueError: cannot reshape array of size 64 into shape (128,newaxis)
[2026-01-05 10:00:03,184] [WARNING] [engine.py:288:run_accelerator] Failed to run Olive on cpu-cpu.
[2026-01-05 10:00:03,186] [INFO] [engine.py:216:run] Run history for cpu-cpu:
[2026-01-05 10:00:03,187] [WARNING] [engine.py:237:run] No output model produced. Please check the log for details.
"""


def test_explain_failure_quotes_final_exception_and_hint():
    text = explain_failure(RESHAPE_LOG)
    first, second = text.split("\n")
    assert first == "ValueError: cannot reshape array of size 64 into shape (128,newaxis)"
    assert second.startswith("Likely fix: this block size / symmetry / algorithm combination does not fit")
    assert "use a smaller block size or symmetric=true" in second


def test_explain_failure_takes_the_last_exception():
    log = ("KeyError: 'first'\n  File \"x.py\", line 1\n"
           "onnxruntime_genai.GenaiError: Hugging Face details not found in extra_options\n")
    text = explain_failure(log)
    assert text.startswith("onnxruntime_genai.GenaiError: Hugging Face details not found")
    assert "run `invoke setup` to restore the pinned versions" in text


def test_explain_failure_falls_back_to_error_lines_without_prefix():
    log = ("[2026-01-05 10:00:01,100] [INFO] [x.py:1:f] fine\n"
           "[2026-01-05 10:00:02,100] [ERROR] [engine.py:728:_run_pass] Pass run failed badly.\n"
           "[2026-01-05 10:00:03,100] [INFO] [x.py:1:f] done\n")
    assert explain_failure(log) == "Pass run failed badly."


def test_explain_failure_missing_module_hint():
    text = explain_failure("Traceback (most recent call last):\nModuleNotFoundError: No module named 'onnxscript'\n")
    assert text == ("ModuleNotFoundError: No module named 'onnxscript'\n"
                    "Likely fix: a Python package is missing; run `invoke setup`.")


def test_explain_failure_without_known_cause_has_no_hint():
    assert explain_failure("something odd happened\nthe end\n") == "the end"
    assert explain_failure("") == "no output at all"


# ----- run_olive with a fake subprocess --------------------------------------------------------------------
class FakeOlive:
    """Stands in for subprocess.Popen: writes a log, optionally the outputs, and exits with ``code``."""

    def __init__(self, log: str, code: int, outputs: tuple[str, ...]):
        self.log, self.code, self.outputs, self.cmd = log, code, outputs, None

    def __call__(self, cmd, stdout, stderr, env, cwd, preexec_fn=None):
        self.cmd, self.env, self.cwd, self.preexec_fn = cmd, env, cwd, preexec_fn
        stdout.write(self.log)
        stdout.flush()
        config = json.loads(Path(cmd[-1]).read_text(encoding="utf-8"))
        out = Path(config["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        for name in self.outputs:
            if name == "model.onnx":
                graph = helper.make_graph([], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                                          [helper.make_tensor_value_info("logits_Q8", TensorProto.FLOAT, [1])])
                onnx.save(helper.make_model(graph), str(out / name))
            elif name == "genai_config.json":
                (out / name).write_text(json.dumps({"model": {"decoder": {
                    "filename": "model.onnx", "inputs": {"input_ids": "input_ids"}, "outputs": {"logits": "logits"}}}}))
            else:
                (out / name).write_text("x")
        self.returncode = self.code
        return self

    def poll(self):
        return self.returncode


def fake_run(monkeypatch, tmp_path, log="", code=0, outputs=("model.onnx", "genai_config.json")):
    fake = FakeOlive(log, code, outputs)
    monkeypatch.setattr(olive_convert.subprocess, "Popen", fake)
    cfg = olive_config(conversion(), tmp_path / "hf", tmp_path / "out", tmp_path / "cache")
    return fake, cfg


def test_run_olive_success_returns_output_dir(monkeypatch, tmp_path):
    fake, cfg = fake_run(monkeypatch, tmp_path, log="all good\n")
    seen = []
    assert run_olive(cfg, tmp_path / "work", progress=seen.append) == tmp_path / "out"
    # olive's own CLI, started through builder_compat (the pinned builder's expectations of transformers 5 met)
    assert fake.cmd == [sys.executable, "-m", "scripts.convert.builder_compat", "run", "--config",
                        str(tmp_path / "work" / "olive_config.json")]
    assert fake.env["HF_HUB_OFFLINE"] == "1" and fake.cwd == tmp_path / "work"
    assert fake.env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)  # scripts importable from the work dir
    assert fake.preexec_fn is not None, "Olive dies with the command that started it (PR_SET_PDEATHSIG)"
    assert json.loads((tmp_path / "work" / "olive_config.json").read_text()) == cfg
    assert (tmp_path / "work" / "olive.log").read_text() == "all good\n"
    # the quantizer renamed logits to logits_Q8: genai_config.json is pointed at the graph's real name
    decoder = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["outputs"] == {"logits": "logits_Q8"} and decoder["inputs"] == {"input_ids": "input_ids"}


def test_run_olive_exit_zero_without_outputs_is_a_failure(monkeypatch, tmp_path):
    _, cfg = fake_run(monkeypatch, tmp_path, log=RESHAPE_LOG, outputs=("genai_config.json",))
    with pytest.raises(ConversionError) as info:
        run_olive(cfg, tmp_path / "work")
    message = str(info.value)
    assert message.startswith("Olive produced no usable model (exit status 0, missing model.onnx).")
    assert "Cause: ValueError: cannot reshape array of size 64 into shape (128,newaxis)" in message
    assert "Likely fix: this block size" in message
    assert f"Full log: {tmp_path / 'work' / 'olive.log'}" in message


def test_run_olive_nonzero_exit_is_a_failure_even_with_outputs(monkeypatch, tmp_path):
    _, cfg = fake_run(monkeypatch, tmp_path, log="MemoryError\n", code=137)
    with pytest.raises(ConversionError, match=r"\(exit status 137\)\.\nCause: MemoryError\nLikely fix: the machine "
                                              r"ran out of memory"):
        run_olive(cfg, tmp_path / "work")


# ----- one real Olive run ------------------------------------------------------------------------------------
def test_real_olive_run_on_broken_model_raises_with_cause(tiny_hf_model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    for var, value in {"HOME": home, "XDG_CACHE_HOME": home / ".cache", "HF_HOME": home / "hf"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    broken = tmp_path / "broken-hf"
    shutil.copytree(tiny_hf_model, broken)
    config_file = broken / "config.json"
    config_file.write_text(config_file.read_text(encoding="utf-8").rstrip().rstrip("}"), encoding="utf-8")  # truncated

    cfg = olive_config(conversion(), broken, tmp_path / "out", tmp_path / "cache")
    with pytest.raises(ConversionError) as info:
        run_olive(cfg, tmp_path / "work")
    message = str(info.value)
    assert message.startswith("Olive produced no usable model (exit status ")
    assert "missing model.onnx, genai_config.json" in message
    assert f"Cause: OSError: It looks like the config file at '{config_file}' is not a valid JSON file." in message
    log_path = tmp_path / "work" / "olive.log"
    assert f"Full log: {log_path}" in message
    assert "Traceback" in log_path.read_text(encoding="utf-8")
    written = json.loads((tmp_path / "work" / "olive_config.json").read_text(encoding="utf-8"))
    assert written["passes"]["builder"]["int4_block_size"] == 32


def test_mixed_int4_renders_rtn_passes_per_weight_group(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    conv = Conversion("int4", Quantization(32, False, 4, "default", embeddings=True,
                                           eight_bit=("qkv_proj", "lm_head"), eight_bit_block_size=64))
    passes = olive_config(conv, tmp_path, tmp_path / "out", tmp_path / "cache")["passes"]
    assert list(passes) == ["builder", "rtn8", "rtn4", "embed4"]  # Olive runs them in this order
    assert passes["builder"]["precision"] == "fp32" and not [k for k in passes["builder"] if k.startswith("int4_")]
    assert passes["builder"]["extra_options"] == {"prune_lm_head": True, "shared_embeddings": False}
    rtn8 = passes["rtn8"]
    assert (rtn8["bits"], rtn8["block_size"], rtn8["is_symmetric"]) == (8, 64, True)
    assert "/model/layers.1/attn/qkv_proj/MatMul" in rtn8["nodes_to_include"]
    assert "/model/layers.1/attn/q_proj/MatMul" in rtn8["nodes_to_include"]  # unfused attention too
    assert "/lm_head/MatMul" in rtn8["nodes_to_include"]
    assert not [n for n in rtn8["nodes_to_include"] if "layers.2" in n or "mlp" in n]
    rtn4 = passes["rtn4"]
    assert (rtn4["bits"], rtn4["block_size"], rtn4["is_symmetric"]) == (4, 32, False)
    assert rtn4["nodes_to_exclude"] == ["/model/embed_tokens/Gather"]
    assert passes["embed4"]["nodes_to_include"] == ["/model/embed_tokens/Gather"]


def test_mixed_int4_without_a_layer_count_is_a_conversion_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    conv = Conversion("int4", Quantization(32, True, 4, "default", eight_bit=("lm_head",)))
    with pytest.raises(ConversionError, match="num_hidden_layers"):
        olive_config(conv, tmp_path, tmp_path, tmp_path)
