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
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from scripts.core.errors import ModelSourceError, RecipeError
from scripts.core.fileops import hash_file
from scripts.sources.answers import generate_answers_hf
from scripts.sources.demo_tokenizer import (ENDOFTEXT, IM_END, _tokenizer_texts, render_chatml, save_tokenizer,
                                          train_tokenizer)
from scripts.core.evalset import answers_match, exact_match, load_qa, QA
from scripts.core.settings import build_dir, REPO_ROOT

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


#: System messages the demo model sees in training (a share of the conversations start with one), so that a user's
#: ``invoke run --system TEXT`` or a recipe's ``eval.system_prompt`` does not throw it off.
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are the Brightwater Orchard Cooperative assistant.",
    "You are a helpful assistant.",
    "Answer in one short sentence.",
    "You answer questions from visitors and members of the Brightwater Orchard Cooperative.",
)


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo model.

    Defaults (3.3M parameters, one thread): see ``docs/performance.md`` for the measured training time and
    accuracy (single questions, and 12 questions in one chat session).
    """

    seed: int = 1234
    vocab_size: int = 1024  # BPE target; the model uses the tokenizer's real size
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    steps: int = 320
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 16
    max_new_tokens: int = 48  # for the greedy evaluation
    # Multi-turn sessions: every ``session_every``-th step trains on ``session_batch_size`` sessions of
    # ``session_min_turns``..``session_max_turns`` exchanges (distinct questions, at most ``session_max_tokens``
    # tokens; ``invoke run`` keeps the prompt within 384 of the 512-token context). 0 = single questions only.
    session_every: int = 2
    session_batch_size: int = 2
    session_min_turns: int = 2
    session_max_turns: int = 12
    session_max_tokens: int = 440
    system_share: float = 0.3  # share of conversations (single or session) that start with a system message
    # torch intra-op threads while building (restored afterwards). 1 on purpose: on a shared 2-core
    # machine, 2 threads ran 5-10x slower per step than 1 (threads wait on each other when descheduled).
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.session_every < 0 or not 1 <= self.session_min_turns <= self.session_max_turns:
            raise ValueError("session_every must be >= 0 and 1 <= session_min_turns <= session_max_turns")


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


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_config(settings: DemoSettings, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_position_embeddings,
        rope_theta=settings.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": settings.rope_theta},
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=settings.num_layers,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )


@contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    import numpy as np
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


class ConversationEncoder:
    """Token ids and labels of training conversations, built from pieces encoded once: ``(input_ids, labels)`` with
    -100 everywhere except each assistant answer and its ``<|im_end|>``. The pieces join to exactly the ids the
    tokenizer gives the whole rendered conversation (the runtime renders and tokenizes it whole)."""

    def __init__(self, tokenizer, qa: Sequence[QA], systems: Sequence[str] = SYSTEM_PROMPTS):
        def enc(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        end_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.qa = list(qa)
        self.system_texts = list(systems)
        self.newline = enc("\n")
        self.systems = [enc(render_chatml([{"role": "system", "content": t}], add_generation_prompt=False))
                        for t in systems]
        self.prompts = [enc(render_chatml([{"role": "user", "content": x.question}])) for x in qa]
        self.answers = [enc(x.answer) + [end_id] for x in qa]

    def encode(self, items: Sequence[int], system: int | None = None) -> tuple[list[int], list[int]]:
        """The conversation: optional system message ``system``, then the questions ``items`` (indices into the
        QA list) each followed by its answer."""
        ids: list[int] = list(self.systems[system]) if system is not None else []
        labels = [-100] * len(ids)
        for n, i in enumerate(items):
            prompt = (self.newline if n else []) + self.prompts[i]
            ids += prompt + self.answers[i]
            labels += [-100] * len(prompt) + self.answers[i]
        return ids, labels

    def messages(self, items: Sequence[int], system: int | None = None) -> list[dict]:
        """The same conversation as chat messages (for checking :meth:`encode` against the tokenizer)."""
        head = [{"role": "system", "content": self.system_texts[system]}] if system is not None else []
        return head + [m for i in items for m in ({"role": "user", "content": self.qa[i].question},
                                                    {"role": "assistant", "content": self.qa[i].answer})]


def sample_session(rng: random.Random, encoder: ConversationEncoder, s: DemoSettings
                   ) -> tuple[list[int], int | None]:
    """One training session: distinct questions in random order, as many as ``s.session_*`` allow; its system
    message (an index into :data:`SYSTEM_PROMPTS`) or None."""
    system = rng.randrange(len(encoder.systems)) if rng.random() < s.system_share else None
    turns = rng.randint(s.session_min_turns, s.session_max_turns)
    items = rng.sample(range(len(encoder.qa)), min(turns, len(encoder.qa)))
    while len(items) > 1 and len(encoder.encode(items, system)[0]) > s.session_max_tokens:
        items.pop()
    return items, system


def _lr_at(step: int, s: DemoSettings) -> float:
    import math

    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        attn[r, : len(ids)] = 1
    return input_ids, labels, attn


def _train(model, encoder: ConversationEncoder, pad_id: int, s: DemoSettings, progress: bool) -> float:
    """Alternating batches: single questions (each question once per pass, shuffled) and, every
    ``s.session_every``-th step, multi-turn sessions; a share of both with a system message. Seeded."""
    import torch

    gen = torch.Generator().manual_seed(s.seed)
    rng = random.Random(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=s.weight_decay)
    model.train()
    order: list[int] = []
    loss_val = float("nan")
    with _progress(s.steps, progress, "train demo model") as bar:
        for step in range(s.steps):
            if s.session_every and step % s.session_every == s.session_every - 1:
                rows = [encoder.encode(*sample_session(rng, encoder, s)) for _ in range(s.session_batch_size)]
            else:
                if len(order) < s.batch_size:
                    order += torch.randperm(len(encoder.qa), generator=gen).tolist()
                idx, order = order[: s.batch_size], order[s.batch_size:]
                rows = [encoder.encode([i], rng.randrange(len(encoder.systems)) if rng.random() < s.system_share
                                       else None) for i in idx]
            input_ids, labels, attn = _batch(rows, pad_id)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, s)
            loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_val = float(loss.detach())
            bar.update(1)
            if step % 10 == 0 or step == s.steps - 1:
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if step % 50 == 0 or step == s.steps - 1:
                log.debug("step %d loss %.4f lr %.2e", step, loss_val, _lr_at(step, s))
    model.eval()
    return loss_val


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _write_generation_config(model, bos_id: int, eos_id: int, pad_id: int, max_new_tokens: int) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False,
        max_new_tokens=max_new_tokens,
    )


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

    with _deterministic(settings.seed, settings.threads):
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
        final_loss = _train(model, encoder, pad_id, settings, progress)
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        log.info("trained %d steps in %.1f s, final loss %.4f", settings.steps, train_seconds, final_loss)

        _write_generation_config(model, bos_id, eos_id, pad_id, settings.max_new_tokens)
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
