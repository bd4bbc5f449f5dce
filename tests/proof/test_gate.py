"""Tests for scripts/proof/gate.py: the fidelity gate scores only the eval answers' positions, passes a build identical
to its reference, and refuses a broken one with a message that says nothing was installed and what to run (real GenAI
workers on the tiny converted model)."""
from __future__ import annotations

import numpy as np
import pytest

from scripts.core.evalset import QA
from scripts.proof.fidelity import answer_window, compare_window, summarise
from scripts.proof.gate import domain_windows, failure_message, heldout_windows, judge, measure_gate, tool_windows
from scripts.proof.measure import context_limit
from scripts.recipe.spec import FidelitySpec

QAS = [QA("Where is the orchard?", "In the valley, north of the town."), QA("Who founded it?", "Eleven families.")]


def test_an_answer_window_scores_only_the_positions_that_predict_the_answer():
    rng = np.random.default_rng(0)
    window = answer_window([1, 2, 3, 4], [5, 6, 7])
    assert window == {"ids": [1, 2, 3, 4, 5, 6, 7], "from": 3}
    ref = rng.normal(size=(7, 9))
    cand = ref.copy()
    cand[:3] += rng.normal(size=(3, 9)) * 5  # damage only the prompt positions: not scored
    figures = summarise([compare_window(cand, ref, window)])
    assert figures.tokens == 3 and figures.kld_mean == pytest.approx(0, abs=1e-12) and figures.top1 == 1.0


def test_domain_windows_render_the_question_with_the_packages_template(tiny_onnx_model):
    windows = domain_windows(tiny_onnx_model, QAS, None, context_limit(tiny_onnx_model))
    assert len(windows) == 2 and all(0 < w["from"] < len(w["ids"]) - 1 for w in windows)
    assert domain_windows(tiny_onnx_model, QAS, None, context=4) == []  # nothing longer than the context


def test_tool_windows_score_the_expected_calls_after_the_prompt_serve_writes(tiny_onnx_model):
    """A held-out call case of a tool set: the conversation with its tools as `invoke serve` writes it, then the calls
    in the family's format; no-call cases have no reference text and are left out."""
    from pathlib import Path

    from scripts.core.tool_evalset import load_cases
    from scripts.proof.measure import fast_tokenizer
    cases = load_cases(Path(__file__).resolve().parents[2] / "recipes" / "data" / "brightwater-tools.jsonl")
    some = [c for c in cases if c.expected][:2] + [c for c in cases if not c.expected][:1]
    windows = tool_windows(tiny_onnx_model, some, context=100_000)
    assert len(windows) == 2
    tokenizer = fast_tokenizer(tiny_onnx_model)
    prompt, answer = (tokenizer.decode(ids, skip_special_tokens=False)
                      for ids in (windows[0]["ids"][:windows[0]["from"] + 1], windows[0]["ids"][windows[0]["from"] + 1:]))
    name, args = some[0].expected[0]
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert answer.startswith("<tool_call>") and name in answer and all(str(v) in answer for v in args.values())
    assert tool_windows(tiny_onnx_model, some, context=50) == []  # nothing longer than the context


def test_judge_names_what_each_kind_misses():
    spec = FidelitySpec(max_kld=0.1, min_top1=0.9, max_ppl_increase=0.08)
    ok = {"kld_mean": 0.01, "top1": 0.99, "ppl_increase": 0.0, "tokens": 10}
    bad = {"kld_mean": 0.5, "top1": 0.7, "ppl_increase": 0.2, "tokens": 10}
    problems = judge({"domain": ok, "heldout": bad}, spec)
    assert problems["domain"] == [] and len(problems["heldout"]) == 2, "held-out text: KLD and ΔPPL, not top-1"
    assert len(judge({"domain": bad}, spec)["domain"]) == 3


def test_the_gate_passes_an_identical_build_and_refuses_a_broken_one(tiny_onnx_model, perturbed_onnx):
    context = context_limit(tiny_onnx_model)
    windows = {"domain": domain_windows(tiny_onnx_model, QAS, None, context),
               "heldout": heldout_windows(tiny_onnx_model, context, 2 * min(512, context))}
    strict = FidelitySpec(max_kld=1e-3, min_top1=0.99, max_ppl_increase=0.01)
    same = measure_gate(tiny_onnx_model, tiny_onnx_model, windows, strict)
    assert same.passed and set(same.figures) == {"domain", "heldout"}
    assert same.figures["domain"]["tokens"] == sum(len(w["ids"]) - 1 - w["from"] for w in windows["domain"])
    broken = measure_gate(perturbed_onnx, tiny_onnx_model, windows, strict)
    assert not broken.passed and broken.figures["heldout"]["kld_mean"] > 1e-3
    message = failure_message(broken, "tiny", "int4")
    assert "was not installed" in message and "mean KLD" in message
    assert "`invoke deploy --model tiny --precision auto` measures the layouts" in message
