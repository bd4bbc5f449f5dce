"""A seeded LoRA fine-tune of the recipe's base model on its question/answer set or tool-calling set (recipe
``model.finetune``): the adapter the conversion then keeps as a branch or merges. Runs in a worker process
(:func:`train`, through :mod:`scripts.core.workers`), so the pipeline never imports torch.

Chat examples are the tokenizer's own chat template over ``[{"role": "user", "content": question}]`` with the
generation prompt, then the answer tokens and eos; the loss covers the answer only. Same seed, data, settings and
machine give the same adapter. After training, greedy answers are checked with :func:`scripts.core.evalset.answers_match`.

A tool-calling set (OpenAI chat lines with ``tools``, split train/heldout, as ``eval.tools`` takes) trains on the
conversations as ``invoke serve`` writes them for the base's chat template (:func:`_train_tools`); its held-out cases
are then answered greedily and scored.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from scripts.core.errors import ModelSourceError
from scripts.core.evalset import answers_match, load_qa, question_messages

log = logging.getLogger(__name__)
#: Every linear layer of the decoder blocks (not the LM head): the LoRA targets of the usual recipes.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Tool sets: the share of draws whose copied digits are drawn anew (:class:`scripts.sources.tool_training.Phases`).
FRESH_DIGITS = 0.5
#: Tool sets: how often a question no tool answers is drawn, relative to the others (measured: docs/tools.md).
NO_CALL_WEIGHT = 3
#: Tool sets: new tokens for each held-out reply scored after training (a parallel pair of calls fits).
TOOL_REPLY_TOKENS = 96


def encode(tokenizer, qa, end_id: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair: the prompt masked with -100, the answer and eos learnt."""
    out = []
    for item in qa:
        prompt = tokenizer.apply_chat_template(question_messages(item.question), tokenize=False,
                                               add_generation_prompt=True)
        p = tokenizer.encode(prompt, add_special_tokens=False)
        t = tokenizer.encode(item.answer, add_special_tokens=False) + [end_id]
        out.append((p + t, [-100] * len(p) + t))
    return out


def collate(batch, pad_id: int):
    import torch
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (i, lab) in enumerate(batch):
        ids[row, :len(i)], labels[row, :len(lab)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def greedy_answers(model, tokenizer, questions, end_id: int, max_new_tokens: int = 48) -> list[str]:
    import torch
    out = []
    with torch.inference_mode():
        for q in questions:
            prompt = tokenizer.apply_chat_template(question_messages(q), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                                 pad_token_id=end_id)
            out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _train_qa(model, tokenizer, dataset: Path, s: dict, end_id: int, pad_id: int) -> dict[str, Any]:
    """``s["epochs"]`` passes over the question/answer pairs; then every question answered greedily."""
    import torch

    qa = load_qa(dataset)
    examples = encode(tokenizer, qa, end_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"])
    order_rng = torch.Generator().manual_seed(s["seed"])
    history = []
    start = time.perf_counter()
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
        log.info("fine-tune epoch %d: loss %.4f", epoch, history[-1]["loss"])
    train_seconds = time.perf_counter() - start
    model.eval()
    answers = greedy_answers(model, tokenizer, [x.question for x in qa], end_id)
    correct = sum(answers_match(a, x.answer) for a, x in zip(answers, qa))
    return {"correct": correct, "total": len(qa), "train_seconds": round(train_seconds, 1), "history": history,
            "wrong": [{"question": x.question, "got": a, "expected": x.answer}
                      for a, x in zip(answers, qa) if not answers_match(a, x.answer)][:10],
            "summary": f"LoRA fine-tune (rank {s['rank']}, {s['epochs']} epochs, seed {s['seed']}): "
                       f"{correct}/{len(qa)} answers exact in PyTorch, trained in {train_seconds:.0f} s"}


def _train_tools(model, tokenizer, dataset: Path, s: dict, end_id: int, pad_id: int) -> dict[str, Any]:
    """A tool set (:func:`scripts.core.tool_evalset.is_tool_set`): its train split in the two phases of
    :func:`scripts.sources.tool_training.train_two_phases` (``s["epochs"]`` passes without the tool definitions in the
    prompt, then ``s["tool_prompt_steps"]`` steps with them, as ``invoke serve`` writes them for this model's chat
    template); then its held-out cases answered greedily and scored."""
    from scripts.core.tool_evalset import load_cases, load_lines
    from scripts.families.templates import render_chat_template
    from scripts.families.tools import ToolFormat, serving_spec
    from scripts.sources.demo_training import DemoSettings
    from scripts.sources.tool_examples import heldout_values
    from scripts.sources.tool_training import Phases, score_model, train_two_phases, weighted

    spec = serving_spec(tokenizer.chat_template)
    if spec is None:
        raise ModelSourceError(f"{dataset} is a tool-calling set, but the base model's chat template matches no "
                               "family with a tool format (templates/families/<family>.tools.json): the fine-tune "
                               "would not know how to write the tools into its prompts. Use a model of such a family "
                               "(`invoke families`) or add the family's .tools.json.")
    fmt = ToolFormat.from_json(spec["family"], spec["format"])
    template = tokenizer.chat_template
    render = lambda messages, gen: render_chat_template(template, messages, add_generation_prompt=gen)  # noqa: E731
    end_token = tokenizer.convert_ids_to_tokens(end_id)
    items = load_lines(dataset, "train")
    if not items:
        raise ModelSourceError(f"{dataset}: no conversation to train on (every line has \"split\": \"heldout\"). Mark "
                               "the training lines \"split\": \"train\" (or leave split out).")
    short_steps = -(-s["epochs"] * len(weighted(items, NO_CALL_WEIGHT)) // s["batch_size"])
    settings = DemoSettings(seed=s["seed"], lr=s["lr"], batch_size=s["batch_size"], steps=s["tool_prompt_steps"],
                            warmup_steps=10, threads=s["threads"])
    phases = Phases(short_steps, FRESH_DIGITS, frozenset(heldout_values(load_lines(dataset, "heldout"))),
                    NO_CALL_WEIGHT)
    trained = train_two_phases(model, tokenizer, items, fmt, render, end_token, pad_id, settings, phases, False)
    model.eval()
    score = score_model(model, tokenizer, load_cases(dataset), fmt, render, spec["default_system"],
                        TOOL_REPLY_TOKENS, end_id, pad_id)
    return {**trained, "short_steps": short_steps, **score.heldout_json(),
            "summary": f"LoRA fine-tune on tool calls (rank {s['rank']}, {short_steps} + {s['tool_prompt_steps']} "
                       f"steps, seed {s['seed']}, trained in {trained['train_seconds']:.0f} s); held-out in PyTorch: "
                       f"{score.figure()}"}


def train(request: dict) -> dict[str, Any]:
    """Worker entry: LoRA-train ``request["base_dir"]`` on ``request["dataset"]`` (question/answer pairs, or a
    tool-calling set); save the adapter (and the base's tokenizer, so the merge takes it as one set) to
    ``request["out_dir"]``."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts.core.tool_evalset import is_tool_set

    s = request["settings"]
    base, out, dataset = Path(request["base_dir"]), Path(request["out_dir"]), Path(request["dataset"])
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    end_id = model.config.eos_token_id
    if isinstance(end_id, list):
        end_id = end_id[0]
    if end_id is None:
        raise ModelSourceError(f"{base}/config.json has no eos_token_id: the fine-tune cannot teach where answers end.")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else end_id
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             task_type="CAUSAL_LM", target_modules=ALL_LINEAR))
    result = (_train_tools if is_tool_set(dataset) else _train_qa)(model, tokenizer, dataset, s, end_id, pad_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    record = {k: v for k, v in result.items() if k != "summary"}
    (out / "slmops_finetune.json").write_text(json.dumps({**record, "settings": s}, indent=1) + "\n", encoding="utf-8")
    return result
