"""Greedy answers to eval questions from a Hugging Face folder (transformers), through the folder's own chat
template: how a source checks the model it built before anything is converted."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scripts.core.evalset import question_messages


def _load(model_dir: Path | str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    return tok, model


def _greedy(tok, model, messages: list[dict], max_new_tokens: int) -> str:
    import torch

    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=model.generation_config.eos_token_id,
                             pad_token_id=model.generation_config.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _count(tok, messages: list[dict]) -> int:
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(prompt, add_special_tokens=False)["input_ids"])


def generate_answers_hf(model_dir: Path | str, questions: Sequence[str], max_new_tokens: int = 48,
                        system: str | None = None) -> list[str]:
    """Greedy answers from the Hugging Face folder, one fresh conversation per question, prompts built with the
    tokenizer's chat template."""
    tok, model = _load(model_dir)
    return [_greedy(tok, model, question_messages(q, system), max_new_tokens) for q in questions]


def generate_session_answers_hf(model_dir: Path | str, questions: Sequence[str], max_new_tokens: int = 48,
                                system: str | None = None, prompt_budget: int = 384) -> list[str]:
    """Greedy answers to ``questions`` asked one after the other in ONE conversation, the model's own answers kept in
    the history, as ``invoke run`` keeps them: the oldest exchanges are dropped while the prompt is longer than
    ``prompt_budget`` tokens (``invoke run`` keeps a quarter of the context for the reply: 384 of 512)."""
    tok, model = _load(model_dir)
    head = [{"role": "system", "content": system}] if system else []
    turns: list[dict] = []
    answers = []
    for q in questions:
        ask = {"role": "user", "content": q}
        while turns and _count(tok, head + turns + [ask]) > prompt_budget:
            turns = turns[2:]
        answer = _greedy(tok, model, head + turns + [ask], max_new_tokens)
        turns += [ask, {"role": "assistant", "content": answer}]
        answers.append(answer)
    return answers
