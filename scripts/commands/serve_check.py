"""`invoke serve --check`: start the server, ask it the eval questions through the official ``openai`` client
(streamed with the eval's token cap and timed; then non-streamed as a default client sends them: no
``temperature``, no ``max_tokens``), stop it, and set accuracy, time to first token and decode tokens/s over HTTP
beside the same figures in-process (the Foundry Local runtime through the SDK, as ``invoke check`` runs it)."""
from __future__ import annotations

import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.evalset import conversations, score
from scripts.core.evalset import QA
from scripts.core.tool_evalset import ToolCase, rates_pass, score_outcomes
from scripts.families.tools import reply_calls, served_cases
from scripts.runtimes.foundry import check_model
from scripts.serve.server import ServerProcess, plan_serve
from scripts.serve.api import DEFAULT_HOST
from scripts.serve.client import complete_answer, openai_client, stream_answer, tool_answer

log = logging.getLogger(__name__)

HELLO = [{"role": "user", "content": "Hello"}]


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def decode_rate(tokens: int | None, first: float | None, total: float) -> float | None:
    """Tokens/s after the first token: ``(tokens - 1) / (total - first)`` (the same for both ways)."""
    if not tokens or tokens < 2 or first is None or total <= first:
        return None
    return (tokens - 1) / (total - first)


def summarise(name: str, texts: list[str], ttft: list[float | None], decode: list[float | None],
              seconds: list[float], qa: Sequence[QA], reference: list[str] | None) -> dict[str, Any]:
    """One column of the report: accuracy (when there is an eval set), agreement with the in-process answers,
    medians of TTFT, decode tok/s and request time."""
    out: dict[str, Any] = {"name": name, "ttft_ms": None if _median(ttft) is None else 1000 * _median(ttft),
                           "decode_tps": _median(decode), "request_s": _median(seconds), "answers": texts}
    if qa:
        ev = score(texts, qa)
        out.update(accuracy=ev.accuracy, accuracy_figure=ev.figure(),
                   wrong=[{"question": q, "got": g, "expected": e} for q, g, e in ev.wrong])
    if reference is not None:
        same = sum(a == b for a, b in zip(texts, reference))
        out["same_as_in_process"] = f"{same}/{len(reference)}"
        out["same_count"] = same
    return out


def run_serve_check(cache_dir: Path, model_dir: Path, model_id: str, qa: Sequence[QA], max_tokens: int,
                    system_prompt: str | None = None, host: str = DEFAULT_HOST,
                    port: int = 0, log_path: Path | None = None, env: dict[str, str] | None = None,
                    status: Callable[[str], Any] = lambda s: None,
                    tool_cases: Sequence[ToolCase] = ()) -> dict[str, Any]:
    """Ask ``qa`` in-process, then over HTTP (streamed, then non-streamed with the client's defaults); return the
    figures (see :func:`failure_message` for the verdict). Without ``qa`` one greeting is asked. ``tool_cases``
    (held-out cases of a tool set) are asked too: in-process as the plain messages the server would hand the runtime,
    over HTTP with ``tools`` through the ``openai`` client (streamed and not); ``result["tools"]`` scores each way."""
    plan = plan_serve(cache_dir, model_dir, model_id, host, port)
    chats = conversations(qa, system_prompt) if qa else ([] if tool_cases else [HELLO])
    if tool_cases and plan.tools is None:
        raise ValueError(f"{model_dir}: its chat template matches no family with a tool format; it cannot be asked "
                         "the tool cases.")
    tool_chats, fmt = served_cases(plan.tools, tool_cases) if tool_cases else ([], None)
    status(f"in-process: loading {model_id} in Foundry Local and answering {len(chats) + len(tool_chats)} prompts…")
    inproc = check_model(Path(cache_dir), Path(model_dir), model_id, chats + tool_chats, max_tokens=max_tokens)
    tool_texts = [a.text for a in inproc.answers[len(chats):]]
    inproc = replace(inproc, answers=inproc.answers[:len(chats)])
    ref = [a.text for a in inproc.answers]
    tools: dict[str, Any] = {}
    if tool_cases:
        tools["in-process (SDK)"] = score_outcomes(tool_cases, [reply_calls(t, fmt) for t in tool_texts]).to_json()
    columns = [summarise("in-process (SDK)", ref, [a.first_token_seconds for a in inproc.answers],
                         [decode_rate(a.tokens, a.first_token_seconds, a.seconds) for a in inproc.answers],
                         [a.seconds for a in inproc.answers], qa, None)]
    status(f"HTTP: starting the server for {model_id}…")
    with ServerProcess(plan, log_path=log_path, env=env) as server:
        client = openai_client(server.base_url)
        listed = [m.id for m in client.models.list()]
        status(f"HTTP: {len(chats)} streamed requests at {server.base_url}…")
        streamed = [stream_answer(client, model_id, chat, max_tokens=max_tokens) for chat in chats]
        status(f"HTTP: {len(chats)} non-streamed requests with the client's defaults…")
        plain = [complete_answer(client, model_id, chat) for chat in chats]
        for name, stream in (("HTTP streaming", True), ("HTTP non-streaming", False)):
            status(f"HTTP: {len(tool_cases)} tool cases with tools ({name[5:]})…")
            tools[name] = score_outcomes(tool_cases, [
                tool_answer(client, model_id, c.messages, c.tools, stream=stream, max_tokens=max_tokens)
                for c in tool_cases]).to_json()
        base = server.base_url
        stopped = server.stop()
    columns.append(summarise("HTTP streaming", [a.text for a in streamed], [a.first_token_seconds for a in streamed],
                             [decode_rate(a.completion_tokens, a.first_token_seconds, a.token_times[-1] - a.start
                                          if a.token_times else a.seconds) for a in streamed],
                             [a.seconds for a in streamed], qa, ref))
    columns.append(summarise("HTTP non-streaming, client defaults", [a.text for a in plain], [None] * len(plain),
                             [None] * len(plain), [a.seconds for a in plain], qa, ref))
    result = {"model_id": model_id, "base_url": base, "listed": listed, "questions": len(chats),
              "max_tokens": max_tokens, "load_seconds": inproc.load_seconds, "server": stopped, "columns": columns,
              "prompt": chats[0][-1]["content"] if chats else None, "answer": streamed[0].text if chats else None,
              "tools": tools}
    return result


def failure_message(result: dict[str, Any], min_accuracy: float) -> str | None:
    """Why the HTTP answers fail the recipe's ``eval.min_accuracy``, or None when they pass (or nothing was scored)."""
    low_tools = [f"{way}: {t['figure']}" for way, t in result.get("tools", {}).items()
                 if not rates_pass(t["rates"], min_accuracy)]
    if low_tools:
        return (f"{result['model_id']} on the held-out tool cases: {'; '.join(low_tools)}; the recipe requires "
                f"{100 * min_accuracy:.0f} % of each (eval.min_accuracy).")
    low = [c for c in result["columns"][1:] if c.get("accuracy") is not None and c["accuracy"] < min_accuracy]
    if not low:
        return None
    worst = min(low, key=lambda c: c["accuracy"])
    examples = "\n".join(f"  - {w['question']!r}: got {w['got']!r}, expected {w['expected']!r}"
                         for w in worst["wrong"][:5])
    return (f"{result['model_id']} answered {worst['accuracy_figure']} over HTTP ({worst['name']}); the recipe "
            f"requires {100 * min_accuracy:.0f} % (eval.min_accuracy). In-process: "
            f"{result['columns'][0].get('accuracy_figure', '–')}. Wrong answers, e.g.:\n{examples}")


def serve_check(pipeline, host: str = DEFAULT_HOST, port: int = 0,
                status: Callable[[str], Any] = lambda s: None) -> dict[str, Any]:
    """:func:`run_serve_check` for a recipe's installed model and eval set (the server log goes to
    ``build/<recipe>/serve-check.log``)."""
    r = pipeline.recipe
    return run_serve_check(pipeline.cache_root, pipeline.installed_dir, pipeline.model_id, pipeline.eval_set(),
                           r.eval.max_new_tokens, r.eval.system_prompt, host, port,
                           log_path=pipeline.paths.root / "serve-check.log", status=status,
                           tool_cases=pipeline.tool_cases())
