"""The project's own demo model: a tiny Qwen2 fine-tuned on an invented domain, so quality checks mean something.

Everything is local and offline: a byte-level BPE tokenizer is trained with ``tokenizers`` on the
dataset, a small ``Qwen2ForCausalLM`` is built from scratch with a vocabulary of exactly the
tokenizer's size, and it is trained on ChatML conversations (loss on the assistant turns only) until it
answers the dataset's questions. Two kinds of conversation, alternating batches: one question alone, and a
*session* of several questions one after the other with the answers kept (as ``invoke run`` keeps its history),
each with or without a system message. A model trained on single questions only answers the first question of a
chat right and then confuses itself with the history. The result is a normal Hugging Face folder that ONNX
Runtime GenAI's model builder (and therefore Olive) can convert.

Usage::

    python -m scripts.sources.demo build  --dataset recipes/data/qwen-domain.jsonl --out build/demo-hf
    python -m scripts.sources.demo eval   --model build/demo-hf --dataset recipes/data/qwen-domain.jsonl

Folder written by :func:`build_demo_model`::

    config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json (with ``chat_template`` inline),
    chat_template.jinja (what transformers 5 writes by default; same text),
    slmops_demo.json (settings, dataset hash, measured accuracy: provenance)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scripts.core.errors import ModelSourceError, RecipeError
from scripts.core.fileops import hash_file
from scripts.sources.answers import generate_answers_hf
from scripts.sources.demo_tokenizer import ENDOFTEXT, IM_END, _tokenizer_texts, save_tokenizer, train_tokenizer
from scripts.core.evalset import answers_match, exact_match, load_qa
from scripts.core.settings import build_dir, REPO_ROOT
from scripts.sources.demo_training import (ConversationEncoder, DemoSettings, deterministic, make_config,
                                           SYSTEM_PROMPTS, train, write_generation_config)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Constants shared with the rest of the pipeline
# --------------------------------------------------------------------------------------------

PROVENANCE_FILE = "slmops_demo.json"
EXPECTED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    PROVENANCE_FILE,
)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class DemoBuildResult:
    out_dir: Path
    train_seconds: float
    accuracy: float
    n_questions: int
    final_loss: float = float("nan")
    n_parameters: int = 0
    vocab_size: int = 0
    wrong: tuple[str, ...] = field(default_factory=tuple)


def check_model_dir(model_dir: Path | str) -> dict:
    """Light structural check of a demo folder; returns config.json. Raises ModelSourceError."""
    model_dir = Path(model_dir)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                           "generation_config.json") if not (model_dir / f).is_file()]
    if missing:
        raise ModelSourceError(f"{model_dir}: missing {', '.join(missing)}; rebuild with "
                               "`python -m scripts.sources.demo build`")
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    for name, d in (("config.json", cfg), ("generation_config.json", gen)):
        for key in ("bos_token_id", "eos_token_id"):
            if d.get(key) is None:
                raise ModelSourceError(f"{model_dir / name}: {key} is null; ONNX Runtime GenAI refuses it")
    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_tok = len(set(vocab["model"]["vocab"].values()) | {t["id"] for t in vocab.get("added_tokens", [])})
    if n_tok != cfg["vocab_size"]:
        raise ModelSourceError(f"{model_dir}: tokenizer has {n_tok} tokens but config.json vocab_size is "
                               f"{cfg['vocab_size']}; the runtime cannot decode every id")
    return cfg


def build_demo_model(dataset_path: Path, out_dir: Path, settings: DemoSettings = DemoSettings(),
                     progress: bool = True) -> DemoBuildResult:
    """Train tokenizer + tiny Qwen2 on ``dataset_path``, save a HF folder in ``out_dir``, evaluate it.

    Deterministic for a given machine: same settings and data give a byte-identical model.safetensors.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    dataset_path, out_dir = Path(dataset_path), Path(out_dir)
    qa = load_qa(dataset_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("demo model: %d questions from %s -> %s", len(qa), dataset_path, out_dir)

    with deterministic(settings.seed, settings.threads):
        raw_tok = train_tokenizer(_tokenizer_texts(qa) + list(SYSTEM_PROMPTS), settings.vocab_size)
        save_tokenizer(raw_tok, out_dir, settings.max_position_embeddings)
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        vocab_size = len(tok)
        if vocab_size != raw_tok.get_vocab_size():
            raise ModelSourceError(f"tokenizer size changed on save: {raw_tok.get_vocab_size()} -> {vocab_size}")
        bos_id, eos_id, pad_id = (tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END, ENDOFTEXT))
        log.info("tokenizer: %d tokens (target %d); bos=%d eos=%d pad=%d",
                 vocab_size, settings.vocab_size, bos_id, eos_id, pad_id)

        encoder = ConversationEncoder(tok, qa)
        longest = max(max(len(encoder.encode([i], 0)[0]) for i in range(len(qa))), settings.session_max_tokens)
        if longest + settings.max_new_tokens > settings.max_position_embeddings:
            raise RecipeError(f"{dataset_path}: a training conversation may be {longest} tokens, too long for "
                              f"max_position_embeddings={settings.max_position_embeddings} with "
                              f"{settings.max_new_tokens} new tokens")

        torch.manual_seed(settings.seed)
        config = make_config(settings, vocab_size, bos_id, eos_id, pad_id)
        model = Qwen2ForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model: %d parameters, hidden %d, %d layers", n_params, settings.hidden_size, settings.num_layers)

        t0, cpu0 = time.perf_counter(), time.process_time()
        final_loss = train(model, encoder, pad_id, settings, progress)
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        log.info("trained %d steps in %.1f s, final loss %.4f", settings.steps, train_seconds, final_loss)

        write_generation_config(model, bos_id, eos_id, pad_id, settings.max_new_tokens)
        model.save_pretrained(str(out_dir), safe_serialization=True)

        answers = generate_answers_hf(out_dir, [x.question for x in qa], settings.max_new_tokens)
    wrong = tuple(f"{x.question} -> {p!r} (expected {x.answer!r})"
                  for p, x in zip(answers, qa) if not answers_match(p, x.answer))
    accuracy = exact_match(answers, qa)
    log.info("greedy exact match: %.1f %% (%d/%d)", 100 * accuracy, len(qa) - len(wrong), len(qa))
    for w in wrong:
        log.info("wrong: %s", w)

    import tokenizers
    import transformers

    provenance = {
        "kind": "slmops-demo-model",
        "dataset": dataset_path.name,
        "dataset_sha256": hash_file(dataset_path),
        "n_questions": len(qa),
        "settings": settings.to_dict(),
        "vocab_size": vocab_size,
        "n_parameters": n_params,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),  # less dependent on other load than the wall time
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "final_loss": round(final_loss, 6),
        "hf_exact_match": accuracy,
        "model_sha256": hash_file(out_dir / "model.safetensors"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return DemoBuildResult(out_dir=out_dir, train_seconds=train_seconds, accuracy=accuracy,
                           n_questions=len(qa), final_loss=final_loss, n_parameters=n_params,
                           vocab_size=vocab_size, wrong=wrong)


def build(request: dict) -> dict:
    """Source-kind builder (:mod:`scripts.sources.registry`): train the demo model on the step's input (the dataset)
    into ``request["out_dir"]``."""
    result = build_demo_model(Path(request["inputs"][0]), Path(request["out_dir"]), DemoSettings(), progress=True)
    return {"accuracy": result.accuracy, "train_seconds": result.train_seconds,
            "summary": f"demo model: {result.n_parameters:,} parameters, trained in {result.train_seconds:.0f} s, "
                       f"PyTorch exact match {100 * result.accuracy:.1f} %"}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m scripts.sources.demo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    default_data = REPO_ROOT / "recipes" / "data" / "qwen-domain.jsonl"
    b = sub.add_parser("build", help="train the demo model into a HF folder")
    b.add_argument("--dataset", type=Path, default=default_data)
    b.add_argument("--out", type=Path, default=build_dir() / "demo-hf")
    b.add_argument("--steps", type=int)
    b.add_argument("--seed", type=int)
    b.add_argument("--quiet", action="store_true")
    e = sub.add_parser("eval", help="greedy exact match of a Hugging Face folder")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--dataset", type=Path, default=default_data)
    e.add_argument("--show", action="store_true", help="print every answer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.cmd == "build":
        overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
        r = build_demo_model(args.dataset, args.out, DemoSettings(**overrides), progress=not args.quiet)
        print(json.dumps({"out_dir": str(r.out_dir), "train_seconds": round(r.train_seconds, 1),
                          "accuracy": r.accuracy, "n_questions": r.n_questions}))
        return 0
    qa = load_qa(args.dataset)
    preds = generate_answers_hf(args.model, [x.question for x in qa])
    for pr, x in zip(preds, qa):
        if args.show or not answers_match(pr, x.answer):
            print(f"{'ok ' if answers_match(pr, x.answer) else 'BAD'} {x.question} -> {pr!r}")
    acc = exact_match(preds, qa)
    print(json.dumps({"model": str(args.model), "accuracy": acc, "n_questions": len(qa)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
