"""Tests for scripts/core/evalset.py: the eval set loader and answer comparison."""
from __future__ import annotations

import pytest

from scripts.core.errors import RecipeError
from scripts.core.evalset import QA, exact_match, load_qa, normalise_answer
from scripts.core.settings import REPO_ROOT
from tests.qa_data import TINY_QA, write_jsonl

DATASET = REPO_ROOT / "recipes" / "data" / "qwen-domain.jsonl"



# ---------------------------------------------------------------- load_qa


def test_bundled_dataset_is_valid_and_large_enough():
    qa = load_qa(DATASET)
    assert len(qa) >= 64
    assert all(len(x.answer.split()) <= 20 for x in qa)


def test_load_qa_good_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", TINY_QA + [""])
    assert load_qa(p) == [QA(r["question"], r["answer"]) for r in TINY_QA]


def test_load_qa_bad_json_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [TINY_QA[0], '{"question": "x", "answer": ', TINY_QA[1]])
    with pytest.raises(RecipeError) as e:
        load_qa(p)
    assert f"{p}:2" in str(e.value)
    assert "invalid JSON" in str(e.value)


def test_load_qa_missing_key_names_key_and_line(tmp_path):
    p = write_jsonl(tmp_path / "missing.jsonl", [TINY_QA[0], TINY_QA[1], {"question": "Only a question?"}])
    with pytest.raises(RecipeError, match=r"missing\.jsonl:3: missing key 'answer'"):
        load_qa(p)


@pytest.mark.parametrize("row", [["a", "b"], {"question": "", "answer": "x"}, {"question": "q", "answer": 3}])
def test_load_qa_rejects_wrong_shapes(tmp_path, row):
    with pytest.raises(RecipeError, match=r":1: "):
        load_qa(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_load_qa_missing_file_and_empty_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_qa(tmp_path / "nope.jsonl")
    with pytest.raises(RecipeError, match="no question/answer pairs"):
        load_qa(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_load_qa_duplicate_question(tmp_path):
    with pytest.raises(RecipeError, match=r":2: duplicate question \(first seen on line 1\)"):
        load_qa(write_jsonl(tmp_path / "d.jsonl", [TINY_QA[0], TINY_QA[0]]))


# ---------------------------------------------------------------- normalise_answer


@pytest.mark.parametrize(
    "a, b",
    [
        ("The gate is green.", "the gate is green"),
        ("  The   gate\nis green!  ", "the gate is green"),
        ("Yes, it is.", "yes, it is"),
        ("Call 0412 558 730.", "call 0412 558 730"),
        ("office@brightwater.coop.", "office@brightwater.coop"),
    ],
)
def test_normalise_answer(a, b):
    assert normalise_answer(a) == b


def test_normalise_answer_keeps_inner_punctuation_and_words():
    assert normalise_answer("Grow together, share the harvest.") != normalise_answer("Grow together share the harvest")
    assert normalise_answer("It is green.") != normalise_answer("It is blue.")


def test_exact_match():
    qa = [QA("q1", "A b."), QA("q2", "C.")]
    assert exact_match(["a  B", "D"], qa) == 0.5




def test_load_qa_refuses_the_formats_control_tokens(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "a <|im_end|> b", "answer": "x"}])
    with pytest.raises(RecipeError, match="control token '<\\|im_end\\|>'"):
        load_qa(p)
    p = write_jsonl(tmp_path / "e.jsonl", [{"question": "a <|eot_id|> b", "answer": "x"}])
    assert load_qa(p) != [] and len(load_qa(p)) == 1  # not ChatML's
    with pytest.raises(RecipeError, match="<\\|eot_id\\|>"):
        load_qa(p, control_tokens=("<|eot_id|>",))
