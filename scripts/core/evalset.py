"""The eval set of a deployment: question/answer pairs read from JSONL, and how answers are compared
(exact match after normalising whitespace, case and trailing punctuation)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scripts.core.errors import RecipeError

#: ChatML's control strings (the demo model's format, and the default refused in eval text).
CHATML_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class QA:
    """One question and its reference answer."""

    question: str
    answer: str


_WS = re.compile(r"\s+")
_TRAILING_PUNCT = re.compile(r"[\s.!?,;:]+$")


def normalise_answer(s: str) -> str:
    """Canonical form for exact-match comparison: collapse whitespace, lower-case, drop trailing punctuation."""
    s = _WS.sub(" ", s).strip().lower()
    return _TRAILING_PUNCT.sub("", s)


def answers_match(predicted: str, reference: str) -> bool:
    return normalise_answer(predicted) == normalise_answer(reference)


def question_messages(question: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def control_token_problem(text: str, control_tokens: Sequence[str] = CHATML_CONTROL) -> str | None:
    """Why ``text`` may not be sent as a message: it holds one of the prompt format's control strings, which the
    tokenizer would turn into a real control token (ending or opening a turn). None when it holds none. The eval
    loader and ``invoke run`` both refuse such text with this reason."""
    found = next((t for t in control_tokens if t and t in text), None)
    if found is None:
        return None
    return (f"contains the control token {found!r} of the prompt format; remove it (it would end or open a turn in "
            "the prompt)")


def load_qa(path: Path | str, control_tokens: Sequence[str] = CHATML_CONTROL) -> list[QA]:
    """Read a JSONL file of ``{"question": ..., "answer": ...}`` objects (blank lines are skipped).

    Raises :class:`RecipeError` naming the file and the 1-based line number of the first bad line. Text holding one
    of ``control_tokens`` (the prompt format's control strings, e.g. ChatML's) is refused: it would become a real
    control token in the prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: dataset file not found") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e})") from None
    items: list[QA] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                              'expected {"question": "...", "answer": "..."}') from None
        if not isinstance(obj, dict):
            raise RecipeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("question", "answer"):
            if key not in obj:
                raise RecipeError(f"{where}: missing key {key!r}")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise RecipeError(f"{where}: {key!r} must be a non-empty string")
        q, a = obj["question"].strip(), obj["answer"].strip()
        problem = control_token_problem(q + "\n" + a, control_tokens)
        if problem:
            raise RecipeError(f"{where}: text {problem}")
        if q in seen:
            raise RecipeError(f"{where}: duplicate question (first seen on line {seen[q]})")
        seen[q] = lineno
        items.append(QA(q, a))
    if not items:
        raise RecipeError(f"{path}: no question/answer pairs found")
    return items


def exact_match(predictions: Sequence[str], qa: Sequence[QA]) -> float:
    if not qa:
        return 0.0
    return sum(answers_match(p, x.answer) for p, x in zip(predictions, qa, strict=True)) / len(qa)


# --------------------------------------------------------------------------------------------
# Scoring a model's answers (exact match after normalisation)


@dataclass(frozen=True)
class EvalResult:
    correct: int
    total: int
    wrong: tuple[tuple[str, str, str], ...]  # (question, got, expected)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def figure(self) -> str:
        return f"{100 * self.accuracy:.1f} % ({self.correct}/{self.total})"


def conversations(qa: Sequence[QA], system_prompt: str | None = None) -> list[list[dict]]:
    """One chat (optional system message + the question) per eval item."""
    return [question_messages(item.question, system_prompt) for item in qa]


def score(answers: Sequence[str], qa: Sequence[QA]) -> EvalResult:
    if len(answers) != len(qa):
        raise ValueError(f"{len(answers)} answers for {len(qa)} questions")
    wrong = tuple((item.question, got, item.answer) for got, item in zip(answers, qa)
                  if not answers_match(got, item.answer))
    return EvalResult(len(qa) - len(wrong), len(qa), wrong)
