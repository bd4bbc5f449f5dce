"""Training examples from a chat-format tool-calling set (OpenAI ``messages`` + ``tools`` per line, ``split``
train/heldout; e.g. ``recipes/data/brightwater-tools.jsonl``), as the tool demo model trains on them.

Every conversation is written the way it will be prompted at inference: :func:`scripts.families.tools.plain_messages`
(the family's tool format, the model's default system prompt) through the tokenizer's own chat template, so the
Foundry Local runtime, which applies that template, sees the same tokens. The loss covers the assistant turns
(text, tool calls, the end-of-turn token); the prompt, tool definitions and tool results are masked.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import re
from typing import Callable, Iterable

from scripts.core.errors import ModelSourceError
from scripts.families.tools import ToolFormat, default_system, plain_messages

log = logging.getLogger(__name__)
Render = Callable[[list[dict], bool], str]
DIGIT_RUN = re.compile(r"[0-9]+")


def heldout_values(lines: Iterable[dict]) -> set[str]:
    """The held-out lines' call argument strings that hold a digit (membership numbers, dates): what
    :func:`redraw_digits` must never write."""
    out: set[str] = set()
    for line in lines:
        if line.get("split", "train") == "heldout":
            for m in line["messages"]:
                for call in m.get("tool_calls") or []:
                    out.update(v for v in json.loads(call["function"]["arguments"] or "{}").values()
                               if isinstance(v, str) and DIGIT_RUN.search(v))
    return out


def _fresh_run(run: str, rng: random.Random) -> str:
    """Random digits as long as ``run``, led by a zero only where ``run`` is (a number stays a JSON number: 1999 never
    becomes 0412; a time's 09 may become 03); a single digit 1-9."""
    first = "0" if run[0] == "0" and len(run) > 1 else str(rng.randint(1, 9))
    return first + "".join(rng.choices("0123456789", k=len(run) - 1))


def redraw_digits(item: dict, rng: random.Random, avoid: set[str] = frozenset()) -> dict:
    """A copy of the conversation ``item`` in which every run of digits that the user wrote and a call's arguments
    repeat (a membership number's digits, a date's year, month and day, a count), or that a tool result holds and an
    answer reads back (a crate count, a year, a booking reference), is replaced throughout the conversation
    (user, assistant, tool results, arguments) by random digits of the same length (a single digit by 1-9), drawn
    again while the copy contains a string of ``avoid``. The call is unchanged in kind: values are copied from the
    question (or the result), now fresh ones each time the conversation is drawn, so the model learns to copy digits,
    not to remember the set's few hundred values. Conversations without such runs are returned as they are."""
    def text(role: str) -> str:
        return " ".join(m["content"] for m in item["messages"] if m["role"] == role and isinstance(m.get("content"), str))

    args = " ".join(c["function"]["arguments"] or "" for m in item["messages"] for c in m.get("tool_calls") or [])
    runs = (set(DIGIT_RUN.findall(text("user"))) & set(DIGIT_RUN.findall(args))) \
        | (set(DIGIT_RUN.findall(text("tool"))) & set(DIGIT_RUN.findall(text("assistant"))))
    if not runs:
        return item
    for _ in range(100):
        mapping = {r: _fresh_run(r, rng) for r in sorted(runs)}
        swap = lambda text: DIGIT_RUN.sub(lambda m: mapping.get(m.group(), m.group()), text)  # noqa: E731
        out = copy.deepcopy(item)
        for m in out["messages"]:
            if isinstance(m.get("content"), str):
                m["content"] = swap(m["content"])
            for call in m.get("tool_calls") or []:
                call["function"]["arguments"] = swap(call["function"]["arguments"] or "")
        if not any(v in json.dumps(out["messages"]) for v in avoid):
            return out
    raise ModelSourceError("could not draw digits that avoid the held-out values in 100 tries")


def segments(item: dict, fmt: ToolFormat, render: Render, system: str, end_token: str) -> list[tuple[str, bool]]:
    """``(text, learnt)`` pieces of one conversation: each assistant turn's content and ``end_token`` learnt, the rest
    (prompt, tool definitions, results, template glue) not. The pieces joined are the whole rendered conversation."""
    plain = plain_messages(item["messages"], item.get("tools"), fmt, system)
    out: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(plain):
        if m["role"] != "assistant":
            continue
        before = render(plain[:k], True)
        through = render(plain[:k + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise ModelSourceError("the chat template does not render a conversation as a growing prefix; it cannot "
                                   "be trained turn by turn.")
        target = m["content"] + end_token
        if not through[len(before):].startswith(target):
            raise ModelSourceError(f"the chat template does not end an assistant turn with {end_token!r}.")
        out += [(before[len(done):], False), (target, True)]
        done = before + target
    return out


def encode(tokenizer, items: list[dict], fmt: ToolFormat, render: Render, end_token: str) -> list[tuple[list[int], list[int]]]:
    system = default_system(render)
    out = []
    for item in items:
        ids: list[int] = []
        labels: list[int] = []
        for text, learnt in segments(item, fmt, render, system, end_token):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if learnt else [-100] * len(piece)
        out.append((ids, labels))
    return out
