"""A seeded LoRA fine-tune on a chat-format tool-calling set (OpenAI ``messages`` + ``tools`` per line, ``split``
train/heldout; e.g. ``recipes/data/brightwater-tools.jsonl``). Runs in a worker process (:func:`train`).

Every conversation is written the way it will be prompted at inference: :func:`scripts.families.tools.plain_messages`
(the family's tool format, the model's default system prompt) through the tokenizer's own chat template, so the
Foundry Local runtime, which applies that template, sees the same tokens. The loss covers the assistant turns
(text, tool calls, the end-of-turn token); the prompt, tool definitions and tool results are masked.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

from scripts.core.errors import ModelSourceError
from scripts.core.tool_evalset import load_lines
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


def train(request: dict) -> dict[str, Any]:
    """Worker entry: LoRA-train ``request["base_dir"]`` on the train split of ``request["dataset"]`` with the tool
    format at ``request["tool_format"]``; save the adapter and tokenizer to ``request["out_dir"]``."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts.families.tools import load_format
    from scripts.sources.finetune import collate

    s = request["settings"]
    base, out = Path(request["base_dir"]), Path(request["out_dir"])
    fmt = load_format(Path(request["tool_format"]), request.get("family", "chatml"))
    items = load_lines(Path(request["dataset"]), "train")
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    end_id = model.config.eos_token_id
    end_id = end_id[0] if isinstance(end_id, list) else end_id
    if end_id is None:
        raise ModelSourceError(f"{base}/config.json has no eos_token_id: the fine-tune cannot teach where turns end.")
    end_token = tokenizer.convert_ids_to_tokens(end_id)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    examples = encode(tokenizer, items, fmt, render, end_token)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else end_id
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             task_type="CAUSAL_LM", target_modules=ALL_LINEAR))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"])
    order_rng = torch.Generator().manual_seed(s["seed"])
    history = []
    start = time.perf_counter()
    # batches of similar length: a conversation with a tool result is ~2x one without
    for epoch in range(1, s["epochs"] + 1):
        model.train()
        order = torch.randperm(len(examples), generator=order_rng).tolist()
        losses = []
        for i in range(0, len(order), s["batch_size"]):
            ids, labels, mask = collate([examples[j] for j in order[i:i + s["batch_size"]]], pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4),
                        "seconds": round(time.perf_counter() - start, 1)})
        log.info("tool fine-tune epoch %d: loss %.4f (%.0f s)", epoch, history[-1]["loss"], history[-1]["seconds"])
        print(json.dumps(history[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    result = {"examples": len(examples), "tokens": sum(len(i) for i, _ in examples),
              "train_seconds": round(time.perf_counter() - start, 1), "history": history}
    (out / "slmops_finetune.json").write_text(json.dumps({**result, "settings": s}, indent=1) + "\n", encoding="utf-8")
    return {**result, "summary": f"tool LoRA fine-tune (rank {s['rank']}, {s['epochs']} epochs, seed {s['seed']}) "
                                 f"on {len(examples)} conversations in {result['train_seconds']:.0f} s"}
