"""Training examples from a chat-format tool-calling set (OpenAI ``messages`` + ``tools`` per line, ``split``
train/heldout; e.g. ``recipes/data/brightwater-tools.jsonl``), as the tool demo model trains on them.

Every conversation is written the way it will be prompted at inference: :func:`scripts.families.tools.plain_messages`
(the family's tool format, the model's default system prompt) through the tokenizer's own chat template, so the
Foundry Local runtime, which applies that template, sees the same tokens. The loss covers the assistant turns
(text, tool calls, the end-of-turn token); the prompt, tool definitions and tool results are masked.
"""
from __future__ import annotations

import logging
from typing import Callable

from scripts.core.errors import ModelSourceError
from scripts.families.tools import ToolFormat, default_system, plain_messages

log = logging.getLogger(__name__)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Render = Callable[[list[dict], bool], str]


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
