"""OpenAI tools and ``response_format`` for `invoke serve`, pure: a request with ``tools``, ``tool_choice``,
assistant ``tool_calls``, ``role: "tool"`` results or a JSON ``response_format`` becomes a plain request for Foundry
Local (:func:`prepare`), and its answer (whole, or streamed) becomes OpenAI ``tool_calls`` / checked JSON
(:func:`finish_completion`, :class:`StreamRewriter`).

What the pinned runtime (foundry-local-sdk 2.2.1) does, measured (docs/tools.md): given ``tools`` it writes its own
protocol into the prompt (a JSON array of ``{"name", "parameters"}`` between boundary tokens, a ``MESSAGE`` line
before text) with Qwen's token ids hard-coded (151657/151658: "Token range end too large" on any other vocabulary),
so no model here can use it; its constrained decoding (llguidance) works through ``response_format``
``lark_grammar``, while ``json_schema`` in OpenAI's form (``{"name", "schema"}``) is taken as the schema itself and
constrains nothing. So: the family's own tool format goes into the prompt (:mod:`scripts.families.tools`), the reply
is parsed and checked here, and ``tool_choice`` required / a named function and JSON ``response_format`` are a Lark
grammar the runtime enforces, checked again here. What cannot be honoured is an error the client sees.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from scripts.core.errors import ToolCallError
from scripts.families.jsonschema_lite import schema_errors
from scripts.families.tool_grammar import call_grammar, json_grammar
from scripts.families.tools import (StreamParser, ToolCall, ToolFormat, check_call,
                                    parse_reply, plain_messages, tool_schemas)
from scripts.serve.api import ApiError

CHOICES = ("none", "auto", "required")


@dataclass
class ToolContext:
    """What the answer to one request must be turned into: tool calls (``fmt``, ``schemas``), checked JSON
    (``json_schema``: a schema, ``{}`` for any object), or both unchecked (plain text)."""

    fmt: ToolFormat | None = None
    schemas: dict[str, dict] = field(default_factory=dict)
    choice: str = "none"               # none / auto / required / function
    parallel: bool = True
    json_schema: dict | None = None    # response_format: the schema the answer must satisfy

    @property
    def calls_possible(self) -> bool:
        return self.fmt is not None and self.choice != "none"


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


def _tool_choice(value: Any, schemas: dict[str, dict]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if schemas else "none"), None
    if isinstance(value, str):
        if value not in CHOICES:
            raise _bad(f"'tool_choice' must be one of {', '.join(CHOICES)} or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {value!r}.", "tool_choice")
        return value, None
    name = (value.get("function") or {}).get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or value.get("type") != "function":
        raise _bad("'tool_choice' as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                   "tool_choice")
    if name not in schemas:
        raise _bad(f"'tool_choice' names {name!r}, which is not among the declared tools "
                   f"({', '.join(schemas) or 'none'}).", "tool_choice")
    return "function", name


def _response_schema(fmt: Any) -> dict | None:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("'response_format' json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}.",
                       "response_format")
        return schema
    raise _bad(f"'response_format' type must be text, json_object or json_schema, got {kind!r}.", "response_format")


def needs_layer(body: dict[str, Any]) -> bool:
    """Whether a request uses tools or a JSON ``response_format`` (else it goes to the runtime as it is)."""
    return bool(body.get("tools") or body.get("tool_choice") is not None or body.get("response_format")
                or any(m.get("role") == "tool" or m.get("tool_calls") for m in body.get("messages", [])
                       if isinstance(m, dict)))


def prepare(body: dict[str, Any], spec: dict[str, Any] | None) -> tuple[dict[str, Any], ToolContext]:
    """The request for the runtime, and what its answer must become. ``spec``: the served model's
    :func:`scripts.families.tools.serving_spec` (None: its family has no tool format)."""
    out = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "parallel_tool_calls", "response_format")}
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}.", "tools")
    try:
        schemas = tool_schemas(tools)
    except ToolCallError as exc:
        raise _bad(str(exc), "tools") from None
    choice, named = _tool_choice(body.get("tool_choice"), schemas)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be true or false.", "parallel_tool_calls")
    has_tool_turns = any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                         for m in body["messages"])
    if (tools or has_tool_turns) and spec is None:
        raise _bad("This model's prompt format has no tool format in templates/families/ (<family>.tools.json), so "
                   "it cannot be given tools; send the request without 'tools'.", "tools")
    if choice in ("required", "function") and not schemas:
        raise _bad(f"'tool_choice' {choice!r} needs 'tools'.", "tool_choice")
    ctx = ToolContext(choice=choice, parallel=parallel, json_schema=_response_schema(body.get("response_format")))
    if ctx.json_schema is not None and choice in ("required", "function", "auto") and schemas:
        raise _bad("'response_format' JSON and tool calls cannot be combined in one request; send tool_choice "
                   "'none' with response_format, or leave response_format out.", "response_format")
    if spec is not None:
        ctx.fmt = ToolFormat.from_json(spec["family"], spec["format"])
        ctx.schemas = schemas
        shown = tools if choice != "none" else None   # "none": the model is not shown the tools
        try:
            out["messages"] = plain_messages(body["messages"], shown, ctx.fmt, spec.get("default_system", ""))
        except ToolCallError as exc:
            raise _bad(str(exc), "messages") from None
    if choice == "required":
        out["response_format"] = {"type": "lark_grammar", "lark_grammar": call_grammar(ctx.fmt, schemas, parallel)}
    elif choice == "function":
        out["response_format"] = {"type": "lark_grammar",
                                  "lark_grammar": call_grammar(ctx.fmt, {named: schemas[named]}, False)}
    elif ctx.json_schema is not None:
        out["response_format"] = {"type": "lark_grammar", "lark_grammar": json_grammar(ctx.json_schema)}
    return out, ctx


# ----- answers ---------------------------------------------------------------------------------------------------
def _invalid(message: str, code: str = "invalid_tool_call") -> ApiError:
    return ApiError(500, message, type="model_output_error", code=code)


def check_calls(ctx: ToolContext, calls: list[ToolCall], final: bool = True) -> None:
    """:class:`ApiError` unless ``calls`` are what the request allows (``final``: the whole answer is in)."""
    if calls and not ctx.calls_possible:
        raise _invalid(f"The model wrote a tool call although tool_choice is 'none' ({calls[0].name}); its answer "
                       "cannot be returned as text.")
    if len(calls) > 1 and not ctx.parallel:
        raise _invalid(f"The model made {len(calls)} calls although parallel_tool_calls is false.")
    if final and ctx.choice in ("required", "function") and not calls:
        raise _invalid("The model made no tool call although tool_choice requires one.")
    for call in calls:
        try:
            check_call(call, ctx.schemas)
        except ToolCallError as exc:
            raise _invalid(f"The model's tool call is not valid: {exc}") from None


def _cut_hint(message: str, finish_reason: str | None) -> str:
    return message + (" (the answer was cut at max_tokens: allow more tokens)" if finish_reason == "length" else "")


def check_json(ctx: ToolContext, text: str, finish_reason: str | None) -> None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _invalid(_cut_hint(f"The model's answer is not the JSON response_format asks for: {exc}; answer: "
                                 f"{text[:300]!r}", finish_reason), "response_format_unsatisfied") from None
    errors = schema_errors(value, ctx.json_schema)
    if errors:
        raise _invalid(f"The model's JSON does not satisfy the response_format schema: {'; '.join(errors[:3])}",
                       "response_format_unsatisfied")


def finish_completion(ctx: ToolContext, completion: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed runtime answer with its text turned into ``tool_calls`` (``finish_reason: "tool_calls"``,
    ``content`` the text before the calls, null when none) or checked as JSON; :class:`ApiError` when invalid."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    if ctx.fmt is not None:
        try:
            content, calls = parse_reply(text, ctx.fmt)
        except ToolCallError as exc:
            raise _invalid(_cut_hint(f"The model's tool call is not valid: {exc}", choice.get("finish_reason"))) from None
        check_calls(ctx, calls)
        if calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = [c.to_openai() for c in calls]
            choice["finish_reason"] = "tool_calls"
        text = message.get("content") or ""
    if ctx.json_schema is not None:
        check_json(ctx, text, choice.get("finish_reason"))
    choice["message"] = message
    return completion


class StreamRewriter:
    """Rewrites the runtime's SSE chunks of one streamed answer: content goes through a :class:`StreamParser`
    (text released as it comes, a possible call marker held back), each complete call becomes a
    ``delta.tool_calls`` chunk (id, name, JSON arguments, ``index``), the last chunk gets ``finish_reason:
    "tool_calls"``; a JSON answer is checked at its end. An invalid call or answer becomes an error event."""

    def __init__(self, ctx: ToolContext):
        self.ctx = ctx
        self.parser = StreamParser(ctx.fmt) if ctx.fmt is not None else None
        self.calls: list[ToolCall] = []
        self.text = ""
        self.template: dict[str, Any] = {}
        self.finish_reason = "stop"
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        c = {**self.template, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(c).encode() + b"\n\n"

    def _events(self, events) -> Iterator[bytes]:
        for kind, value in events:
            if kind == "text":
                self.text += value
                yield self._chunk({"content": value})
            else:
                self.calls.append(value)
                check_calls(self.ctx, self.calls, final=False)
                yield self._chunk({"tool_calls": [value.to_openai(len(self.calls) - 1)]})

    def feed(self, event: bytes) -> Iterator[bytes]:
        """One SSE event of the runtime in, the events to send out."""
        payload = next((line[5:].strip() for line in event.decode("utf-8", "replace").splitlines()
                        if line.startswith("data:")), None)
        if payload is None or payload == "[DONE]":
            yield from self.finish()
            if payload == "[DONE]":
                yield b"data: [DONE]\n\n"
            return
        doc = json.loads(payload)
        if not doc.get("choices"):  # a usage-only chunk
            yield event if event.endswith(b"\n\n") else event + b"\n\n"
            return
        self.template = {k: v for k, v in doc.items() if k != "choices"}
        choice = doc["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("role"):
            yield self._chunk({"role": delta["role"], "content": ""})
        piece = delta.get("content") or ""
        if piece:
            if self.parser is not None:
                try:
                    yield from self._events(self.parser.feed(piece))
                except ToolCallError as exc:
                    raise _invalid(f"The model's tool call is not valid: {exc}") from None
            else:
                self.text += piece
                yield self._chunk({"content": piece})
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def finish(self) -> Iterator[bytes]:
        if self.done:
            return
        self.done = True
        if self.parser is not None:
            try:
                yield from self._events(self.parser.finish())
            except ToolCallError as exc:
                raise _invalid(_cut_hint(f"The model's tool call is not valid: {exc}", self.finish_reason)) from None
            check_calls(self.ctx, self.calls)
        if self.ctx.json_schema is not None:
            check_json(self.ctx, self.text, self.finish_reason)
        yield self._chunk({}, "tool_calls" if self.calls else self.finish_reason)


def error_event(exc: ApiError) -> bytes:
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"

