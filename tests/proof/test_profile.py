"""Tests for scripts/proof/profile.py (`invoke profile`): attributing ONNX Runtime's kernel events to the prefill and
decode runs (pure, hand-made trace), and one real profiled generation of the tiny model."""
from __future__ import annotations

import json

import pytest

from scripts.core.errors import MeasurementError
from scripts.proof.profile import op_table, profile_markdown, run_profile, summarise_trace


def run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X"}


def kernel(ts: int, dur: int, op: str) -> dict:
    return {"cat": "Node", "name": f"/model/{op}_{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


EVENTS = [{"cat": "Session", "name": "model_loading_uri", "ts": 0, "dur": 50},
          run(100, 1000), kernel(110, 600, "MatMulNBits"), kernel(720, 300, "GroupQueryAttention"),
          kernel(1030, 100, "MatMulNBits"),
          {"cat": "Node", "name": "/model/x_fence_before", "ts": 200, "dur": 5, "args": {"op_name": "MatMulNBits"}},
          run(2000, 100), kernel(2010, 40, "MatMulNBits"), kernel(2060, 20, "GroupQueryAttention"),
          run(3000, 120), kernel(3010, 60, "MatMulNBits"), kernel(3080, 20, "GroupQueryAttention")]


def test_first_run_is_prefill_later_runs_are_decode_steps():
    s = summarise_trace(EVENTS)
    assert s["runs"] == 3 and s["prefill_ms"] == 1.0 and s["decode_ms_per_step"] == pytest.approx(0.11)
    pre = {r["op"]: r for r in s["prefill"]}
    assert pre["MatMulNBits"]["ms"] == pytest.approx(0.7) and pre["MatMulNBits"]["nodes"] == 2
    assert pre["MatMulNBits"]["share"] == pytest.approx(0.7) and s["prefill"][0]["op"] == "MatMulNBits"
    dec = {r["op"]: r for r in s["decode"]}
    assert dec["MatMulNBits"]["ms"] == pytest.approx(0.05) and dec["MatMulNBits"]["nodes"] == 1
    assert dec["GroupQueryAttention"]["share"] == pytest.approx(40 / 140)


def test_a_trace_without_runs_is_an_error():
    with pytest.raises(MeasurementError, match="no model_run"):
        summarise_trace([kernel(1, 1, "Add")])


def test_op_table_of_nothing():
    assert op_table([]) == []


def test_profile_of_the_tiny_model(tiny_onnx_model, tmp_path):
    data = run_profile(tiny_onnx_model, tmp_path, prompt_tokens=48, new_tokens=4)
    assert abs(data["prompt_tokens"] - 48) <= 3 and data["runs"] == 1 + data["decode_steps"]
    ops = {r["op"] for r in data["prefill"]}
    assert "MatMulNBits" in ops, ops  # an INT4 graph
    assert json.loads((tmp_path / "model" / "genai_config.json").read_text())["model"]["decoder"][
        "session_options"]["enable_profiling"].endswith("ort-profile")
    assert "enable_profiling" not in (tiny_onnx_model / "genai_config.json").read_text(), "the original is untouched"
    md = profile_markdown(data)
    assert "| MatMulNBits |" in md and "Decode (per step)" in md
