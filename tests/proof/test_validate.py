"""Checklist verdicts (pure) and the edge cases through the real Foundry Local runtime on the tiny model."""

import pytest

from scripts.core.hf_folder import control_tokens
from scripts.proof.edge_cases import EdgeVerdict, clean_message, edge_cases, edge_verdicts
from scripts.proof.measure import context_limit, run_worker
from scripts.recipe.load import parse_recipe
from scripts.core.errors import RecipeError
from scripts.proof.validate import (FAIL, PASS, SKIP, domain_item, edge_item, format_item, format_problem, leak_figures,
                              leak_item, lengths_item, tool_item)


def test_domain_item_accuracy_and_fp32_agreement():
    refs = ["It is red.", "Two."]
    ok = domain_item(["it is red", "Two."], refs, ["It is red.", "Two."], 0.9, 0.9)
    assert ok.status == PASS and "accuracy 100.0 % (2/2" in ok.figure and "same answer as FP32 100.0 %" in ok.figure
    broken = domain_item(["blah", "Two."], refs, ["It is red.", "Two."], 0.9, 0.9)
    assert broken.status == FAIL and "accuracy 50.0 % (1/2, need 90.0 %)" in broken.figure
    assert broken.detail["wrong"] == [{"got": "blah", "expected": "It is red."}]
    assert domain_item([], [], None, 0.9, 0.9).status == SKIP
    assert "FP32 reference not available" in domain_item(["Two."], ["Two."], None, 0.9, 0.9).figure


def test_format_rules():
    assert format_problem("", None, None, []) == "empty answer"
    assert "control token" in format_problem("hi <|im_end|>", None, None, ["<|im_end|>"])
    assert format_problem("It is red.", r"[A-Z][^\n]*[.!?]", None, []) is None
    assert "does not match" in format_problem("it is red", r"[A-Z][^\n]*[.!?]", None, [])
    assert format_problem('{"a": 1, "b": 2}', None, ["a", "b"], []) is None
    assert "lacks b" in format_problem('{"a": 1}', None, ["a", "b"], [])
    assert "not JSON" in format_problem("nope", None, ["a"], [])
    item = format_item(["Fine.", "", "Good."], None, None, [], 1.0)
    assert item.status == FAIL and "66.7 % well-formed (2/3" in item.figure
    assert format_item(["Fine."], None, None, [], 1.0).status == PASS


def test_leak_figures_ignore_warmup_and_flag_growth():
    flat = [100_000_000] * 5 + [150_000_000] * 95  # a jump during warm-up only
    f = leak_figures([100_000_000] * 10 + [150_000_000] * 90)
    assert f["warmup"] == 10 and f["growth_mb"] == 0
    assert leak_item(flat[:10] + [150_000_000] * 90, 0, 32, 16).status == PASS
    leaking = [100_000_000 + 100_000 * i for i in range(300)]  # +100 KB per request
    item = leak_item(leaking, 0, 32, 16)
    assert item.status == FAIL and item.detail["slope_kb_per_request"] == pytest.approx(100)
    assert leak_item([1] * 50, 3, 32, 16).status == FAIL


def test_leak_single_allocator_step_is_not_a_slope_but_steady_growth_is():
    # the soak that once failed: flat at 794 MB, one +12 MB step, flat at 806 MB
    step = [794_000_000] * 150 + [806_000_000] * 150
    item = leak_item(step, 0, 32, 16)
    assert item.status == PASS and item.detail["whole_slope_kb_per_request"] > 16
    assert item.detail["growth_mb"] == pytest.approx(12)
    # the same step above the growth limit still fails
    assert leak_item([794_000_000] * 150 + [840_000_000] * 150, 0, 32, 16).status == FAIL
    # a slow steady leak under the growth limit (30 KB/request × 270 = 8 MB) fails on slope in both halves
    slow = [794_000_000 + 30_000 * i for i in range(300)]
    item = leak_item(slow, 0, 32, 16)
    assert item.status == FAIL and item.detail["growth_mb"] < 32
    assert min(item.detail["half_slopes_kb_per_request"]) == pytest.approx(30)


def test_lengths_ratio_with_floor():
    rows = [{"prompt_tokens": 30, "ms_per_token": 10.0}, {"prompt_tokens": 500, "ms_per_token": 25.0}]
    assert lengths_item(rows, 3.0).status == PASS
    assert lengths_item(rows, 2.0).status == FAIL
    tiny = [{"prompt_tokens": 30, "ms_per_token": 0.01}, {"prompt_tokens": 500, "ms_per_token": 0.05}]
    assert lengths_item(tiny, 3.0, floor_ms=1.0).status == PASS
    assert lengths_item([{"prompt_tokens": 30, "ms_per_token": None}], 3.0).status == FAIL


def test_edge_verdicts():
    cases = edge_cases(512, ["<|im_end|>"])
    names = [c["name"] for c in cases]
    assert {"empty prompt", "max tokens 0", "max tokens negative", "non-UTF-8 bytes",
            "prompt longer than the context"} <= set(names)
    served = {"served_after": True, "same_after": True}
    outcomes = [{"name": c["name"], "kind": "error" if c["expect"] == "error" else "answer",
                 "message": "exceeds the model's maximum context length", "tokens": 3, **served} for c in cases]
    assert all(v.passed for v in edge_verdicts(cases, {"outcomes": outcomes}))
    outcomes[2] = {"name": cases[2]["name"], "kind": "answer", "tokens": 8, **served}  # over-context answered
    outcomes[0] = {"name": cases[0]["name"], "kind": "hang", "message": "no reply within 60 s"}
    v = edge_verdicts(cases, {"outcomes": outcomes[:-1]})
    assert not v[0].passed and "expected error, got answer" in v[2].outcome
    assert not v[-1].passed and "not run" in v[-1].outcome
    item = edge_item(v)
    assert item.status == FAIL and "failed: empty prompt" in item.figure
    assert edge_item([EdgeVerdict("x", True, "ok")]).status == PASS


def test_clean_message_drops_native_prefix():
    msg = "m:1 failed to answer: search_options.cc:55 int fl::Resolve(const S&, int) max_output_tokens must be >= 1"
    assert clean_message(msg) == "max_output_tokens must be >= 1"


def test_recipe_validate_section_defaults_and_errors(tmp_path):
    doc = {"model": {"source": str(tmp_path), "family": "auto"}, "foundry": {"name": "x"}}
    r = parse_recipe(doc, tmp_path / "r.json")
    assert r.validate.soak_requests == 300 and r.validate.format_regex is None
    doc["validate"] = {"format_regex": "([", "soak_request": 5}
    with pytest.raises(RecipeError) as e:
        parse_recipe(doc, tmp_path / "r.json")
    assert "validate.format_regex" in str(e.value) and "did you mean 'soak_requests'" in str(e.value)


def test_edge_cases_through_foundry_runtime(tiny_onnx_model, tmp_path):
    """Real runtime: every case gets an answer or a clear error and the runtime keeps serving."""
    cases = edge_cases(context_limit(tiny_onnx_model), control_tokens(tiny_onnx_model), concurrent=2)
    health = [{"role": "user", "content": "Hello"}]
    result = run_worker("foundry", tiny_onnx_model, [{"kind": "edge", "cases": cases, "health": health,
                                                      "timeout": 60}], {"cache_dir": str(tmp_path / "cache")})
    verdicts = edge_verdicts(cases, result["jobs"][0])
    assert all(v.passed for v in verdicts), [v for v in verdicts if not v.passed]
    by = {v.name: v.outcome for v in verdicts}
    assert "context" in by["prompt longer than the context"]
    assert "UTF-8" in by["non-UTF-8 bytes"]


def test_tool_item_judges_both_rates_and_shows_the_fp32_reference():
    from scripts.core.tool_evalset import cases, score_outcomes
    found = cases([{"split": "heldout", "messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                    "content": None, "tool_calls": [{"function": {"name": "a", "arguments": "{}"}}]}]},
                   {"split": "heldout", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                          "content": "Hello"}]}])
    good = score_outcomes(found, [([("a", {})], ""), ([], "Hi")])
    bad = score_outcomes(found, [([], "no"), ([], "Hi")])
    assert tool_item(None, None, 0.9).status == SKIP
    item = tool_item(good, bad, 0.9)
    assert item.status == PASS and item.figure.startswith("calls 1/1 (100.0 %), no call 1/1 (100.0 %) (need 90.0 %")
    assert "FP32 PyTorch calls 0/1" in item.figure and item.detail["reference"]["call_exact"] == 0.0
    assert tool_item(bad, None, 0.9).status == FAIL
