"""OpenAI tools and response_format through `invoke serve`: the real server (Foundry Local's service behind the layer of
scripts/serve/tools.py) on a free loopback port, asked with the official ``openai`` client. The tiny model's words are
noise, so what is checked is what the layer and the runtime guarantee: tool_choice required / a named function give
schema-valid calls (the runtime's constrained decoding), streamed calls are assembled by the client, ``none`` and
``auto`` never leave call markers in ``content``, the agent loop (call -> tool result -> answer) completes, and JSON
response formats parse and validate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from scripts.families.jsonschema_lite import schema_errors
from scripts.serve import server as sv
from scripts.serve.client import openai_client, tool_answer

MODEL_ID = "tiny-qwen2:1"
DAY = {"type": "object", "properties": {"day": {"type": "string", "enum": ["monday", "saturday"]}}, "required": ["day"]}
FRUIT = {"type": "object", "properties": {"fruit": {"type": "string", "enum": ["apples", "pears"]}}, "required": ["fruit"]}
TOOLS = [{"type": "function", "function": {"name": "shop_hours", "description": "Shop hours on a day.", "parameters": DAY}},
         {"type": "function", "function": {"name": "stock", "description": "Crates of a fruit.", "parameters": FRUIT}}]
SCHEMAS = {"shop_hours": DAY, "stock": FRUIT}
ASK = [{"role": "user", "content": "When is the shop open on Saturday?"}]


@pytest.fixture(scope="module")
def tiny_long_model(tmp_path_factory) -> Path:
    """The session's tiny model built with 2,048 positions instead of 512: the Hermes tool preamble alone is ~500 of
    its byte-level tokens."""
    import sys

    from tests.conftest import _BUILD_TINY, _isolated_env, _run
    root = tmp_path_factory.mktemp("tiny_long")
    script = root / "build.py"
    script.write_text(_BUILD_TINY.replace("max_position_embeddings=512", "max_position_embeddings=2048"))
    env = _isolated_env(root / "home")
    _run([sys.executable, str(script), str(root / "hf")], env, "Building the tiny model")
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(root / "hf"), "-o", str(root / "onnx"),
          "-p", "int4", "-e", "cpu", "-c", str(root / "cache")], env, "Converting the tiny model")
    (root / "onnx" / "inference_model.json").write_text(json.dumps({"Name": "tiny-qwen2"}))
    return root / "onnx"


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_long_model):
    home = tmp_path_factory.mktemp("tools-home")
    cache = tmp_path_factory.mktemp("tools-cache")
    model_dir = cache / "slmops" / "tiny-qwen2"
    shutil.copytree(tiny_long_model, model_dir)
    plan = sv.plan_serve(cache, model_dir, MODEL_ID, port=0)
    assert plan.tools and plan.tools["family"] == "chatml"
    srv = sv.ServerProcess(plan, log_path=home / "server.log",
                           env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}).start()
    yield openai_client(srv.base_url, timeout=120)
    srv.stop()


def ask(client, **kw):
    return client.chat.completions.create(model=kw.pop("model", MODEL_ID), messages=kw.pop("messages", ASK),
                                          tools=kw.pop("tools", TOOLS), max_tokens=kw.pop("max_tokens", 60), **kw)


def streamed(client, **kw) -> tuple[str, list[dict], str | None]:
    text, calls, finish = "", {}, None
    for chunk in ask(client, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


def assert_valid(name: str, arguments: str, allowed=SCHEMAS):
    assert name in allowed
    assert schema_errors(json.loads(arguments), allowed[name]) == []


@pytest.mark.parametrize("choice, allowed", [("required", SCHEMAS),
                                             ({"type": "function", "function": {"name": "stock"}}, {"stock": FRUIT})])
def test_required_and_named_choice_give_valid_calls(client, choice, allowed):
    """One call per turn here (parallel_tool_calls false): a random model given the choice may chain calls up to
    max_tokens; the parallel form is covered in tests/families/test_tools.py."""
    r = ask(client, tool_choice=choice, parallel_tool_calls=False, max_tokens=150)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    for call in r.choices[0].message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert_valid(call.function.name, call.function.arguments, allowed)
    text, calls, finish = streamed(client, tool_choice=choice, parallel_tool_calls=False, max_tokens=150)
    assert finish == "tool_calls" and text == "" and calls
    for c in calls:
        assert_valid(c["name"], c["arguments"], allowed)


@pytest.mark.parametrize("choice", ["none", "auto", None])
def test_none_and_auto_leave_no_call_markers_in_content(client, choice):
    kw = {} if choice is None else {"tool_choice": choice}
    r = ask(client, **kw)
    message = r.choices[0].message
    assert "<tool_call>" not in (message.content or "")
    if choice == "none":
        assert not message.tool_calls
    for call in message.tool_calls or []:
        assert_valid(call.function.name, call.function.arguments)
    text, calls, _ = streamed(client, **kw)
    assert "<tool_call>" not in text


def test_agent_loop_call_result_answer(client):
    first = ask(client, tool_choice={"type": "function", "function": {"name": "shop_hours"}}, max_tokens=150)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"open": "08:00", "close": "13:00"})}]
    final = ask(client, messages=history, tool_choice="none", max_tokens=20)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_named_choice_of_an_undeclared_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not among the declared tools"):
        ask(client, tool_choice={"type": "function", "function": {"name": "weather"}})


def test_json_schema_answers_parse_and_validate(client):
    for _ in range(3):
        r = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=60, response_format={
            "type": "json_schema", "json_schema": {"name": "hours", "schema": DAY}})
        assert schema_errors(json.loads(r.choices[0].message.content), DAY) == []


def test_json_object_answer_is_an_object_or_a_clear_error(client):
    try:
        r = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=60,
                                           response_format={"type": "json_object"})
    except openai.InternalServerError as exc:  # an unbounded object cut at max_tokens: said, never returned as text
        assert "response_format" in str(exc) and "max_tokens" in str(exc)
    else:
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_answer_reads_calls_as_a_client_does(client, stream):
    """scripts/serve/client.py tool_answer (what `invoke serve --check` scores): calls as (name, arguments)."""
    calls, text = tool_answer(client, MODEL_ID, ASK, TOOLS, stream=stream, max_tokens=150, tool_choice="required",
                              parallel_tool_calls=False)
    assert calls and text == ""
    for name, arguments in calls:
        assert_valid(name, json.dumps(arguments))
    calls, text = tool_answer(client, MODEL_ID, ASK, TOOLS, stream=stream, max_tokens=20, tool_choice="none")
    assert calls == [] and "<tool_call>" not in text


def test_serve_check_scores_tool_cases_in_process_and_over_http(tmp_path, tiny_long_model):
    """`invoke serve --check` with a tool set: the same cases asked in-process (as the server would write them) and
    over HTTP streamed and not; a random model's scores are noise, the counts and the three ways are not."""
    from scripts.commands.serve_check import failure_message, run_serve_check
    from scripts.core.tool_evalset import cases
    model_dir = tmp_path / "cache" / "slmops" / "tiny-qwen2"
    shutil.copytree(tiny_long_model, model_dir)
    found = cases([{"split": "heldout", "tools": TOOLS, "messages": ASK + [{"role": "assistant", "content": None,
                    "tool_calls": [{"function": {"name": "shop_hours", "arguments": '{"day": "saturday"}'}}]}]},
                   {"split": "heldout", "tools": TOOLS, "messages": [{"role": "user", "content": "Hello!"},
                                                                     {"role": "assistant", "content": "Hi."}]}])
    home = tmp_path / "home"
    result = run_serve_check(tmp_path / "cache", model_dir, MODEL_ID, [], 24, log_path=tmp_path / "server.log",
                             env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}, tool_cases=found)
    assert list(result["tools"]) == ["in-process (SDK)", "HTTP streaming", "HTTP non-streaming"]
    for score in result["tools"].values():
        assert (score["calls"], score["no_calls"]) == (1, 1) and score["figure"].startswith("calls ")
    assert result["questions"] == 0
    # the verdict reads each way's rates as ToolScore.passes does: nothing asked of them passes, more than all fails
    assert failure_message(result, 0.0) is None
    assert "on the held-out tool cases: in-process (SDK): calls " in failure_message(result, 1.01)


@pytest.fixture(scope="module")
def phi_client(tmp_path_factory, tiny_long_model):
    """The same tiny weights with Phi-4-mini's published chat template: the server speaks its tool format
    (templates/families/phi-4-mini.tools.json: definitions between <|tool|> tags, calls as functools[...])."""
    home = tmp_path_factory.mktemp("phi-home")
    cache = tmp_path_factory.mktemp("phi-cache")
    model_dir = cache / "slmops" / "tiny-phi"
    shutil.copytree(tiny_long_model, model_dir)
    template = (Path(__file__).resolve().parents[1] / "families" / "published" / "Phi-4-mini-instruct.jinja").read_text(
        encoding="utf-8")
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    (model_dir / "inference_model.json").write_text(json.dumps({"Name": "tiny-phi"}))
    plan = sv.plan_serve(cache, model_dir, "tiny-phi:1", port=0)
    assert plan.tools and plan.tools["family"] == "phi-4-mini"
    srv = sv.ServerProcess(plan, log_path=home / "server.log",
                           env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}).start()
    yield openai_client(srv.base_url, timeout=120)
    srv.stop()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "stock"}}])
def test_phi4_mini_format_through_the_runtime(phi_client, choice):
    """Phi-4-mini's calls (one JSON list after ``functools``, no closing marker) through Foundry Local's constrained
    decoding and the layer's parser, whole and streamed; the loop's result goes back and the reply is text. One call
    per turn (a random model allowed a list may fill max_tokens with it; lists of several: test_tool_formats.py)."""
    allowed = SCHEMAS if choice == "required" else {"stock": FRUIT}
    r = ask(phi_client, model="tiny-phi:1", tool_choice=choice, parallel_tool_calls=False, max_tokens=150)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls and len(calls) == 1
    assert_valid(calls[0].function.name, calls[0].function.arguments, allowed)
    text, streamed_calls, finish = streamed(phi_client, model="tiny-phi:1", tool_choice=choice,
                                            parallel_tool_calls=False, max_tokens=150)
    assert finish == "tool_calls" and text == "" and len(streamed_calls) == 1
    assert_valid(streamed_calls[0]["name"], streamed_calls[0]["arguments"], allowed)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                     {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"crates": 42})}]
    final = ask(phi_client, model="tiny-phi:1", messages=history, tool_choice="none", max_tokens=20)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
