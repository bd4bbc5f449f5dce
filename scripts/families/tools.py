"""Tool calling as a family's data says it (``templates/families/<family>.tools.json``), pure: OpenAI-style messages
with ``tools`` / ``tool_calls`` / ``role: "tool"`` turned into the plain messages a model's *plain* chat template
renders to the same tokens as its published template with tools (:func:`plain_messages`), and a model's output
turned back into text and tool calls (:func:`parse_reply`, :class:`StreamParser`), each call checked against the
declared JSON schema (:func:`check_call`).

Why plain messages: Foundry Local 2.2.1 replaces a model's own tool format with a protocol of its own when tools
are registered (a JSON array with ``parameters``, a ``MESSAGE`` framing line, Qwen's token ids hard-coded), which no
published model and no fine-tune here was trained on. So the tools are written into the prompt the way the model
learnt them, and its reply is parsed here (README "Tools").
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from scripts.core.errors import ToolCallError


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool format (the fields of ``<family>.tools.json``)."""

    family: str
    after_system: str    # between a system text (a system message, even empty, or the default) and ``before``
    before: str          # before the first tool definition
    each: str            # one tool definition; ``{tool}`` is the tool's JSON
    after: str           # after the last tool definition
    call_start: str
    call_end: str        # "": a call ends where its JSON ends
    call_separator: str  # between two calls of one turn (one object per marker pair)
    after_content: str   # between an assistant's text and its first call
    name_key: str
    arguments_key: str
    parallel: bool
    result_role: str
    result_start: str
    result_end: str
    result_separator: str
    separator: str = ""          # between two tool definitions
    shape: str = "openai"        # a definition as OpenAI sends it, or "function": only its "function" object
    call_body: str = "object"    # one call object per marker pair, or "array": all of a turn's calls in one JSON array

    @classmethod
    def from_json(cls, family: str, data: dict[str, Any]) -> "ToolFormat":
        d, c, r = data["definitions"], data["call"], data["result"]
        if d.get("turn", "system") != "system":
            raise ToolCallError(f"{family}.tools.json: only definitions in the system turn are supported.")
        for key, value, allowed in (("definitions.shape", d.get("shape", "openai"), ("openai", "function")),
                                    ("call.body", c.get("body", "object"), ("object", "array")),
                                    ("result.role", r["role"], RESULT_ROLES)):
            if value not in allowed:
                raise ToolCallError(f"{family}.tools.json: {key} is {value!r}; it must be one of {', '.join(allowed)}.")
        if not c["start"].strip():
            raise ToolCallError(f"{family}.tools.json: call.start must be text that begins a call.")
        return cls(family=family, after_system=d["after_system"], before=d["before"], each=d["each"], after=d["after"],
                   call_start=c["start"], call_end=c["end"], call_separator=c.get("separator", ""),
                   after_content=c["after_content"], name_key=c["name_key"], arguments_key=c["arguments_key"],
                   parallel=bool(c["parallel"]), result_role=r["role"], result_start=r["start"], result_end=r["end"],
                   result_separator=r["separator"], separator=d.get("separator", ""),
                   shape=d.get("shape", "openai"), call_body=c.get("body", "object"))


#: The roles a tool result can be sent back in: those Foundry Local's request takes (an ``ipython`` or ``tool`` turn
#: of a published template cannot be rendered through the installed PromptTemplate).
RESULT_ROLES = ("user", "system")
FAMILIES_DIR = Path(__file__).resolve().parents[2] / "templates" / "families"


def format_path(family: str, folder: Path = FAMILIES_DIR) -> Path:
    return folder / f"{family}.tools.json"


def load_format(path: Path, family: str) -> ToolFormat:
    try:
        return ToolFormat.from_json(family, json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as exc:
        raise ToolCallError(f"{path}: not a readable tool format ({exc!r}).") from exc


def default_system(render: Callable[[list[dict], bool], str]) -> str:
    """The system text a chat template puts in when no system message is given ("" when none): what a conversation
    without one renders in the place a system message's content takes."""
    marker, user = "SLMOPSSYSTEMMARK", {"role": "user", "content": "SLMOPSUSER"}
    try:
        with_system = render([{"role": "system", "content": marker}, user], False)
    except Exception:  # a template that refuses system messages has no default to find
        return ""
    without = render([user], False)
    pre, _, post = with_system.partition(marker)
    if without.startswith(pre) and without.endswith(post) and len(without) >= len(pre) + len(post):
        return without[len(pre):len(without) - len(post)]
    return ""


def serving_spec(chat_template: str | None) -> dict[str, Any] | None:
    """What a server needs to speak tools for a model with ``chat_template``: ``{"family", "format" (the
    ``<family>.tools.json`` data), "default_system"}``; None when no family with a tool format matches the template
    (the server then refuses ``tools`` with a clear error)."""
    from scripts.families.registry import by_markers
    from scripts.families.templates import render_chat_template

    if not chat_template:
        return None
    for family in by_markers(chat_template):
        path = format_path(family.name)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            ToolFormat.from_json(family.name, data)  # refuse a malformed file here, not per request
            system = default_system(lambda m, g: render_chat_template(chat_template, m, add_generation_prompt=g))
            return {"family": family.name, "format": data, "default_system": system}
    return None


def tojson(value: Any) -> str:
    """JSON as the ``tojson`` filter of ``transformers``' chat templates writes it (key order kept, non-ASCII
    kept, ``", "`` and ``": "`` separators): the tokens a model saw in training."""
    return json.dumps(value, ensure_ascii=False)


# ----- requests: OpenAI messages -> plain messages ------------------------------------------------------------------
def definitions_text(fmt: ToolFormat, tools: Sequence[dict]) -> str:
    shown = [t.get("function", t) if fmt.shape == "function" else t for t in tools]
    return fmt.before + fmt.separator.join(fmt.each.replace("{tool}", tojson(t)) for t in shown) + fmt.after


def call_object(fmt: ToolFormat, name: str, arguments: Any) -> str:
    """One call's JSON object as the model writes it; ``arguments`` a JSON object (or its text, as OpenAI sends it)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ToolCallError(f"tool call {name!r}: its arguments are not JSON ({exc}).") from None
    return "{" + tojson(fmt.name_key) + ": " + tojson(name) + ", " + tojson(fmt.arguments_key) + ": " \
        + tojson(arguments) + "}"


def call_text(fmt: ToolFormat, name: str, arguments: Any) -> str:
    """One call as the model writes it, with its markers."""
    return calls_text(fmt, [(name, arguments)])


def calls_text(fmt: ToolFormat, calls: Sequence[tuple[str, Any]]) -> str:
    """One turn's calls (``(name, arguments)`` pairs) as the model writes them: each between the markers, or (body
    ``array``) all in one JSON array between them."""
    objects = [call_object(fmt, name, arguments) for name, arguments in calls]
    if fmt.call_body == "array":
        return fmt.call_start + "[" + ", ".join(objects) + "]" + fmt.call_end
    return fmt.call_separator.join(fmt.call_start + body + fmt.call_end for body in objects)


def plain_messages(messages: Sequence[dict], tools: Sequence[dict] | None, fmt: ToolFormat,
                   default_system: str = "") -> list[dict[str, str]]:
    """``messages`` (OpenAI chat format: assistant ``tool_calls``, ``role: "tool"`` results) and ``tools`` as plain
    ``{role, content}`` messages: the tool definitions appended to the system message (the model's
    ``default_system`` when none is given; nothing before them when there is neither), each assistant's calls written after its text, consecutive tool results
    gathered in one ``result_role`` turn. Without tools and tool turns, the messages come back unchanged."""
    out: list[dict[str, str]] = []
    msgs = list(messages)
    if tools:
        if msgs and msgs[0].get("role") == "system":
            head = str(msgs.pop(0).get("content") or "") + fmt.after_system
        else:
            head = default_system + fmt.after_system if default_system else ""
        out.append({"role": "system", "content": head + definitions_text(fmt, tools)})
    pending: list[str] = []

    def flush() -> None:
        if pending:
            out.append({"role": fmt.result_role, "content": fmt.result_separator.join(pending)})
            pending.clear()

    for m in msgs:
        role = m.get("role")
        if role == "tool":
            pending.append(fmt.result_start + _content_text(m.get("content")) + fmt.result_end)
            continue
        flush()
        content = _content_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            fns = [c.get("function", c) for c in m["tool_calls"]]
            calls = calls_text(fmt, [(f["name"], f.get("arguments", {})) for f in fns])
            content = (content + fmt.after_content if content else "") + calls
        out.append({"role": role, "content": content})
    flush()
    return out


def served_messages(spec: dict[str, Any], messages: Sequence[dict], tools: Sequence[dict] | None) -> list[dict[str, str]]:
    """The plain messages ``invoke serve`` hands the runtime for ``messages`` and ``tools`` (``tool_choice`` auto), for a
    model whose :func:`serving_spec` is ``spec``: what an in-process eval sends to answer like the server."""
    return plain_messages(messages, tools, ToolFormat.from_json(spec["family"], spec["format"]),
                          spec.get("default_system", ""))


def served_cases(spec: dict[str, Any] | None, cases: Sequence[Any]) -> tuple[list[list[dict[str, str]]], ToolFormat] | None:
    """Tool cases (each with ``messages`` and ``tools``) as the plain conversations ``invoke serve`` hands the runtime
    for a model whose :func:`serving_spec` is ``spec``, and the format to read its replies with; None when ``spec`` is
    None (the model's template matches no family with a tool format)."""
    if spec is None:
        return None
    return ([served_messages(spec, c.messages, c.tools) for c in cases],
            ToolFormat.from_json(spec["family"], spec["format"]))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# ----- replies: model text -> text + calls --------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of the argument object."""

    id: str
    name: str
    arguments: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def decode_call(fmt: ToolFormat, obj: Any, body: str, call_id: str | None = None) -> ToolCall:
    """One decoded call object as a :class:`ToolCall`; :class:`ToolCallError` when it is not
    ``{name_key: str, arguments_key: object}`` (``body``: the text it came from, for the message)."""
    if not isinstance(obj, dict) or not isinstance(obj.get(fmt.name_key), str):
        raise ToolCallError(f"the model wrote a tool call without a {fmt.name_key!r} string: {body.strip()[:300]!r}")
    args = obj.get(fmt.arguments_key, {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if not isinstance(args, dict):
        raise ToolCallError(f"the model called {obj[fmt.name_key]!r} with arguments that are not a JSON object: "
                            f"{tojson(args)[:300]}")
    return ToolCall(call_id or new_call_id(), obj[fmt.name_key], json.dumps(args, ensure_ascii=False))


def decode_calls(fmt: ToolFormat, body: str) -> list[ToolCall]:
    """The JSON between a call's markers as its :class:`ToolCall` (body ``array``: one per element; a lone object is
    taken as one call); :class:`ToolCallError` when it is not JSON or not calls."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ToolCallError(f"the model wrote a tool call that is not JSON ({exc}): {body.strip()[:300]!r}") from None
    if fmt.call_body == "array" and isinstance(value, list):
        if not value:
            raise ToolCallError(f"the model wrote an empty list of tool calls: {body.strip()[:300]!r}")
        return [decode_call(fmt, obj, body) for obj in value]
    return [decode_call(fmt, value, body)]


def _json_end(text: str) -> int | None:
    """Where the JSON value that ``text`` starts with (after blanks) ends, or None while it is incomplete."""
    stripped = text.lstrip()
    try:
        _value, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return None
    return len(text) - len(stripped) + end


def parse_reply(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """A whole reply as ``(text before the first call, calls)``. A last call whose end marker is missing (the model
    stopped right after its JSON) is still taken; text after a call is dropped."""
    parser = StreamParser(fmt)
    events = list(parser.feed(text)) + list(parser.finish())
    return ("".join(v for k, v in events if k == "text"), [v for k, v in events if k == "call"])


def reply_calls(text: str, fmt: ToolFormat) -> tuple[list[tuple[str, Any]], str]:
    """A whole reply as ``(calls as (name, parsed arguments), text)``, for scoring: a call that cannot be decoded is
    one call named ``"<invalid>"`` with the reason as its arguments (it can match no expectation)."""
    try:
        content, calls = parse_reply(text, fmt)
    except ToolCallError as exc:
        return [("<invalid>", str(exc))], ""
    return [(c.name, json.loads(c.arguments)) for c in calls], content


class StreamParser:
    """Incremental :func:`parse_reply`: :meth:`feed` text pieces as they stream, get ``("text", str)`` events (text
    that cannot be the start of a call marker is released at once; a possible marker prefix is held back) and
    ``("call", ToolCall)`` events once a call's end marker arrives (a format without one: once its JSON is complete);
    :meth:`finish` at the end of the reply."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buffer = ""
        self.in_call = False
        self.calls = 0
        self.trailing = ""  # text after the calls (dropped, kept for diagnostics)
        self.start = fmt.call_start.strip()
        self.end = fmt.call_end.strip()

    def feed(self, piece: str) -> Iterable[tuple[str, Any]]:
        self.buffer += piece
        while True:
            if not self.in_call:
                i = self.buffer.find(self.start)
                if i < 0:
                    keep = max(_partial_suffix(self.buffer, self.start),
                               _partial_suffix(self.buffer, self.fmt.after_content + self.start))
                    text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    if text:
                        if self.calls:
                            self.trailing += text
                        else:
                            yield "text", text
                    return
                before = self.buffer[:i]
                if before and not self.calls:
                    # the separator between text and the first call is format, not content
                    sep = self.fmt.after_content
                    yield "text", before[:-len(sep)] if sep and before.endswith(sep) else before
                elif before.strip():
                    self.trailing += before
                self.buffer = self.buffer[i + len(self.start):]
                self.in_call = True
            j = self.buffer.find(self.end) if self.end else _json_end(self.buffer)
            if j is None or j < 0:
                return
            body, self.buffer = self.buffer[:j], self.buffer[j + len(self.end):]
            self.in_call = False
            for call in decode_calls(self.fmt, body):
                self.calls += 1
                yield "call", call

    def finish(self) -> Iterable[tuple[str, Any]]:
        if self.in_call:
            self.in_call = False
            body, self.buffer = self.buffer, ""
            body = body[:len(body) - _partial_suffix(body, self.fmt.call_end)]  # an end marker cut short
            if body.strip():
                for call in decode_calls(self.fmt, body):
                    self.calls += 1
                    yield "call", call
            return
        if self.buffer:
            rest, self.buffer = self.buffer, ""
            if self.calls:
                self.trailing += rest
            else:
                yield "text", rest


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker`` (to hold back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ----- checking a call against its declared tool ---------------------------------------------------------------------
def tool_schemas(tools: Sequence[dict]) -> dict[str, dict]:
    """``{name: parameters schema}`` of OpenAI ``tools``; :class:`ToolCallError` on a malformed or repeated tool."""
    out: dict[str, dict] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolCallError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}}.")
        if fn["name"] in out:
            raise ToolCallError(f"tools[{i}]: the function name {fn['name']!r} is declared twice.")
        out[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def check_call(call: ToolCall, schemas: dict[str, dict]) -> None:
    """:class:`ToolCallError` unless ``call`` names a declared tool and its arguments satisfy that tool's schema."""
    from scripts.families.jsonschema_lite import schema_errors

    if call.name not in schemas:
        raise ToolCallError(f"the model called {call.name!r}, which is not among the declared tools "
                            f"({', '.join(schemas) or 'none'}); arguments: {call.arguments[:300]}")
    errors = schema_errors(json.loads(call.arguments), schemas[call.name])
    if errors:
        raise ToolCallError(f"the model called {call.name!r} with arguments that do not satisfy its schema: "
                            f"{'; '.join(errors[:3])}; arguments: {call.arguments[:300]}")
