"""The OpenAI side of `invoke serve`, pure: what a server serves (:class:`ServePlan`), the recipe's generation
defaults (from ``genai_config.json``), the request checks the Foundry Local runtime skips, and OpenAI-style error
bodies with the right HTTP status (:class:`ApiError`), including the runtime's own errors translated. No I/O; used by
:mod:`scripts.serve.app` (the HTTP layer) and :mod:`scripts.serve.server` (the server process)."""
from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5272
UPSTREAM_TIMEOUT = 600.0  # seconds the layer waits for the runtime (per read while streaming)
ROLES = ("system", "user", "assistant", "developer", "tool")
CHAT_PATH = "/v1/chat/completions"


# ----- planning (pure) --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServePlan:
    """What one server serves, where. ``defaults`` are the recipe's generation settings applied to requests that
    omit them; ``max_length`` caps the default ``max_tokens`` (``genai_config.json`` ``search.max_length``)."""

    cache_dir: str
    model_dir: str
    model_id: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    defaults: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    tools: dict[str, Any] | None = None  # scripts.families.tools.serving_spec of the installed chat template
    vocab_size: int | None = None  # genai_config.json model.vocab_size: top_k's limit (scripts.serve.guard)
    controls: tuple[str, ...] = ()  # the tokenizer's control tokens, refused in messages (scripts.serve.guard)

    @property
    def alias(self) -> str:
        return self.model_id.split(":")[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServePlan":
        return cls(**{**data, "controls": tuple(data.get("controls") or ())})


def generation_defaults(genai_config: dict[str, Any]) -> dict[str, Any]:
    """OpenAI request fields that reproduce ``genai_config.json`` ``search`` (what ``package`` wrote from the recipe):
    ``temperature`` 0 (greedy) when ``do_sample`` is false or absent, else its ``temperature``, ``top_p`` and
    ``top_k`` (the runtime reads ``top_k`` from ``metadata``; see :func:`apply_defaults`)."""
    search = genai_config.get("search", {}) or {}
    if not search.get("do_sample"):
        return {"temperature": 0.0}
    out: dict[str, Any] = {}
    for key, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
        if search.get(key) is not None:
            out[key] = cast(search[key])
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as it goes into a URL a client can use (a wildcard bind is reached through loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL clients use: ``http://HOST:PORT/v1``."""
    return f"http://{url_host(host)}:{port}/v1"


# ----- OpenAI request checks and errors (pure) ---------------------------------------------------------------------
class ApiError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"We could not parse the JSON body of your request ({exc}); send a JSON object with "
                   "Content-Type: application/json.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"The request body must be a JSON object, not {type(body).__name__}.", code="invalid_json")
    return body


def resolve_model(requested: Any, model_id: str) -> str:
    """The served id for ``requested`` (the id, or the bare name before ``:``), else a 404 like OpenAI's."""
    if not isinstance(requested, str) or not requested:
        raise _bad("You must provide a model parameter (the id GET /v1/models lists).", param="model")
    if requested in (model_id, model_id.split(":")[0]):
        return model_id
    raise ApiError(404, f"The model '{requested}' does not exist on this server; it serves '{model_id}' "
                        "(GET /v1/models).", param="model", code="model_not_found")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_chat_request(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """Validate a chat completion request (the checks the runtime skips) and return it ready for the runtime:
    ``model`` resolved, ``null`` options dropped, a top-level ``top_k`` moved to ``metadata.top_k``."""
    body = {k: v for k, v in body.items() if v is not None}
    body["model"] = resolve_model(body.get("model"), model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {role, content} objects.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'.", param=f"messages.[{i}]")
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}.",
                       param=f"messages.[{i}].role")
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (m["role"] == "assistant" and content is None):
            raise _bad(f"messages[{i}].content must be a string or an array of content parts.",
                       param=f"messages.[{i}].content")
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (not _is_int(body[key]) or body[key] < 1):
            raise _bad(f"'{key}' must be an integer >= 1, got {body[key]!r}.", param=key)
    if "temperature" in body and (not _is_number(body["temperature"]) or not 0 <= body["temperature"] <= 2):
        raise _bad(f"'temperature' must be a number from 0 to 2, got {body['temperature']!r}.", param="temperature")
    if "top_p" in body and (not _is_number(body["top_p"]) or not 0 < body["top_p"] <= 1):
        raise _bad(f"'top_p' must be a number in (0, 1], got {body['top_p']!r}.", param="top_p")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) and s for s in stop))):
        raise _bad(f"'stop' must be a string or an array of non-empty strings, got {stop!r}.", param="stop")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad(f"'stream' must be true or false, got {body['stream']!r}.", param="stream")
    if "n" in body and body["n"] != 1:
        raise _bad(f"'n' = {body['n']!r} is not supported: the Foundry Local runtime generates one choice per "
                   "request; send n = 1 (or leave it out) and repeat the request.", param="n")
    if "top_k" in body:
        top_k = body.pop("top_k")
        if not _is_int(top_k) or top_k < 1:
            raise _bad(f"'top_k' must be an integer >= 1, got {top_k!r}.", param="top_k")
        body["metadata"] = {**(body.get("metadata") or {}), "top_k": str(top_k)}
    return body


def needs_max_tokens(body: dict[str, Any]) -> bool:
    return "max_tokens" not in body and "max_completion_tokens" not in body


def apply_defaults(body: dict[str, Any], defaults: dict[str, Any], prompt_tokens: int | None = None,
                   context_limit: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Fill what the client left out: the recipe's sampling settings (``defaults``, from
    :func:`generation_defaults`; ``top_k`` goes to ``metadata.top_k``), and ``max_tokens`` = the rest of the context
    (``min(context_limit, max_length) - prompt_tokens``, at least 1 so that an over-long prompt gets the runtime's
    own over-context error)."""
    out = dict(body)
    for key, value in defaults.items():
        if key == "top_k":
            meta = dict(out.get("metadata") or {})
            meta.setdefault("top_k", str(value))
            out["metadata"] = meta
        else:
            out.setdefault(key, value)
    if needs_max_tokens(out) and prompt_tokens is not None and context_limit:
        limit = min(context_limit, max_length) if max_length else context_limit
        out["max_tokens"] = max(1, limit - prompt_tokens)
    return out


_CONTEXT_MARKERS = ("maximum context length", "context_length")
# "Invalid request: search_options.cc:108 int fl::ValidateGeneratorRequestBudget(int64_t, int, int) request requires…":
# the runtime's message keeps its C++ source location in front; clients get the sentence.
_SOURCE_PREFIX = re.compile(r"^(?:Invalid request: )?[\w./-]+\.(?:cc|cpp|h):\d+ .*?\) ")


def runtime_error(status: int, text: str) -> ApiError:
    """An error answer of Foundry's service as an OpenAI error: its JSON passed on (an over-context refusal gets
    ``code: context_length_exceeded``, a missing model ``model_not_found``), its plain-text ones wrapped."""
    message, type_, param, code = text.strip(), None, None, None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        message = str(err.get("message") or message)
        type_, param, code = err.get("type"), err.get("param"), err.get("code")
    elif text.startswith("server=") and "message=" in text:  # the service's plain-text 404/405 (oatpp)
        message = text.split("message=", 1)[1].strip()
    message = _SOURCE_PREFIX.sub("", message)
    if any(m in message for m in _CONTEXT_MARKERS):
        status, code, param = 400, code or "context_length_exceeded", param or "messages"
    elif status == 404 and "Model not found" in message:
        code, param = code or "model_not_found", param or "model"
    return ApiError(status, message or f"Foundry Local answered {status} without a message.", type_, param, code)


def sse_error(event: bytes) -> ApiError | None:
    """The error an SSE event carries (``data: {"error": …}``), if it is one."""
    for line in event.decode("utf-8", errors="replace").splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                return None
            try:
                doc = json.loads(payload)
            except ValueError:
                return None
            if isinstance(doc, dict) and "error" in doc:
                status = 400 if (doc["error"] or {}).get("type") == "invalid_request_error" else 500
                return runtime_error(status, payload)
            return None
    return None
