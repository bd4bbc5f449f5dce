"""Training a causal LM on a tool-calling set, and scoring it on the set's held-out cases: what the tool demo model
(trained from scratch, :mod:`scripts.sources.tools_demo`) and a LoRA fine-tune of a real model on a tool set
(:mod:`scripts.sources.finetune`) share.

Conversations are encoded by :func:`scripts.sources.tool_examples.encode` (the tools as ``invoke serve`` writes them,
loss on the assistant turns). Training runs in two phases (:func:`train_two_phases`): first on the conversations
without the tool definitions in the prompt (~40-90 tokens each instead of ~500-600, so the skill — which tool, values
copied from the question — is learnt in cheap steps), then on the conversations as served, preamble included. Every
served conversation declares the same tools, so all start with the same preamble: it is run once per step (batch 1,
with gradients) and its key/value cache repeated over the batch (:func:`train_shared_prefix`), about 6x fewer tokens
per step than padding whole conversations, with the same loss.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from scripts.core.errors import ModelSourceError
from scripts.core.tool_evalset import ToolCase, ToolScore
from scripts.families.tools import ToolFormat, plain_messages, reply_calls
from scripts.sources.demo_training import DemoSettings, batch, fit, padded_loss
from scripts.sources.tool_examples import Render, encode, redraw_digits

log = logging.getLogger(__name__)
Examples = Sequence[tuple[list[int], list[int]]]


def shared_prefix(examples: Examples) -> int:
    """Length of the token prefix every example shares, up to (not into) the first learnt token and leaving each
    example at least one token of its own."""
    first = examples[0][0]
    limit = min(len(ids) for ids, _ in examples) - 1
    n = 0
    while n < limit and all(ids[n] == first[n] and labels[n] == -100 for ids, labels in examples):
        n += 1
    return n


def bucketed_batches(lengths: Sequence[int], size: int, seed: int, pool_batches: int = 8) -> Callable[[], list[int]]:
    """Seeded batches of indices, each item once per pass: every ``pool_batches * size`` shuffled items are sorted by
    length and cut into batches, and the batches are shuffled. Rows of a batch are padded to its longest, so this pads
    far less than drawing batches at random (tool set, no preamble: 60 tokens a row on average, 109 padded at random),
    and the batches are still random."""
    rng = random.Random(seed)
    queue: list[list[int]] = []
    pool = pool_batches * size

    def next_batch() -> list[int]:
        if not queue:
            order = list(range(len(lengths)))
            rng.shuffle(order)
            for k in range(0, len(order), pool):
                chunk = sorted(order[k:k + pool], key=lengths.__getitem__)
                batches = [chunk[j:j + size] for j in range(0, len(chunk), size)]
                rng.shuffle(batches)
                queue.extend(batches)
        return queue.pop(0)

    return next_batch


def train_shared_prefix(model, examples: Examples, prefix_len: int, pad_id: int, s: DemoSettings, progress: bool,
                        draw: Callable[[list[int]], list] | None = None,
                        next_batch: Callable[[], list[int]] | None = None) -> float:
    """:func:`scripts.sources.demo_training.fit` on ``examples`` with the shared prefix run once per step and its cache
    repeated over the batch. ``draw``: the rows of a batch of indices (default: those ``examples``); each must start
    with the shared prefix. ``next_batch``: the batches of indices (default: :func:`bucketed_batches`)."""
    import torch
    import torch.nn.functional as F

    prefix = torch.tensor(examples[0][0][:prefix_len])[None]
    next_batch = next_batch or bucketed_batches([len(i) for i, _ in examples], s.batch_size, s.seed)
    draw = draw or (lambda idx: [examples[i] for i in idx])

    def loss_of(model, rows):
        rows = [(ids[prefix_len:], labels[prefix_len:]) for ids, labels in rows]
        input_ids, labels, own = batch(rows, pad_id)
        attn = torch.cat([torch.ones((len(rows), prefix_len), dtype=torch.long), own], dim=1)
        head = model(input_ids=prefix, use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(rows))
        out = model(input_ids=input_ids, attention_mask=attn, past_key_values=cache, use_cache=True)
        # the prediction of each row's first own token comes from the prefix's last position
        logits = torch.cat([head.logits[:, -1:].expand(len(rows), -1, -1), out.logits[:, :-1]], dim=1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def rows_at(step: int) -> list:
        rows = draw(next_batch())
        if any(ids[:prefix_len] != examples[0][0][:prefix_len] for ids, _ in rows):
            raise ModelSourceError("a drawn conversation does not start with the shared tool preamble")
        return rows

    return fit(model, rows_at, loss_of, s, progress, "train on tools")


@dataclass(frozen=True)
class Phases:
    """What :func:`train_two_phases` runs: ``short_steps`` without the tool preamble, then ``s.steps`` with it;
    ``fresh_digits`` the share of draws whose copied digits are drawn anew (never as one of ``avoid``, the held-out
    values); conversations of kind ``text`` (no call) drawn ``no_call_weight`` times as often as the others."""

    short_steps: int
    fresh_digits: float
    avoid: frozenset[str] = frozenset()
    no_call_weight: int = 1


def weighted(items: Sequence[dict], no_call_weight: int) -> list[dict]:
    """``items`` with each conversation of kind ``text`` (a question no tool answers) ``no_call_weight`` times."""
    return [i for i in items for _ in range(no_call_weight if i.get("kind") == "text" else 1)]


def train_two_phases(model, tokenizer, items: Sequence[dict], fmt: ToolFormat, render: Render, end_token: str,
                     pad_id: int, s: DemoSettings, phases: Phases, progress: bool) -> dict:
    """Train ``model`` on the tool conversations ``items`` in two phases (module docstring). Returns the figures the
    provenance files record: conversation counts, the shared preamble's length, the last loss, the seconds."""
    items = weighted(items, phases.no_call_weight)
    rng = random.Random(s.seed)

    def drawer(its: list[dict]) -> Callable[[list[int]], list]:
        return lambda idx: encode(tokenizer, [redraw_digits(its[i], rng, phases.avoid)
                                              if rng.random() < phases.fresh_digits else its[i] for i in idx],
                                  fmt, render, end_token)

    examples = encode(tokenizer, items, fmt, render, end_token)
    prefix_len = shared_prefix(examples)
    log.info("tool training: %d conversations, %d tokens (%d shared)", len(examples),
             sum(len(i) for i, _ in examples), prefix_len)
    t0 = time.perf_counter()
    if phases.short_steps:
        short_items = [{**i, "tools": None} for i in items]
        short = encode(tokenizer, short_items, fmt, render, end_token)
        draw, next_batch = drawer(short_items), bucketed_batches([len(i) for i, _ in short], s.batch_size, s.seed)
        short_loss = fit(model, lambda step: draw(next_batch()), padded_loss(pad_id),
                         replace(s, steps=phases.short_steps), progress, "train (no preamble)")
        model.train()
        log.info("phase 1 (no preamble): %d steps, loss %.4f, %.1f s", phases.short_steps, short_loss,
                 time.perf_counter() - t0)
    final_loss = train_shared_prefix(model, examples, prefix_len, pad_id, s, progress, drawer(list(items)))
    return {"conversations": len(examples), "shared_prefix_tokens": prefix_len, "final_loss": round(final_loss, 5),
            "train_seconds": round(time.perf_counter() - t0, 1)}


def score_model(model, tokenizer, cases: Sequence[ToolCase], fmt: ToolFormat, render: Render, system: str,
                max_new_tokens: int, eos_id: int, pad_id: int) -> ToolScore:
    """The held-out ``cases`` answered greedily by the PyTorch ``model`` (prompts as ``invoke serve`` writes them,
    ``system`` the model's default system prompt), scored by :mod:`scripts.core.tool_evalset`."""
    import torch

    score = ToolScore()
    with torch.inference_mode():
        for case in cases:
            prompt = render(plain_messages(case.messages, case.tools, fmt, system), True)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
            calls, text = reply_calls(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True),
                                      fmt)
            score.add(case, calls, text)
    return score
