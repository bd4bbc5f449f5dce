"""Tests for scripts/proof/peer_bench.py and the peer path of `invoke bench`: ratios and their table (pure), the thread
count a peer gets, and — unconditionally — the clear message when the optional llama.cpp peer is not installed."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
from invoke import Exit, MockContext

from scripts.core.errors import PeerError, PeerUnavailableError
from scripts.peers import llamacpp
from scripts.proof import bench as bench_module
from scripts.proof.bandwidth import Bandwidth
from scripts.proof.bench import bench_markdown, oversubscription_note, run_bench
from scripts.proof.measure import Profile, PROFILES
from scripts.proof.peer_bench import deployed_rows, get_peer, peer_markdown, peer_ratios, peer_threads, PEERS, runtime_threads


def _summary(m: float) -> dict:
    return {"median": m, "spread": 0.1, "n": 3}


def _entry(key: str, backend: str, peer: bool, prefill: float, decode: float, ttft: float, lengths=(32, 464)) -> dict:
    return {"key": key, "backend": backend, "label": key.upper(), "peer": peer,
            "lengths": [{"target": t, "prompt_tokens": t + (1 if peer else 0), "prefill_tps": _summary(prefill / (i + 1)),
                         "decode_tps": _summary(decode), "ttft": _summary(ttft * (i + 1))} for i, t in enumerate(lengths)]}


BACKENDS = [_entry("foundry", "foundry", False, 400, 90, 0.1), _entry("genai", "genai", False, 500, 100, 0.08),
            _entry("torch", "torch", False, 50, 10, 1.0),
            _entry("llama.cpp:q4_0", "llama.cpp", True, 800, 60, 0.05),
            _entry("llama.cpp:q4_k_m", "llama.cpp", True, 1000, 45, 0.04, lengths=(32,))]


def test_ratios_are_ours_over_the_peer_per_length():
    ratios = peer_ratios(BACKENDS)
    assert [(r["ours"], r["peer"], r["target"]) for r in ratios] == [
        ("foundry", "llama.cpp:q4_0", 32), ("foundry", "llama.cpp:q4_0", 464), ("genai", "llama.cpp:q4_0", 32),
        ("genai", "llama.cpp:q4_0", 464), ("foundry", "llama.cpp:q4_k_m", 32), ("genai", "llama.cpp:q4_k_m", 32)]
    first = ratios[0]
    assert first["prefill"] == pytest.approx(0.5) and first["decode"] == pytest.approx(1.5)
    assert first["ttft"] == pytest.approx(2.0) and first["prompt_tokens"] == [32, 33]
    assert all(r["ours"] != "torch" for r in ratios), "PyTorch FP32 is not what we ship"


def test_an_extra_build_on_the_same_backend_is_not_the_deployed_row():
    """`bench --fp32` adds the FP32 ONNX build through raw GenAI: ratios to the peer stay those of the deployed graph."""
    fp32 = _entry("genai:fp32", "genai", False, 100, 20, 0.9)
    with_fp32 = BACKENDS[:2] + [fp32] + BACKENDS[2:]
    assert deployed_rows(with_fp32)["genai"]["key"] == "genai"
    assert set(deployed_rows(with_fp32)) == {"foundry", "genai", "torch"}
    assert peer_ratios(with_fp32) == peer_ratios(BACKENDS)


def test_missing_figures_give_no_ratio():
    peer = _entry("llama.cpp:q4_0", "llama.cpp", True, 800, 60, 0.05, lengths=(32,))
    peer["lengths"][0]["decode_tps"] = None
    ratios = peer_ratios([_entry("foundry", "foundry", False, 400, 90, 0.1, lengths=(32,)), peer])
    assert ratios[0]["decode"] is None and ratios[0]["prefill"] == pytest.approx(0.5)


def test_peer_table_in_the_bench_markdown():
    data = {"recipe": "qwen", "model_id": "m:1", "context": 512, "notes": [],
            "profile": {"name": "quick", "warmup": 1, "repeats": 3, "new_tokens": 32},
            "machine": {"cpus": 2}, "bandwidth": {"gb_per_s": 15.0, "spread": 0.1, "method": "numpy sum"},
            "backends": [{**b, "model_dir": "/x", "size_bytes": 10 ** 6, "load_seconds": 0.1, "peak_rss_mb": 90.0,
                          "bytes_per_token": 10 ** 6, "bound_tps": 15000.0, "fraction_of_bound": 0.01,
                          "threads": 2, "load_average": {"before": [3.0, 2.0, 1.0], "after": [4.5, 2.0, 1.0]},
                          "lengths": [{**x, "new_tokens": 32, "token_ms": None, "token_ms_p95": None,
                                       "cpu_percent": 180.0} for x in b["lengths"]]} for b in BACKENDS],
            "peer": {"name": "llama.cpp", "package": "llama-cpp-python 0.3.36", "threads": 2,
                     "threads_from": "the deployed model's intra_op_num_threads (genai_config.json)", "hf_dir": "/hf",
                     "gguf": {"q4_0": {"file": "/g/q4_0.gguf", "bytes": 2_000_000}, "q4_k_m": {"file": "/g/k.gguf",
                                                                                                "bytes": 2_500_000}},
                     "ratios": peer_ratios(BACKENDS)}}
    md = bench_markdown(data)
    assert "| LLAMA.CPP:Q4_0 |" in md, "the peer is in the same table"
    assert "| 2 | 3.0 → 4.5 |" in md, "threads and load average beside every figure"
    assert "llama-cpp-python 0.3.36, 2 threads" in md and "Q4_0 2.0 MB, Q4_K_M 2.5 MB" in md
    settings = "F16 KV cache, flash attention on"
    assert settings in bench_markdown({**data, "peer": {**data["peer"], "settings": settings}}), "how the peer ran"
    assert "| FOUNDRY | LLAMA.CPP:Q4_0 | 32 / 33 | 0.50× | 1.50× | 2.00× |" in md
    assert peer_markdown({**data, "peer": None}) == []


def test_peer_threads_follow_the_deployed_model(tmp_path, monkeypatch):
    cfg = {"model": {"decoder": {"session_options": {"intra_op_num_threads": 3}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    assert runtime_threads(tmp_path) == 3 and peer_threads(tmp_path)[0] == 3
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    monkeypatch.setattr("scripts.proof.peer_bench.physical_cores", lambda: 5)
    threads, why = peer_threads(tmp_path)
    assert runtime_threads(tmp_path) is None and threads == 5 and "physical cores" in why


def test_unknown_peer_lists_the_known_ones():
    with pytest.raises(PeerError, match="Unknown peer 'vllm'; choose one of: llama.cpp"):
        get_peer("vllm")
    assert list(PEERS) == ["llama.cpp"]


def test_bench_without_the_peer_installed_says_how_to_get_it_before_measuring(monkeypatch):
    monkeypatch.setattr(llamacpp, "installed_version", lambda: None)
    monkeypatch.setattr(bench_module, "measure_bandwidth", lambda: pytest.fail("nothing may be measured first"))
    pipeline = SimpleNamespace(installed_dir="/nonexistent", model_dir="/nonexistent")
    with pytest.raises(PeerUnavailableError) as info:
        run_bench(pipeline, PROFILES["quick"], peer="llama.cpp")
    assert "pip install -r requirements-peer.txt" in str(info.value)


def test_bench_task_without_the_peer_exits_cleanly_with_the_message(monkeypatch, tmp_path):
    import tasks
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("SLMOPS_FOUNDRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llamacpp, "installed_version", lambda: None)
    with pytest.raises(Exit) as info:
        tasks.bench(MockContext(), model="qwen", peer="llama.cpp")
    assert info.value.code == 1
    message = str(info.value.message)
    assert message.startswith("error: The llama.cpp peer needs the optional package llama-cpp-python")
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -r requirements-peer.txt' in message
    assert "Traceback" not in message


def test_oversubscription_note():
    def b(before, after):
        return {"load_average": {"before": [before, 0, 0], "after": [after, 0, 0]}}
    assert oversubscription_note([b(1.0, 1.9)], 2) is None
    note = oversubscription_note([b(1.0, 1.9), b(2.4, 5.25)], 2, "llama.cpp")
    assert "load average up to 5.2 on 2 CPUs" in note and "bench-threads --threads 1,2 --peer llama.cpp" in note


HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (optional peer: pip install -r "
                    "requirements-peer.txt); CI installs only requirements.txt")
def test_real_bench_with_the_peer_on_the_tiny_model(tiny_onnx_model, tiny_hf_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(bench_module, "measure_bandwidth", lambda: Bandwidth(10.0, 0.0, 1, 1))
    pipeline = SimpleNamespace(installed_dir=tiny_onnx_model, model_dir=tiny_hf_model, cache_root=tmp_path / "cache",
                               model_id="tiny-peer:1", recipe=SimpleNamespace(name="tiny", foundry=SimpleNamespace(model_id="tiny-peer:1")),
                               paths=SimpleNamespace(root=tmp_path / "build" / "tiny"))
    tiny = Profile("tiny", lengths=(16,), max_prompt_tokens=40, new_tokens=4, warmup=0, repeats=2)
    data = run_bench(pipeline, tiny, peer="llama.cpp")
    keys = [b["key"] for b in data["backends"]]
    assert keys == ["foundry", "http", "genai", "torch", "llama.cpp:q4_0", "llama.cpp:q4_k_m"]
    peers = [b for b in data["backends"] if b["peer"]]
    assert all(b["threads"] == data["peer"]["threads"] and b["size_bytes"] > 0 for b in peers)
    assert all(b["load_average"]["before"] and b["load_average"]["after"] for b in data["backends"])
    assert {r["peer"] for r in data["peer"]["ratios"]} == {"llama.cpp:q4_0", "llama.cpp:q4_k_m"}
    assert (tmp_path / "build" / "tiny" / "peer" / "llama.cpp" / "model-q4_0.gguf").is_file()
    assert "llama.cpp Q4_K_M (peer)" in bench_markdown(data)
    assert "flash attention on" in data["peer"]["settings"] and all(b["peer"] is False or "q4" in b["key"]
                                                                     for b in data["backends"])
    # a profile that names its backends and the peer's quantizations measures only those
    only = Profile("only", lengths=(16,), max_prompt_tokens=40, new_tokens=4, warmup=0, repeats=1,
                   backends=("genai",), peer_quants=("q4_0",))
    data = run_bench(pipeline, only, peer="llama.cpp")
    assert [b["key"] for b in data["backends"]] == ["genai", "llama.cpp:q4_0"]


def _round(load: float, ttfts: list[float], cpu: float, peak: int) -> dict:
    runs = [{"ttft": t, "prefill_tps": 100 / t, "decode_tps": 10.0, "token_latencies": [0.1], "prompt_tokens": 100,
             "new_tokens": 4, "total_seconds": t + 0.3} for t in ttfts]
    return {"backend": "genai", "load_seconds": load, "rss_before_load": 1, "rss_after_load": 2, "peak_rss": peak,
            "cpu_count": 2, "jobs": [{"kind": "bench", "lengths": [{"target": 100, "runs": runs, "cpu_percent": cpu}]}]}


def test_rounds_pool_every_run():
    """`bench --rounds N`: each backend's runs of every round count alike (median over all of them)."""
    pooled = bench_module.pool_rounds([_round(1.0, [0.1, 0.2], 150, 10), _round(3.0, [0.9, 1.0], 190, 30),
                                       _round(2.0, [0.3], 170, 20)])
    length = pooled["jobs"][0]["lengths"][0]
    assert [r["ttft"] for r in length["runs"]] == [0.1, 0.2, 0.9, 1.0, 0.3]
    assert length["cpu_percent"] == pytest.approx(170) and pooled["load_seconds"] == 2.0 and pooled["peak_rss"] == 30
    summary = bench_module.to_backend_bench("genai", ".", pooled).lengths[0]
    assert summary.ttft.median == pytest.approx(0.3) and summary.ttft.n == 5
