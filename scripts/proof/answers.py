"""Greedy answers to eval questions from a Hugging Face folder (transformers) or a converted folder (ONNX Runtime
GenAI), each through the folder's own chat template, and their exact-match score."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scripts.proof.qa import QA, exact_match, question_messages
from scripts.runtimes.backends import GenAIBackend

# --------------------------------------------------------------------------------------------
# Evaluation


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


def evaluate_hf(model_dir: Path | str, qa: Sequence[QA], max_new_tokens: int = 48) -> float:
    """Greedy exact-match accuracy (after :func:`normalise_answer`) of the HF model folder."""
    return exact_match(generate_answers_hf(model_dir, [x.question for x in qa], max_new_tokens), qa)


def generate_answers_onnx(model_dir: Path | str, questions: Sequence[str], max_new_tokens: int = 48,
                          system: str | None = None) -> list[str]:
    """Greedy answers from an ONNX Runtime GenAI folder (genai_config.json), through its own chat template."""

    backend = GenAIBackend(Path(model_dir))
    backend.load()
    return [backend.generate(question_messages(q, system), max_new_tokens).text for q in questions]


def evaluate_onnx(model_dir: Path | str, qa: Sequence[QA], max_new_tokens: int = 48) -> float:
    """Greedy exact-match accuracy of a converted ONNX Runtime GenAI model."""
    return exact_match(generate_answers_onnx(model_dir, [x.question for x in qa], max_new_tokens), qa)
