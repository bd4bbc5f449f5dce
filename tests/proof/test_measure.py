"""Measurement module: pure prompt planning and summaries; real workers on the tiny model (mechanics only)."""
import pytest

from scripts.core.errors import MeasurementError
from scripts.proof.measure import (PROFILES, Profile, bench_request, get_profile, length_prompts, measure, prompt_lengths,
                             run_worker, summarise_length)

TINY = Profile("tiny", lengths=(16,), max_prompt_tokens=48, new_tokens=4, warmup=1, repeats=2)


def test_prompt_lengths_cap_and_near_context():
    assert prompt_lengths(PROFILES["quick"], 512) == [32, 128, 512 - 32 - 16]
    assert prompt_lengths(PROFILES["quick"], 32768) == [32, 128, 512]
    assert prompt_lengths(PROFILES["scale"], 8192) == [128, 512, 2000]  # the speed issue's scale
    assert prompt_lengths(PROFILES["scale"], 1024) == [128, 512, 1024 - 128 - 16]
    assert prompt_lengths(PROFILES["full"], 256) == [16, 64, 256 - 64 - 16]
    assert prompt_lengths(PROFILES["long"], 8448) == [128, 2000, 8192]  # the long-prompt issue's 8k
    assert prompt_lengths(PROFILES["long"], 8192) == [128, 2000, 8192 - 128 - 16]  # SmolLM2: its whole context
    with pytest.raises(MeasurementError):
        prompt_lengths(PROFILES["full"], 70)
    with pytest.raises(MeasurementError, match="choose one of: quick, full"):
        get_profile("fast")


def test_profiles_choose_backends_and_peer_quantizations():
    assert all(PROFILES["quick"].runs(b) for b in ("foundry", "http", "genai", "torch"))
    long = PROFILES["long"]
    assert [b for b in ("foundry", "http", "genai", "torch") if long.runs(b)] == ["foundry", "genai"]
    assert long.peer_quants == ("q4_0",) and long.to_json()["backends"] == ("foundry", "genai")


def test_summarise_length_medians_and_p95():
    raw = {"target": 32, "cpu_percent": 150.0, "runs": [
        {"ttft": 0.1, "prefill_tps": 300, "decode_tps": 10, "token_latencies": [0.1, 0.1], "prompt_tokens": 30,
         "new_tokens": 3},
        {"ttft": 0.3, "prefill_tps": 100, "decode_tps": 20, "token_latencies": [0.05, 0.05], "prompt_tokens": 30,
         "new_tokens": 3}]}
    x = summarise_length(raw)
    assert x.ttft.median == pytest.approx(0.2) and x.decode_tps.n == 2
    assert x.token_ms.median == pytest.approx(75) and x.token_ms_p95 == pytest.approx(100)
    assert x.to_json()["decode_tps"]["median"] == 15


def test_length_prompts_hit_their_token_targets(tiny_onnx_model):
    from scripts.runtimes.backends import render_chat
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny_onnx_model / "tokenizer.json"))
    for target, messages in length_prompts(tiny_onnx_model, [80, 200]):
        n = len(tok.encode(render_chat(tiny_onnx_model, messages), add_special_tokens=False).ids)
        assert abs(n - target) <= 3, (target, n)


@pytest.mark.parametrize("backend", ["genai", "foundry", "http"])
def test_measure_onnx_backends(tiny_onnx_model, tmp_path, backend, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the runtime's telemetry store follows HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    options = {"cache_dir": str(tmp_path / "cache")} if backend in ("foundry", "http") else None
    r = measure(backend, tiny_onnx_model, TINY, options)
    assert r.backend == backend and r.load_seconds > 0 and r.peak_rss_mb > r.rss_before_load_mb > 0
    assert [x.target for x in r.lengths] == [16, 48]
    for x in r.lengths:
        assert x.ttft.n == TINY.repeats and x.prompt_tokens > 0 and x.new_tokens >= 1
    assert r.size_bytes > 0 and r.to_json()["lengths"][0]["target"] == 16


def test_http_row_streams_the_same_greedy_tokens_as_in_process(tiny_onnx_model, tmp_path, monkeypatch):
    """The bench's HTTP row goes through `invoke serve` (server in its own process, openai client): same prompts,
    same greedy answers as the in-process runtime, and the server's own peak RSS (not the client's)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    convs = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "What is the capital of France?"}]]
    job = {"kind": "answers", "conversations": convs, "max_new_tokens": 12}
    opts = {"cache_dir": str(tmp_path / "cache")}
    http, local = (run_worker(b, tiny_onnx_model, [job], opts) for b in ("http", "foundry"))
    assert [a["text"] for a in http["jobs"][0]["answers"]] == [a["text"] for a in local["jobs"][0]["answers"]]
    assert [a["tokens"] for a in http["jobs"][0]["answers"]] == [a["tokens"] for a in local["jobs"][0]["answers"]]
    assert http["peak_rss"] > 2 * http["rss_before_load"]  # the server's (runtime + model), not the thin client's


def test_measure_torch_and_answers_soak_jobs(tiny_hf_model, tiny_onnx_model):
    job = bench_request(tiny_onnx_model, TINY)  # same prompts as the ONNX backends
    convs = [[{"role": "user", "content": "Hello"}]]
    result = run_worker("torch", tiny_hf_model, [job, {"kind": "answers", "conversations": convs, "max_new_tokens": 4},
                                                 {"kind": "soak", "conversations": convs, "requests": 12,
                                                  "max_new_tokens": 2}])
    kinds = [j["kind"] for j in result["jobs"]]
    assert kinds == ["bench", "answers", "soak"]
    assert len(result["jobs"][1]["answers"]) == 1 and isinstance(result["jobs"][1]["answers"][0]["text"], str)
    soak = result["jobs"][2]
    assert len(soak["rss"]) == 12 and soak["n_errors"] == 0


def test_worker_failure_is_a_clear_measurement_error(tmp_path):
    with pytest.raises(MeasurementError, match="no genai_config.json"):
        run_worker("foundry", tmp_path, [])
    with pytest.raises(MeasurementError, match="Unknown backend 'tensorrt'"):
        run_worker("tensorrt", tmp_path, [])


def _ends_at_once(tiny_onnx_model, dest):
    """A hard-linked copy of the tiny model whose end-of-text id is the token it answers first: every reply ends after
    one token unless the end of text is suppressed."""
    import json
    from tokenizers import Tokenizer
    from scripts.core.fileops import link_or_copy
    from scripts.runtimes.backends import render_chat
    job = bench_request(tiny_onnx_model, TINY)
    messages = job["prompts"][0][1]
    ids = Tokenizer.from_file(str(tiny_onnx_model / "tokenizer.json")).encode(
        render_chat(tiny_onnx_model, messages), add_special_tokens=False).ids
    first = run_worker("genai", tiny_onnx_model, [{"kind": "logits", "windows": [ids + [0]]}])
    first = first["jobs"][0]["windows"][0]["argmax"][-1]
    dest.mkdir()
    for path in tiny_onnx_model.iterdir():
        if path.name != "genai_config.json":
            link_or_copy(path, dest / path.name)
    config = json.loads((tiny_onnx_model / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = first
    (dest / "genai_config.json").write_text(json.dumps(config))
    return dest


def test_exact_new_tokens_suppresses_the_end_of_text_in_genai_and_foundry(tiny_onnx_model, tmp_path, monkeypatch):
    """`bench --profile scale` decode figures are over the asked number of tokens in every runtime: GenAI per request
    (min_length), Foundry Local from the folder (bench.fixed_length_copy), which refuses an exact request otherwise."""
    from dataclasses import replace
    from scripts.proof.bench import fixed_length_copy
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    short = _ends_at_once(tiny_onnx_model, tmp_path / "short")
    exact = replace(TINY, warmup=0, repeats=1, exact_new_tokens=True)
    assert measure("genai", short, replace(exact, exact_new_tokens=False)).lengths[0].new_tokens == 1
    assert measure("genai", short, exact).lengths[0].new_tokens == TINY.new_tokens
    opts = {"cache_dir": str(tmp_path / "cache")}
    assert measure("foundry", short, replace(exact, exact_new_tokens=False), opts).lengths[0].new_tokens <= 1
    with pytest.raises(MeasurementError, match="search.min_length equals max_length"):
        measure("foundry", short, exact, opts)
    fixed = fixed_length_copy(short, tmp_path / "fixed")
    assert (fixed / "model.onnx").stat().st_ino == (short / "model.onnx").stat().st_ino
    assert measure("foundry", fixed, exact, opts).lengths[0].new_tokens == TINY.new_tokens
