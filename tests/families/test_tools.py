"""Tool formats as data (templates/families/<family>.tools.json) against the published templates: the plain messages
:func:`scripts.families.tools.plain_messages` makes render, through the same template without tools, exactly what the
published template renders with tools (text and token ids), so Foundry Local (which applies the plain template) sees
what the model was trained on. Plus the reply parser (whole and streamed, split anywhere), the schema check and the
grammars given to the runtime."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.core.errors import ToolCallError
from scripts.families.jsonschema_lite import schema_errors, unchecked_keywords
from scripts.families.tool_grammar import call_grammar, json_grammar
from scripts.families.tools import (StreamParser, ToolCall, call_text, check_call, default_system,
                                    format_path, load_format, parse_reply, plain_messages, reply_calls,
                                    served_messages, serving_spec,
                                    tool_schemas)

PUBLISHED = Path(__file__).parent / "published"
FMT = load_format(format_path("chatml"), "chatml")
DAY = {"type": "object", "properties": {"day": {"type": "string", "enum": ["monday", "saturday"]}}, "required": ["day"]}
TOOLS = [{"type": "function", "function": {"name": "shop_hours", "description": "Hours of the shop — on a day.",
                                           "parameters": DAY}},
         {"type": "function", "function": {"name": "member_lookup", "description": "Find a member.", "parameters": {
             "type": "object", "properties": {"member_id": {"type": "string"}}, "required": ["member_id"]}}}]
U = {"role": "user", "content": "When is the shop open on Saturday?"}


def _call(i, name, args):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "user only": [U],
    "system + user": [{"role": "system", "content": "You help the orchard."}, U],
    "call + result": [U, {"role": "assistant", "content": None, "tool_calls": [_call(1, "shop_hours", {"day": "saturday"})]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"open": "08:00"}'}],
    "text + two calls + results + answer": [
        {"role": "system", "content": "Be brief."}, U,
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_call(1, "shop_hours", {"day": "saturday"}),
                                                                          _call(2, "member_lookup", {"member_id": "BW-0042 é"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "08:00-13:00"}, {"role": "tool", "tool_call_id": "call_2", "content": "Ada"},
        {"role": "assistant", "content": "Open 08:00-13:00."}, {"role": "user", "content": "Thanks"}],
}


def _hf_render(template: str, messages, tools=None, gen=True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template  # transformers' own tojson and env
    out = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=gen)
    return out[0][0] if isinstance(out, tuple) else out[0]


def _dict_arguments(messages):
    """The published template writes ``arguments | tojson``: give it objects, as transformers' users do."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                 for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_plain_messages_render_like_the_published_qwen25_template_with_tools(name, tiny_hf_model):
    from transformers import AutoTokenizer
    template = (PUBLISHED / "Qwen2.5-0.5B-Instruct.jinja").read_text(encoding="utf-8")
    messages = CONVERSATIONS[name]
    system = default_system(lambda m, g: _hf_render(template, m, gen=g))
    assert system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    published = _hf_render(template, _dict_arguments(messages), TOOLS)
    ours = _hf_render(template, plain_messages(messages, TOOLS, FMT, system))
    assert ours == published
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_model))
    assert tok.encode(ours, add_special_tokens=False) == tok.encode(published, add_special_tokens=False)


def test_serving_spec_finds_the_format_and_the_models_default_system_prompt():
    spec = serving_spec((PUBLISHED / "SmolLM2-135M-Instruct.jinja").read_text(encoding="utf-8"))
    assert spec["family"] == "chatml"
    assert spec["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert serving_spec(None) is None
    assert serving_spec((PUBLISHED / "Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8")) is None


def test_messages_without_tools_pass_unchanged():
    assert plain_messages([U], None, FMT, "ignored") == [U]


REPLY = 'Checking.\n<tool_call>\n{"name": "shop_hours", "arguments": {"day": "saturday"}}\n</tool_call>\n' \
        '<tool_call>\n{"name": "member_lookup", "arguments": {"member_id": "BW-0042"}}\n</tool_call>'


def test_parse_reply_finds_text_and_calls_in_order():
    text, calls = parse_reply(REPLY, FMT)
    assert text == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("shop_hours", {"day": "saturday"}), ("member_lookup", {"member_id": "BW-0042"})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_stream_parser_gives_the_same_answer_whatever_the_pieces(size):
    parser, events = StreamParser(FMT), []
    for i in range(0, len(REPLY), size):
        events += list(parser.feed(REPLY[i:i + size]))
    events += list(parser.finish())
    assert "".join(v for k, v in events if k == "text") == "Checking."
    assert [v.name for k, v in events if k == "call"] == ["shop_hours", "member_lookup"]
    assert not any("<tool" in v for k, v in events if k == "text")


def test_text_that_only_looks_like_a_marker_start_is_released():
    assert parse_reply("a < b and <tool", FMT) == ("a < b and <tool", [])


@pytest.mark.parametrize("tail", ["", "\n", "\n</t"])
def test_a_last_call_without_its_whole_end_marker_is_taken(tail):
    text, calls = parse_reply('<tool_call>\n{"name": "shop_hours", "arguments": {"day": "monday"}}' + tail, FMT)
    assert text == "" and calls[0].name == "shop_hours"


@pytest.mark.parametrize("body, problem", [('{"name": "x", "arguments": {', "not JSON"),
                                           ('{"arguments": {}}', "without a 'name'"),
                                           ('{"name": "x", "arguments": [1]}', "not a JSON object")])
def test_malformed_calls_are_errors_not_text(body, problem):
    with pytest.raises(ToolCallError, match=problem):
        parse_reply(f"<tool_call>\n{body}\n</tool_call>", FMT)


def test_check_call_refuses_undeclared_tools_and_schema_breaks():
    schemas = tool_schemas(TOOLS)
    check_call(ToolCall("c", "shop_hours", '{"day": "monday"}'), schemas)
    with pytest.raises(ToolCallError, match="not among the declared tools"):
        check_call(ToolCall("c", "weather", "{}"), schemas)
    with pytest.raises(ToolCallError, match="is not one of"):
        check_call(ToolCall("c", "shop_hours", '{"day": "friday"}'), schemas)
    with pytest.raises(ToolCallError, match="missing required property 'member_id'"):
        check_call(ToolCall("c", "member_lookup", "{}"), schemas)


def test_schema_subset():
    s = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}, "d": {"type": "string",
         "pattern": "^[0-9]{4}$"}}, "required": ["n"], "additionalProperties": False}
    assert schema_errors({"n": 2, "d": "2027"}, s) == []
    assert schema_errors({"n": True}, s) and schema_errors({"n": 0}, s) and schema_errors({"n": 1, "x": 1}, s)
    assert schema_errors({"n": 1, "d": "27"}, s)
    assert unchecked_keywords({"type": "object", "properties": {"a": {"$ref": "#/x", "format": "date"}}}) == {"$ref", "format"}


def test_call_text_writes_arguments_as_the_template_does():
    assert call_text(FMT, "shop_hours", '{"day": "monday"}') == \
        '<tool_call>\n{"name": "shop_hours", "arguments": {"day": "monday"}}\n</tool_call>'


def test_grammars_name_only_declared_tools_and_close_the_arguments():
    g = call_grammar(FMT, {"shop_hours": DAY}, parallel=False)
    assert g.startswith("start: call\n") and '"const": "shop_hours"' in g and '"additionalProperties": false' in g
    assert "(" in call_grammar(FMT, tool_schemas(TOOLS), parallel=True).splitlines()[0]
    assert json_grammar(None).startswith('start: %json {"type": "object"')


def test_reply_calls_for_scoring():
    assert reply_calls('Sure.\n<tool_call>\n{"name": "shop_hours", "arguments": {"day": "monday"}}\n</tool_call>', FMT) \
        == ([("shop_hours", {"day": "monday"})], "Sure.")
    assert reply_calls("Hello there.", FMT) == ([], "Hello there.")
    (name, why), = reply_calls('<tool_call>\n{"name": shop_hours}\n</tool_call>', FMT)[0]
    assert name == "<invalid>" and "not JSON" in why


def test_served_messages_are_plain_messages_with_the_specs_default_system():
    """What an in-process eval sends is what the server hands the runtime: SmolLM2's default system prompt first."""
    spec = serving_spec((PUBLISHED / "SmolLM2-135M-Instruct.jinja").read_text(encoding="utf-8"))
    served = served_messages(spec, [U], TOOLS)
    assert served == plain_messages([U], TOOLS, FMT, spec["default_system"])
    assert served[0]["content"].startswith("You are a helpful AI assistant named SmolLM")


def test_definitions_follow_a_system_text_after_a_blank_line_and_stand_alone_without_one():
    """Qwen2.5 and Qwen3 publish one layout: the system text, a blank line, "# Tools…" (an empty system message still
    gets the blank line); Qwen3, which has no default system prompt, writes "# Tools…" first when no system message is
    given. A model with a default system prompt gets it in front, as without tools."""
    alone = plain_messages([U], TOOLS, FMT, "")[0]["content"]
    assert alone.startswith("# Tools\n\nYou may call one or more functions")
    assert plain_messages([{"role": "system", "content": ""}, U], TOOLS, FMT, "")[0]["content"] == "\n\n" + alone
    assert plain_messages([U], TOOLS, FMT, "Be brief.")[0]["content"] == "Be brief.\n\n" + alone
