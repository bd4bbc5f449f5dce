"""Tests for scripts/recipe/runtime.py: the recipe's ``runtime`` block (ONNX Runtime session options)."""
from __future__ import annotations

import json

import pytest

from scripts.core.errors import RecipeError
from scripts.recipe import runtime
from scripts.recipe.load import load_recipe
from scripts.recipe.runtime import PHYSICAL, RuntimeSpec, physical_cores

MINIMAL = {"model": {"source": "demo"}, "foundry": {"name": "my-model"}}


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(tmp_path))
    return tmp_path


def load(recipes, doc):
    (recipes / "r.json").write_text(json.dumps(doc), encoding="utf-8")
    return load_recipe("r")


def test_default_is_physical_cores(recipes):
    recipe = load(recipes, MINIMAL)
    assert recipe.runtime.intra_op_threads == PHYSICAL
    assert recipe.runtime.session_options() == {"intra_op_num_threads": physical_cores()}


def test_physical_is_resolved_on_this_machine(monkeypatch):
    monkeypatch.setattr(runtime, "physical_cores", lambda: 6)
    assert RuntimeSpec().threads() == 6
    assert RuntimeSpec(3).session_options() == {"intra_op_num_threads": 3}


def test_physical_cores_is_a_positive_count():
    assert physical_cores() >= 1


def test_a_number_is_kept(recipes):
    recipe = load(recipes, {**MINIMAL, "runtime": {"intra_op_threads": 1}})
    assert recipe.runtime.session_options() == {"intra_op_num_threads": 1}


@pytest.mark.parametrize("value, fragment", [("all", "'all' is not allowed; use 'physical' or a whole number"),
                                             (0, "0 is out of range"), (1.5, "expected a string or an integer"),
                                             (True, "expected a string or an integer")])
def test_bad_values_are_clear_errors(recipes, value, fragment):
    with pytest.raises(RecipeError) as info:
        load(recipes, {**MINIMAL, "runtime": {"intra_op_threads": value}})
    assert "runtime.intra_op_threads" in str(info.value) and fragment in str(info.value)


def test_unknown_runtime_key_is_named(recipes):
    with pytest.raises(RecipeError, match=r"runtime.inter_op_threads: unknown key"):
        load(recipes, {**MINIMAL, "runtime": {"inter_op_threads": 2}})


def test_prefill_chunk_goes_to_search_and_zero_leaves_the_runtimes_default(recipes):
    assert load(recipes, MINIMAL).runtime.search_options() == {"chunk_size": 512}
    assert load(recipes, {**MINIMAL, "runtime": {"prefill_chunk": 2048}}).runtime.search_options() == {
        "chunk_size": 2048}
    assert load(recipes, {**MINIMAL, "runtime": {"prefill_chunk": 0}}).runtime.search_options() == {}
    with pytest.raises(RecipeError, match=r"runtime.prefill_chunk: 8 is out of range; allowed: 0"):
        load(recipes, {**MINIMAL, "runtime": {"prefill_chunk": 8}})


def test_a_chunked_prefill_answers_the_same_and_is_scored_in_one_pass(tiny_onnx_model, tmp_path):
    from scripts.convert.package import mirror_with_config
    from scripts.proof.measure import run_worker
    chunked = mirror_with_config(tiny_onnx_model, tmp_path / "chunked",
                                 lambda doc: {**doc, "search": {**doc["search"], "chunk_size": 16}})
    long_question = [{"role": "user", "content": "The orchard keeps records of every harvest. " * 8}]
    jobs = [{"kind": "answers", "conversations": [long_question], "max_new_tokens": 12},
            {"kind": "logits", "windows": [list(range(3, 100))]}]  # 97 tokens: 7 chunks of 16
    whole, parts = (run_worker("genai", d, jobs)["jobs"] for d in (tiny_onnx_model, chunked))
    assert whole[0]["answers"][0]["text"] == parts[0]["answers"][0]["text"]  # the prompt ran in chunks of 16
    assert whole[1]["windows"][0]["argmax"] == parts[1]["windows"][0]["argmax"]  # every position scored
