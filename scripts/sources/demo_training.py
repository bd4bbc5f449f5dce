"""How the demo models are made: their settings, their Qwen2 configuration, and the seeded training loop over
ChatML conversations (single questions and multi-turn sessions, loss on the assistant turns). Used by the demo model
(:mod:`scripts.sources.demo`) and the tool-calling demo model (:mod:`scripts.sources.tools_demo`)."""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

from scripts.sources.demo_tokenizer import IM_END, render_chatml
from scripts.core.evalset import QA

log = logging.getLogger(__name__)

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
def deterministic(seed: int, threads: int) -> Iterator[None]:
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


def lr_at(step: int, s: DemoSettings) -> float:
    import math

    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int):
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


def padded_loss(pad_id: int) -> Callable:
    """The loss of a batch of ``(ids, labels)`` rows, padded to the longest (the causal LM's own loss)."""

    def loss_of(model, rows):
        input_ids, labels, attn = batch(rows, pad_id)
        return model(input_ids=input_ids, attention_mask=attn, labels=labels).loss

    return loss_of


def fit(model, rows_at: Callable[[int], list], loss_of: Callable, s: DemoSettings, progress: bool, desc: str) -> float:
    """The seeded optimisation loop the demo models share: ``s.steps`` AdamW steps on ``loss_of(model, rows)`` of the
    rows ``rows_at(step)`` gives (:func:`padded_loss` for ``(ids, labels)`` pairs), the learning-rate schedule of
    :func:`lr_at`, gradients clipped at 1. Returns the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=s.weight_decay)
    model.train()
    loss_val = float("nan")
    with progress_bar(s.steps, progress, desc) as bar:
        for step in range(s.steps):
            rows = rows_at(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s)
            loss = loss_of(model, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_val = float(loss.detach())
            bar.update(1)
            if step % 10 == 0 or step == s.steps - 1:
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if step % 50 == 0 or step == s.steps - 1:
                log.debug("step %d loss %.4f lr %.2e", step, loss_val, lr_at(step, s))
    model.eval()
    return loss_val


def shuffled_batches(n: int, size: int, seed: int) -> Callable[[], list[int]]:
    """Seeded batches of indices into ``n`` items: each item once per pass, passes reshuffled."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch() -> list[int]:
        nonlocal order
        if len(order) < size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:size], order[size:]
        return idx

    return next_batch


def train(model, encoder: ConversationEncoder, pad_id: int, s: DemoSettings, progress: bool) -> float:
    """Alternating batches: single questions (each question once per pass, shuffled) and, every
    ``s.session_every``-th step, multi-turn sessions; a share of both with a system message. Seeded."""
    rng = random.Random(s.seed)
    next_batch = shuffled_batches(len(encoder.qa), s.batch_size, s.seed)

    def rows_at(step: int) -> list:
        if s.session_every and step % s.session_every == s.session_every - 1:
            return [encoder.encode(*sample_session(rng, encoder, s)) for _ in range(s.session_batch_size)]
        return [encoder.encode([i], rng.randrange(len(encoder.systems)) if rng.random() < s.system_share else None)
                for i in next_batch()]

    return fit(model, rows_at, padded_loss(pad_id), s, progress, "train demo model")


def train_examples(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, s: DemoSettings,
                   progress: bool) -> float:
    """Batches of already-encoded ``(ids, labels)`` examples, each once per pass, shuffled. Seeded."""
    next_batch = shuffled_batches(len(examples), s.batch_size, s.seed)
    return fit(model, lambda step: [examples[i] for i in next_batch()], padded_loss(pad_id), s, progress, "train")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def write_generation_config(model, bos_id: int, eos_id: int, pad_id: int, max_new_tokens: int) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False,
        max_new_tokens=max_new_tokens,
    )
