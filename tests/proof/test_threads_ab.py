"""Tests for scripts/proof/threads_ab.py (`invoke bench-threads`): variants, the mirrored folders, the summary. The
measuring itself is the bench's (tests/proof/test_measure.py); one real A/B runs on the tiny model."""
from __future__ import annotations

import json

import pytest

from scripts.core.errors import MeasurementError
from scripts.proof.measure import Profile
from scripts.proof.threads_ab import (ab_ratios, mirror, parse_variants, run_threads_ab, summarise_ab, threads_markdown,
                                      variant_config)

TINY = Profile("tiny", lengths=(16,), max_prompt_tokens=32, new_tokens=4, warmup=0, repeats=2)


def test_variants():
    assert parse_variants("default, 1,2,2") == [None, 1, 2]
    for bad in ("default", "0,2", "two,default", ""):
        with pytest.raises(MeasurementError):
            parse_variants(bad)


def test_variant_config_sets_or_removes_only_the_thread_count():
    cfg = {"model": {"decoder": {"filename": "model.onnx", "session_options": {"log_id": "x",
                                                                               "intra_op_num_threads": 2}}},
           "search": {"max_length": 9}}
    assert variant_config(cfg, None)["model"]["decoder"]["session_options"] == {"log_id": "x"}
    out = variant_config(cfg, 1)
    assert out["model"]["decoder"] == {"filename": "model.onnx", "session_options": {"log_id": "x",
                                                                                      "intra_op_num_threads": 1}}
    assert out["search"] == {"max_length": 9} and cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2


def test_mirror_links_weights_and_rewrites_the_config(tiny_onnx_model, tmp_path):
    out = mirror(tiny_onnx_model, tmp_path / "v", 3)
    assert (out / "model.onnx.data").stat().st_size == (tiny_onnx_model / "model.onnx.data").stat().st_size
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"] == {
        **json.loads((tiny_onnx_model / "genai_config.json").read_text())["model"]["decoder"].get("session_options", {}),
        "intra_op_num_threads": 3}


def _run(round_, threads, decode, load):
    return {"round": round_, "backend": "genai", "threads": threads, "load_before": load, "load_after": load,
            "lengths": [{"target": 16, "prompt_tokens": 17, "prefill_tps": {"median": 100.0 * (threads or 1)},
                         "decode_tps": {"median": decode}, "ttft": {"median": 0.01}}]}


def test_summary_is_the_median_over_rounds_with_the_load_range():
    raw = [_run(0, None, 10.0, 1.0), _run(0, 2, 30.0, 1.5), _run(1, None, 20.0, 3.0), _run(1, 2, 50.0, 0.5),
           _run(2, None, 90.0, 2.0), _run(2, 2, 40.0, 1.0)]
    by = {s["threads"]: s for s in summarise_ab(raw)}
    assert by["default"]["decode_tps"] == 20.0 and by["2 threads"]["decode_tps"] == 40.0
    assert by["2 threads"]["prefill_tps"] == 200.0 and by["default"]["rounds"] == 3
    assert (by["default"]["load_min"], by["default"]["load_max"]) == (1.0, 3.0)
    md = threads_markdown({"model_dir": "/m", "rounds": 3, "cpus": 2, "summary": summarise_ab(raw),
                           "profile": {"name": "quick", "warmup": 1, "repeats": 3}})
    assert "| genai | 2 threads | 17 | 10.0 | 200 | 40.0 | 0.5–1.5 |" in md


def test_real_ab_on_the_tiny_model(tiny_onnx_model, tmp_path):
    data = run_threads_ab(tiny_onnx_model, tmp_path, [None, 1], TINY, rounds=2)
    assert [r["threads"] for r in data["runs"]] == [None, 1, None, 1], "interleaved"
    assert {s["threads"] for s in data["summary"]} == {"default", "1 threads"}
    assert all(s["rounds"] == 2 and s["decode_tps"] for s in data["summary"])


def test_ratios_compare_ours_and_the_peer_at_the_same_thread_count():
    summary = [{"backend": "genai", "threads": "1 threads", "target": 32, "prefill_tps": 300.0, "decode_tps": 90.0},
               {"backend": "genai", "threads": "2 threads", "target": 32, "prefill_tps": 500.0, "decode_tps": 60.0},
               {"backend": "llama.cpp:q4_0", "threads": "1 threads", "target": 32, "prefill_tps": 600.0,
                "decode_tps": 45.0},
               {"backend": "llama.cpp:q4_0", "threads": "2 threads", "target": 32, "prefill_tps": 250.0,
                "decode_tps": None}]
    ratios = ab_ratios(summary, ["llama.cpp:q4_0"])
    assert [(r["threads"], r["prefill"], r["decode"]) for r in ratios] == [("1 threads", 0.5, 2.0),
                                                                           ("2 threads", 2.0, None)]
    md = threads_markdown({"model_dir": "/m", "rounds": 1, "cpus": 2, "ratios": ratios,
                           "summary": [{**s, "prompt_tokens": 33, "ttft": 0.1, "load_min": 1.0, "load_max": 2.0}
                                       for s in summary], "profile": {"name": "quick", "warmup": 1, "repeats": 3}})
    assert "| genai | llama.cpp:q4_0 | 1 threads | 32 | 0.50× | 2.00× |" in md and "| 2.00× | – |" in md
