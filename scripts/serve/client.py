"""An OpenAI client with timings, for `invoke serve --check` and the bench's HTTP row: the official ``openai``
client on a server's base URL, and one reply (streamed or not) as an :class:`HttpAnswer` with per-piece times."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from scripts.serve.api import UPSTREAM_TIMEOUT


@dataclass
class HttpAnswer:
    """One reply over HTTP: text, when it started (``time.perf_counter``), when each content piece arrived, and the
    server's ``usage`` counts."""

    text: str
    start: float
    token_times: list[float]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float

    @property
    def first_token_seconds(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None


def openai_client(base: str, timeout: float = UPSTREAM_TIMEOUT):
    """The official ``openai`` client on ``base`` (no retries: a failure is a finding)."""
    from openai import OpenAI
    return OpenAI(base_url=base, api_key="slmops-local", timeout=timeout, max_retries=0)


def stream_answer(client, model_id: str, messages: list[dict], **options: Any) -> HttpAnswer:
    """Stream one reply (``stream_options.include_usage``), timing every content piece."""
    start = time.perf_counter()
    times, parts, usage, finish = [], [], None, None
    stream = client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **options)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                times.append(time.perf_counter())
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return HttpAnswer("".join(parts), start, times, usage.prompt_tokens if usage else 0,
                      usage.completion_tokens if usage else len(times), finish, end - start)


def complete_answer(client, model_id: str, messages: list[dict], **options: Any) -> HttpAnswer:
    """One non-streamed reply."""
    start = time.perf_counter()
    r = client.chat.completions.create(model=model_id, messages=messages, **options)
    end = time.perf_counter()
    return HttpAnswer(r.choices[0].message.content or "", start, [], r.usage.prompt_tokens if r.usage else 0,
                      r.usage.completion_tokens if r.usage else 0, r.choices[0].finish_reason, end - start)


def tool_answer(client, model_id: str, messages: list[dict], tools: list[dict], stream: bool = False,
                **options: Any) -> tuple[list[tuple[str, Any]], str]:
    """One request with ``tools`` (``tool_choice`` auto): ``(calls as (name, parsed arguments), text)``, streamed calls
    assembled from ``delta.tool_calls`` as a client does. A reply the server refuses as an invalid call (HTTP 500,
    ``invalid_tool_call``) is one call named ``"<invalid>"`` (it matches no expectation)."""
    import json

    import openai
    try:
        if not stream:
            message = client.chat.completions.create(model=model_id, messages=messages, tools=tools,
                                                     **options).choices[0].message
            return ([(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []],
                    message.content or "")
        text, calls = "", {}
        for chunk in client.chat.completions.create(model=model_id, messages=messages, tools=tools, stream=True,
                                                    **options):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                for tc in choice.delta.tool_calls or []:
                    c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    c["name"] += tc.function.name or ""
                    c["arguments"] += tc.function.arguments or ""
        return [(calls[i]["name"], json.loads(calls[i]["arguments"] or "{}")) for i in sorted(calls)], text
    except openai.APIError as exc:  # streamed, the refusal is an error event: an APIError without a status
        if "invalid_tool_call" not in str(exc) and "invalid_tool_call" not in str(getattr(exc, "body", "")):
            raise
        return [("<invalid>", str(exc))], ""
