"""Tool-call eval scoring (scripts/proof/tool_eval.py) on the committed Brightwater tool set."""
import json
from pathlib import Path

from scripts.proof.tool_eval import ToolScore, case_passes, cases

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "brightwater-tools.jsonl"


def test_heldout_cases_of_the_committed_set():
    found = cases([json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()])
    kinds = {c.kind for c in found}
    assert {"call", "parallel", "text"} <= kinds and len(found) >= 40
    assert all(c.messages[-1]["role"] == "user" for c in found)


def test_exact_names_and_json_equal_arguments_order_free():
    case = cases([{"split": "heldout", "kind": "parallel", "tools": [], "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "a", "arguments": '{"x": 1, "y": 2}'}}, {"function": {"name": "a", "arguments": '{"x": 3}'}}]}]}])[0]
    assert case_passes(case, [("a", {"x": 3}), ("a", {"y": 2, "x": 1})], None)
    assert not case_passes(case, [("a", {"x": 3})], None)
    assert not case_passes(case, [("a", {"x": 3}), ("a", {"x": 1, "y": "2"})], None)


def test_no_call_cases_need_text_and_no_call():
    case = cases([{"split": "heldout", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}])[0]
    score = ToolScore()
    score.add(case, [], "Hello there")
    score.add(case, [("a", {})], "")
    assert (score.text_ok, score.texts, score.no_call_accuracy) == (1, 2, 0.5)
