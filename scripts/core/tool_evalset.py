"""A tool-calling set (``recipes/data/brightwater-tools.jsonl``: OpenAI chat lines with ``tools``, each ``split``
train or heldout) and how a model's answers to its held-out lines are scored, pure. Each held-out line's last
assistant message is the expectation: its ``tool_calls`` (a call case) or text (a no-call case; a *result* case when
the messages before it end with tool results: the agent loop's second step). A call case counts when the model's calls
have exactly the expected names and JSON-equal arguments (order-free for parallel calls); a no-call case counts when the
model answers in text and calls nothing; a result case when it answers in text, calls nothing and its text contains
every value of the results (strings case-free, numbers as written; nulls and booleans left out): what it read back."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scripts.core.errors import ModelSourceError


def load_lines(path: Path, split: str | None = None) -> list[dict]:
    """The conversations of a tool set (``split`` None: all)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ModelSourceError(f"{path}:{n}: not JSON ({exc}).") from None
        if not isinstance(item.get("messages"), list) or not item["messages"]:
            raise ModelSourceError(f"{path}:{n}: a tool-set line needs 'messages' (OpenAI chat format).")
        if split is None or item.get("split", "train") == split:
            out.append(item)
    return out


def is_tool_set(path: Path) -> bool:
    """Whether the JSONL file ``path`` is a tool set (its first line has ``messages``) rather than question/answer
    pairs; unreadable lines are left for the loader that reads the file to report."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                item = json.loads(line)
            except ValueError:
                return False
            return isinstance(item, dict) and "messages" in item
    return False


@dataclass(frozen=True)
class ToolCase:
    """The prompt (messages before the expected turn), the tools, and the expected calls (empty: answer in text)."""

    messages: list[dict]
    tools: list[dict]
    expected: list[tuple[str, Any]]
    kind: str


def cases(lines: Sequence[dict]) -> list[ToolCase]:
    out = []
    for line in lines:
        if line.get("split", "train") != "heldout":
            continue
        *prompt, last = line["messages"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"] or "{}")) for c in last.get("tool_calls") or []]
        out.append(ToolCase(prompt, line.get("tools") or [], calls, line.get("kind", "call" if calls else "text")))
    return out


def result_values(case: ToolCase) -> list[str]:
    """The values an answer must read back from the tool results ending ``case``'s prompt (none when it does not end
    with results): the strings and numbers of each result's JSON (a result that is not JSON: its text)."""
    out: list[str] = []

    def leaves(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                leaves(v)
        elif isinstance(value, list):
            for v in value:
                leaves(v)
        elif isinstance(value, str) and value.strip():
            out.append(value.strip())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(json.dumps(value))

    results = []
    for m in reversed(case.messages):
        if m.get("role") != "tool":
            break
        results.append(m.get("content"))
    for content in reversed(results):
        try:
            leaves(json.loads(content) if isinstance(content, str) else content)
        except ValueError:
            leaves(content)
    return out


def is_result_case(case: ToolCase) -> bool:
    return not case.expected and bool(case.messages) and case.messages[-1].get("role") == "tool"


def _key(call: tuple[str, Any]) -> str:
    return json.dumps([call[0], call[1]], sort_keys=True)


def case_passes(case: ToolCase, calls: Sequence[tuple[str, Any]], text: str | None) -> bool:
    """``calls``: the model's (name, parsed arguments); ``text``: its text."""
    if not case.expected:
        answer = (text or "").strip()
        return not calls and bool(answer) and all(v.lower() in answer.lower() for v in result_values(case))
    return Counter(map(_key, calls)) == Counter(map(_key, case.expected))


def rates_pass(rates: Sequence[Sequence[Any]], min_accuracy: float) -> bool:
    """Whether every ``(label, right, cases)`` rate with cases is at least ``min_accuracy`` (:meth:`ToolScore.rates`,
    or the ``"rates"`` of its JSON)."""
    return all(ok / n >= min_accuracy for _label, ok, n in rates if n)


@dataclass
class ToolScore:
    calls_ok: int = 0
    calls: int = 0
    text_ok: int = 0
    texts: int = 0
    reads_ok: int = 0  # result cases: answered in text with the results' values
    reads: int = 0
    failures: list[dict] = field(default_factory=list)

    def add(self, case: ToolCase, calls, text) -> None:
        ok = case_passes(case, calls, text)
        if case.expected:
            self.calls, self.calls_ok = self.calls + 1, self.calls_ok + ok
        elif is_result_case(case):
            self.reads, self.reads_ok = self.reads + 1, self.reads_ok + ok
        else:
            self.texts, self.text_ok = self.texts + 1, self.text_ok + ok
        if not ok and len(self.failures) < 10:
            ask = next((m.get("content") for m in reversed(case.messages) if m.get("role") == "user"), None)
            self.failures.append({"ask": ask, "expected": case.expected or result_values(case),
                                  "got_calls": list(calls), "got_text": (text or "")[:120]})

    @property
    def call_accuracy(self) -> float:
        return self.calls_ok / self.calls if self.calls else 0.0

    @property
    def no_call_accuracy(self) -> float:
        return self.text_ok / self.texts if self.texts else 0.0

    @property
    def read_accuracy(self) -> float:
        return self.reads_ok / self.reads if self.reads else 0.0

    def rates(self) -> list[tuple[str, int, int]]:
        """``(label, right, cases)`` of each kind the set has (results only when it has result cases)."""
        kinds = [("calls", self.calls_ok, self.calls), ("no call", self.text_ok, self.texts)]
        return kinds + ([("results read", self.reads_ok, self.reads)] if self.reads else [])

    def figure(self) -> str:
        """``calls 27/28 (96.4 %), no call 15/15 (100.0 %)`` (and ``, results read 12/13 (92.3 %)``)."""
        return ", ".join(f"{label} {ok}/{n} ({100 * ok / n if n else 0:.1f} %)" for label, ok, n in self.rates())

    def passes(self, min_accuracy: float) -> bool:
        """Every rate (of the kinds the set has) at least ``min_accuracy``."""
        return rates_pass(self.rates(), min_accuracy)

    def to_json(self) -> dict[str, Any]:
        return {"call_exact": self.call_accuracy, "calls": self.calls, "no_call_text": self.no_call_accuracy,
                "no_calls": self.texts, "result_read": self.read_accuracy, "results": self.reads,
                "rates": self.rates(), "figure": self.figure(), "failures": self.failures}

    def heldout_json(self) -> dict[str, Any]:
        """The figures a trainer's provenance file records for the held-out split (``heldout_*``, failures)."""
        return {"heldout_call_exact": self.call_accuracy, "heldout_calls": self.calls,
                "heldout_no_call_text": self.no_call_accuracy, "heldout_no_calls": self.texts,
                "heldout_result_read": self.read_accuracy, "heldout_results": self.reads,
                "failures": self.failures}


def load_cases(path: Path) -> list[ToolCase]:
    """The held-out cases of the tool set at ``path``."""
    return cases(load_lines(path))


def score_outcomes(found: Sequence[ToolCase], outcomes: Sequence[tuple[Sequence[tuple[str, Any]], str | None]]) -> ToolScore:
    """``outcomes``: per case, the model's (calls as (name, parsed arguments), text)."""
    score = ToolScore()
    for case, (calls, text) in zip(found, outcomes, strict=True):
        score.add(case, calls, text)
    return score
