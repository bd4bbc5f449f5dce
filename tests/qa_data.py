"""Test helper: a tiny question/answer set and a JSONL writer (rows, or raw lines for broken-file cases)."""
from __future__ import annotations

import json
from pathlib import Path

TINY_QA = [
    {"question": "What colour is the gate?", "answer": "The gate is green."},
    {"question": "Who feeds the goats?", "answer": "Ada feeds the goats."},
    {"question": "When does the shop open?", "answer": "The shop opens at nine."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
