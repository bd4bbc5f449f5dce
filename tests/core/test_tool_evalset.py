"""Tool-call eval scoring (scripts/core/tool_evalset.py) on the committed Brightwater tool set."""
import json
from pathlib import Path

import pytest

from scripts.core.errors import ModelSourceError
from scripts.core.tool_evalset import (ToolScore, case_passes, cases, is_result_case, load_lines,
                                       result_values, score_outcomes)

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "brightwater-tools.jsonl"


def test_heldout_cases_of_the_committed_set():
    found = cases([json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines()])
    kinds = {c.kind for c in found}
    assert {"call", "parallel", "text", "loop"} <= kinds and len(found) >= 50
    assert all(c.messages[-1]["role"] == ("tool" if c.kind == "loop" else "user") for c in found)
    loops = [c for c in found if c.kind == "loop"]
    assert all(is_result_case(c) and not c.expected for c in loops) and len(loops) == 10
    assert not any(is_result_case(c) for c in found if c.kind != "loop")


def test_heldout_results_hold_households_training_never_shows():
    """A held-out loop's answer must read the household from the result: none of those names is in a training line."""
    lines = load_lines(DATA)
    train = " ".join(json.dumps(x["messages"]) for x in lines if x["split"] == "train")
    names = {json.loads(m["content"]).get("household") for c in cases(lines) if c.kind == "loop"
             for m in c.messages if m["role"] == "tool"} - {None}
    assert names and not any(n in train for n in names)


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


def test_scores_figure_and_verdict_cover_both_kinds():
    call = cases([{"split": "heldout", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                   "tool_calls": [{"function": {"name": "a", "arguments": '{"x": 1}'}}]}]}])[0]
    text = cases([{"split": "heldout", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}])[0]
    score = score_outcomes([call, call, text], [([("a", {"x": 1})], ""), ([("<invalid>", "cut")], ""), ([], "Hi")])
    assert score.figure() == "calls 1/2 (50.0 %), no call 1/1 (100.0 %)"
    assert not score.passes(0.9) and score.passes(0.5)
    assert score.to_json()["failures"][0]["got_calls"] == [("<invalid>", "cut")]
    assert score_outcomes([text], [([], "Hi")]).passes(1.0)  # a set without call cases is judged on what it has


def _loop_case(result: dict | str):
    content = result if isinstance(result, str) else json.dumps(result)
    return cases([{"split": "heldout", "kind": "loop", "messages": [
        {"role": "user", "content": "crates of pears?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "function": {"name": "stock", "arguments": '{"fruit": "pears"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": content},
        {"role": "assistant", "content": "There are 42 crates of pears."}]}])[0]


def test_a_result_case_needs_every_value_of_the_result_read_back_and_no_call():
    case = _loop_case({"fruit": "Pears", "crates": 42, "open": None, "ok": True, "where": {"store": "B2"}})
    assert is_result_case(case) and result_values(case) == ["Pears", "42", "B2"]  # nulls and booleans left out
    assert case_passes(case, [], "We hold 42 crates of pears in store B2.")        # strings case-free
    assert not case_passes(case, [], "We hold 41 crates of pears in store B2.")   # a value not read back
    assert not case_passes(case, [], "There are 42 crates of pears.")             # one value missing
    assert not case_passes(case, [("stock", {"fruit": "pears"})], "42 pears in B2")  # called again
    assert result_values(_loop_case("closed today")) == ["closed today"]          # a result that is not JSON
    score = score_outcomes([case, case], [([], "42 crates of pears, store B2"), ([("stock", {})], "")])
    assert (score.reads_ok, score.reads, score.texts, score.calls) == (1, 2, 0, 0)
    assert score.figure() == "calls 0/0 (0.0 %), no call 0/0 (0.0 %), results read 1/2 (50.0 %)"
    assert not score.passes(0.9) and score.passes(0.5)
    assert score.to_json()["result_read"] == 0.5 and score.to_json()["failures"][0]["ask"] == "crates of pears?"


def test_load_lines_names_the_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"question": "q"}\n')
    with pytest.raises(ModelSourceError, match=r"t.jsonl:2: a tool-set line needs 'messages'"):
        load_lines(path)


def test_committed_heldout_values_never_occur_in_training():
    """Held-out membership numbers and dates are not in any training line (make_brightwater_tools.py)."""
    lines = load_lines(DATA)
    train = " ".join(json.dumps(x["messages"]) for x in lines if x["split"] == "train")
    for case in cases(lines):
        given = [json.loads(c["function"]["arguments"]) for m in case.messages for c in m.get("tool_calls") or []]
        for args in [a for _, a in case.expected] + given:
            for key in ("member_id", "date"):
                if key in args:
                    assert args[key] not in train


def test_committed_heldout_phrasings_and_questions_never_occur_in_training():
    """No held-out user message (call phrasings with their values, no-call questions) is a training line's
    (make_brightwater_tools.py): the held-out score is on questions the model never saw."""
    lines = load_lines(DATA)
    train = {m["content"] for x in lines if x["split"] == "train" for m in x["messages"] if m["role"] == "user"}
    heldout = [next(m["content"] for m in reversed(c.messages) if m["role"] == "user") for c in cases(lines)]
    assert len(heldout) == 53 and not set(heldout) & train


def test_a_failed_tool_score_names_the_installed_version_and_what_is_required(tmp_path):
    """A redeploy with other bytes installs version 2 of a recipe that says 1: the error names what was asked."""
    from scripts.core.errors import QualityError
    from scripts.pipeline.installed_steps import require_tool_score
    from scripts.recipe.load import load_recipe
    recipe = load_recipe("brightwater-tools")
    score = ToolScore(calls_ok=1, calls=4, text_ok=2, texts=2)
    with pytest.raises(QualityError) as info:
        require_tool_score(score, recipe, "brightwater-tools:2", "through Foundry Local")
    assert str(info.value).startswith("brightwater-tools:2 on the held-out tool cases")
    assert "calls 1/4 (25.0 %)" in str(info.value) and "90 % of each (eval.min_accuracy)" in str(info.value)
    assert "Add training conversations of the failing kind" in str(info.value)
    with pytest.raises(QualityError, match=r"train longer\. x:2 stays installed$"):
        require_tool_score(score, recipe, "x:2", "here", "x:2 stays installed")
    require_tool_score(ToolScore(calls_ok=4, calls=4, text_ok=2, texts=2), recipe, "x:1", "here")  # passes: no error
