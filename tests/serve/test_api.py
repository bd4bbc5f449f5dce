"""`invoke serve`'s pure OpenAI side (:mod:`scripts.serve.api`): generation defaults from
``genai_config.json``, request checks, OpenAI-style errors and the runtime's errors translated, URLs."""
from __future__ import annotations

import json

import pytest

from scripts.serve import api as sv

MODEL_ID = "tiny-qwen2:1"
HELLO = [{"role": "user", "content": "Hello"}]


def test_generation_defaults_follow_genai_config_search():
    assert sv.generation_defaults({"search": {"do_sample": False, "temperature": 0.7}}) == {"temperature": 0.0}
    assert sv.generation_defaults({}) == {"temperature": 0.0}
    assert sv.generation_defaults({"search": {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}}) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20}


def test_apply_defaults_fills_only_what_the_client_left_out():
    body = {"model": MODEL_ID, "messages": HELLO}
    out = sv.apply_defaults(body, {"temperature": 0.6, "top_k": 20}, prompt_tokens=13, context_limit=512)
    assert out["temperature"] == 0.6 and out["metadata"] == {"top_k": "20"} and out["max_tokens"] == 499
    assert body == {"model": MODEL_ID, "messages": HELLO}  # not modified in place
    mine = sv.apply_defaults({**body, "temperature": 1.2, "max_completion_tokens": 5, "metadata": {"top_k": "3"}},
                             {"temperature": 0.0, "top_k": 20}, 13, 512)
    assert mine["temperature"] == 1.2 and mine["metadata"] == {"top_k": "3"} and "max_tokens" not in mine
    assert sv.apply_defaults(body, {}, 13, 4096, max_length=512)["max_tokens"] == 499  # search.max_length caps it
    assert sv.apply_defaults(body, {}, 2410, 512)["max_tokens"] == 1  # over-long prompt: the runtime's own 400


@pytest.mark.parametrize("body, param, status", [
    ({"messages": HELLO}, "model", 400),
    ({"model": "other:1", "messages": HELLO}, "model", 404),
    ({"model": MODEL_ID, "messages": []}, "messages", 400),
    ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role", 400),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": 3}]}, "messages.[0].content", 400),
    ({"model": MODEL_ID, "messages": HELLO, "max_tokens": "x"}, "max_tokens", 400),
    ({"model": MODEL_ID, "messages": HELLO, "max_tokens": 0}, "max_tokens", 400),
    ({"model": MODEL_ID, "messages": HELLO, "temperature": 3}, "temperature", 400),
    ({"model": MODEL_ID, "messages": HELLO, "stop": [""]}, "stop", 400),
    ({"model": MODEL_ID, "messages": HELLO, "n": 2}, "n", 400),
    ({"model": MODEL_ID, "messages": HELLO, "stream": "yes"}, "stream", 400),
])
def test_check_chat_request_refuses_what_the_runtime_would_silently_accept(body, param, status):
    with pytest.raises(sv.ApiError) as info:
        sv.check_chat_request(body, MODEL_ID)
    assert (info.value.status, info.value.param) == (status, param)
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_check_chat_request_resolves_the_bare_name_and_moves_top_k():
    out = sv.check_chat_request({"model": "tiny-qwen2", "messages": HELLO, "top_k": 5, "max_tokens": None}, MODEL_ID)
    assert out == {"model": MODEL_ID, "messages": HELLO, "metadata": {"top_k": "5"}}


def test_parse_json_body_and_runtime_errors():
    with pytest.raises(sv.ApiError, match="could not parse the JSON body"):
        sv.parse_json_body(b'{"model": ')
    with pytest.raises(sv.ApiError, match="must be a JSON object, not list"):
        sv.parse_json_body(b"[1]")
    over = sv.runtime_error(400, json.dumps({"error": {"message": (
        "Invalid request: search_options.cc:108 int fl::ValidateGeneratorRequestBudget(int64_t, int, int) request "
        "requires 2415 total tokens (2410 input + 5 output), which exceeds the model's maximum context length of 512 "
        "tokens"), "type": "invalid_request_error"}}))
    assert over.status == 400 and over.code == "context_length_exceeded"
    assert over.message.startswith("request requires 2415 total tokens")
    plain = sv.runtime_error(404, "server=oatpp/1.3.0\ncode=404\ndescription=Not Found\nmessage=No mapping for X\n")
    assert plain.body() == {"error": {"message": "No mapping for X", "type": "invalid_request_error", "param": None,
                                      "code": None}}
    assert sv.sse_error(b'data: {"error": {"message": "boom", "type": "invalid_request_error"}}').status == 400
    assert sv.sse_error(b'data: {"choices": []}') is None


def test_base_url_and_loopback():
    assert sv.base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/v1" and sv.base_url("::1", 80) == "http://[::1]:80/v1"
    assert sv.is_loopback("127.0.0.1") and sv.is_loopback("localhost") and not sv.is_loopback("0.0.0.0")
