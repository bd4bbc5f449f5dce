"""Greedy answers to eval questions from a Hugging Face folder (transformers), through the folder's own chat
template: how a source checks the model it built before anything is converted."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scripts.core.evalset import question_messages


def generate_answers_hf(model_dir: Path | str, questions: Sequence[str], max_new_tokens: int = 48,
                        system: str | None = None) -> list[str]:
    """Greedy answers from the Hugging Face folder, prompts built with the tokenizer's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    eos = model.generation_config.eos_token_id
    answers = []
    with torch.inference_mode():
        for q in questions:
            prompt = tok.apply_chat_template(question_messages(q, system), tokenize=False,
                                             add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id)
            answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers
