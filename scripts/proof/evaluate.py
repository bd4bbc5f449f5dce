"""Score a model's answers against a question/answer set (exact match after normalisation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from scripts.proof.qa import QA, answers_match, question_messages


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
