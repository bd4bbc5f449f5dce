"""Tests for scripts/sources/synthetic.py (the tokenizer only: the 494M-parameter model is built by
`invoke compare --model bench-0.5b`, not in the test suite) and the bench-0.5b recipe."""
from __future__ import annotations

import pytest

from scripts.sources.synthetic import SHAPES, SPECIALS, full_vocab_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return full_vocab_tokenizer(SHAPES["synthetic:qwen2.5-0.5b"]["vocab_size"])


def test_tokenizer_covers_the_whole_vocabulary(tokenizer):
    assert tokenizer.get_vocab_size() == 151936
    for token, idx in SPECIALS.items():
        assert tokenizer.token_to_id(token) == idx
    ids = [0, 255, 700, 5000, 100000, 151642, 151646, 151935]
    for i in ids:  # every id the random model can emit decodes to text (Foundry streams nothing otherwise)
        assert tokenizer.decode([i]) != ""


def test_chatml_prompt_encodes_with_the_specials(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n").ids
    assert ids[0] == SPECIALS["<|im_start|>"] and SPECIALS["<|im_end|>"] in ids


def test_bench_recipe_uses_the_synthetic_source():
    from scripts.pipeline import Pipeline
    from scripts.recipe.load import load_recipe
    r = load_recipe("bench-0.5b")
    assert r.source.spec == "synthetic:qwen2.5-0.5b" and r.source.random_weights
    q = r.conversion.quantization
    assert r.conversion.precision == "int4" and q.embeddings and q.block_size == 128
    steps = [s.name for s in Pipeline(r).steps()]
    assert steps.index("synthetic-model") < steps.index("convert")
