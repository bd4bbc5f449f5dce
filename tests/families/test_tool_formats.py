"""The tool formats beyond ChatML's (templates/families/<family>.tools.json): Phi-4-mini's definitions render like its
published template's system message with ``tools``; its calls (all of a turn's calls in one JSON list after a
``functools`` marker, no closing marker) are written, parsed whole and streamed, and constrained as the runtime's
grammar; every format's call markers are text the runtime's decoder keeps; a malformed format file is refused with
the key to mend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.core.errors import ToolCallError
from scripts.families.registry import get_family
from scripts.families.tool_grammar import call_grammar
from scripts.families.tools import (FAMILIES_DIR, StreamParser, ToolFormat, calls_text, format_path, load_format,
                                    parse_reply, plain_messages, serving_spec, tool_schemas)

PUBLISHED = Path(__file__).parent / "published"
PHI = load_format(format_path("phi-4-mini"), "phi-4-mini")
DAY = {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}
TOOLS = [{"type": "function", "function": {"name": "shop_hours", "description": "Hours — of the shop.", "parameters": DAY}},
         {"type": "function", "function": {"name": "member_lookup", "description": "Find a member.",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]
U = {"role": "user", "content": "When is the shop open on Saturday?"}
REPLY = 'Let me look.\nfunctools[{"name": "shop_hours", "arguments": {"day": "saturday"}}, ' \
        '{"name": "member_lookup", "arguments": {"id": "BW-0042"}}]'


def _published(messages, gen=True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    template = (PUBLISHED / "Phi-4-mini-instruct.jinja").read_text(encoding="utf-8")
    out = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen)
    return out[0][0] if isinstance(out, tuple) else out[0]


@pytest.mark.parametrize("system", [None, "You help the orchard."])
def test_phi4_mini_definitions_render_like_the_published_template(system):
    """The published template takes the tools as a system message's ``tools`` text (the function objects as one JSON
    list, as the model card shows them) after its content: our plain system message renders the same text."""
    spec = serving_spec((PUBLISHED / "Phi-4-mini-instruct.jinja").read_text(encoding="utf-8"))
    assert spec["family"] == "phi-4-mini" and spec["default_system"] == ""
    listed = json.dumps([t["function"] for t in TOOLS], ensure_ascii=False)
    instruction = PHI.before[:-len("<|tool|>[")]
    content = (system + PHI.after_system if system else "") + instruction
    published = _published([{"role": "system", "content": content, "tools": listed}, U])
    messages = ([{"role": "system", "content": system}] if system else []) + [U]
    ours = _published(plain_messages(messages, TOOLS, PHI, spec["default_system"]))
    assert ours == published
    assert "<|tool|>[{\"name\": \"shop_hours\"" in ours and ours.endswith("<|/tool|><|end|><|user|>" + U["content"] +
                                                                          "<|end|><|assistant|>")


def test_phi4_mini_calls_are_one_json_list_after_the_marker():
    assert calls_text(PHI, [("shop_hours", {"day": "saturday"}), ("member_lookup", '{"id": "BW-0042"}')]) == \
        REPLY.split("\n", 1)[1]
    text, calls = parse_reply(REPLY, PHI)
    assert text == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("shop_hours", {"day": "saturday"}), ("member_lookup", {"id": "BW-0042"})]
    assert [c.name for c in parse_reply('functools{"name": "shop_hours", "arguments": {}}', PHI)[1]] == ["shop_hours"]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_phi4_mini_calls_stream_whatever_the_pieces_and_end_with_their_json(size):
    parser, events = StreamParser(PHI), []
    for i in range(0, len(REPLY + " and more"), size):
        events += list(parser.feed((REPLY + " and more")[i:i + size]))
        if i + size >= len(REPLY):  # the list closed: both calls out before the reply ends
            assert [v.name for k, v in events if k == "call"] == ["shop_hours", "member_lookup"]
    events += list(parser.finish())
    assert "".join(v for k, v in events if k == "text") == "Let me look."
    assert parser.trailing == " and more"


@pytest.mark.parametrize("reply, problem", [("functools[]", "empty list"), ('functools[{"name": "x", "argu', "not JSON"),
                                            ('functools[{"arguments": {}}]', "without a 'name'")])
def test_phi4_mini_malformed_calls_are_errors(reply, problem):
    with pytest.raises(ToolCallError, match=problem):
        parse_reply(reply, PHI)


def test_phi4_mini_grammar_is_one_list_and_one_call_unless_parallel():
    one = call_grammar(PHI, {"shop_hours": DAY}, parallel=False)
    assert one.startswith('start: call\ncall: "functools" %json {"type": "array"') and '"maxItems": 1' in one
    many = call_grammar(PHI, tool_schemas(TOOLS), parallel=True)
    assert '"maxItems"' not in many and '"minItems": 1' in many and "(" not in many.splitlines()[0]


@pytest.mark.parametrize("path", sorted(FAMILIES_DIR.glob("*.tools.json")), ids=lambda p: p.name)
def test_call_markers_are_text_the_runtime_keeps(path):
    """ONNX Runtime GenAI drops special tokens when it decodes (docs/tools.md), so a call marker that is one of the
    family's special tokens would never reach the parser: every format's markers are plain text."""
    family = path.name[:-len(".tools.json")]
    fmt = load_format(path, family)
    special = set(get_family(family).special_tokens)
    assert fmt.call_start.strip() and fmt.call_start.strip() not in special
    assert fmt.call_end.strip() not in special or not fmt.call_end.strip()


@pytest.mark.parametrize("change, problem", [
    (("call", "body", "list"), "call.body is 'list'; it must be one of object, array"),
    (("definitions", "shape", "schema"), "definitions.shape is 'schema'"),
    (("result", "role", "tool"), "result.role is 'tool'; it must be one of user, system"),
    (("call", "start", " "), "call.start must be text"),
    (("definitions", "turn", "first_user"), "only definitions in the system turn")])
def test_a_malformed_format_is_refused_with_the_key_to_mend(change, problem):
    data = json.loads(format_path("phi-4-mini").read_text(encoding="utf-8"))
    section, key, value = change
    data[section][key] = value
    with pytest.raises(ToolCallError, match=problem.replace("(", r"\(")):
        ToolFormat.from_json("phi-4-mini", data)
