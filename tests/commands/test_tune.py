"""Tests for scripts/commands/tune.py: candidates, the judgement (pure), the table. The real search runs in
`invoke tune` (a benchmark: minutes per candidate)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from scripts.core.errors import RecipeError
from scripts.commands.layouts import (auto_candidates, candidate_conversion, candidate_quantization, describe, GRID,
                                      layout_keys, SMALLEST)
from scripts.commands.tune import apply_runoff, judge, load_candidates, markdown, TuneRow, winner_keys
from scripts.recipe.spec import Conversion, FidelitySpec, Quantization

GOOD = {"kld_mean": 0.02, "kld_p99": 0.1, "top1": 0.93, "ppl_increase": 0.02}


def row(name, ttft, tps, fidelity=GOOD, acc=0.99, ratio=0.2, **q):
    return TuneRow(name, q, bytes=int(ratio * 600e6), size_ratio=ratio, eval_accuracy=acc, ttft_ms=ttft,
                   decode_tps=tps, fidelity=fidelity)


def test_grid_candidates_are_valid_quantizations():
    for cand in GRID:
        q = candidate_quantization(cand)
        assert q.eight_bit == tuple(cand.get("eight_bit", ()))
    assert len({c["name"] for c in GRID}) == len(GRID)


def test_unknown_candidate_key_is_refused():
    with pytest.raises(RecipeError, match="'blocksize' is not a layout key; valid keys: precision, gguf, adapter"):
        candidate_quantization({"name": "x", "blocksize": 64})
    with pytest.raises(RecipeError, match="adapter 'fuse' is not allowed; choose one of: 'branch', 'merge'"):
        candidate_conversion(Conversion(precision="int4"), {"name": "x", "adapter": "fuse"})
    with pytest.raises(RecipeError, match="precision 'auto' is what searches the layouts"):
        candidate_conversion(Conversion(precision="int4"), {"name": "x", "precision": "auto"})


def test_candidates_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"name": "b64", "block_size": 64}]))
    assert load_candidates(path) == [{"name": "b64", "block_size": 64}]
    assert load_candidates(None)[0]["name"] == GRID[0]["name"]
    path.write_text(json.dumps({"name": "b64"}))
    with pytest.raises(RecipeError, match="expected a JSON list of objects"):
        load_candidates(path)
    path.write_text(json.dumps([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(RecipeError, match="unique"):
        load_candidates(path)
    path.write_text("[")
    with pytest.raises(RecipeError, match="cannot be read as JSON"):
        load_candidates(path)
    path.write_text(json.dumps([{"name": "a", "gguf": "lossless"}]))
    with pytest.raises(RecipeError, match="candidate 'a': gguf 'lossless' is not allowed"):
        load_candidates(path)


def test_judge_picks_the_fastest_that_qualifies_and_says_why_others_do_not():
    bad_fidelity = {**GOOD, "top1": 0.7, "kld_mean": 0.3}
    rows = [row("fast-but-lossy", 10, 200, fidelity=bad_fidelity),
            row("too-big", 12, 190, ratio=0.3),
            row("inaccurate", 12, 190, acc=0.5),
            row("slow", 40, 80),
            row("quick", 20, 150)]
    winner = judge(rows, fp32_accuracy=1.0, threshold=0.98, spec=FidelitySpec(), max_size_ratio=0.25)
    assert winner.name == "quick"
    by = {r.name: r for r in rows}
    assert any("top-1 agreement 70.0 % < 90 %" in m for m in by["fast-but-lossy"].misses)
    assert by["too-big"].misses == ["size 0.300× FP32 > 0.25×"]
    assert any("eval accuracy 50.0 %" in m for m in by["inaccurate"].misses)
    assert by["slow"].qualifies and not by["fast-but-lossy"].qualifies


def test_judge_without_a_qualifying_candidate_returns_none():
    rows = [row("a", 10, 100, fidelity=None), TuneRow("b", {}, status="failed", reason="boom")]
    assert judge(rows, 1.0, 0.98, FidelitySpec(), 0.25) is None
    assert rows[0].misses == ["fidelity not measured"] and not rows[1].qualifies


def test_the_runoff_figures_replace_the_finalists_speed_before_the_choice():
    """Candidates measured minutes apart on a shared machine: the qualifying ones are measured again side by side and
    the choice is made on those figures."""
    rows = [row("o4", 20, 100), row("all8", 20, 125), row("lossy", 10, 300, fidelity={**GOOD, "top1": 0.5})]
    assert judge(rows, 1.0, 0.98, FidelitySpec(), 0.25).name == "all8"  # first pass: all8 looked faster
    apply_runoff(rows, {"o4": {"ttft_ms": 19, "decode_tps": 130, "runs": 9},
                        "all8": {"ttft_ms": 21, "decode_tps": 122, "runs": 9}})
    assert judge(rows, 1.0, 0.98, FidelitySpec(), 0.25).name == "o4"
    assert [r.runoff for r in rows] == [True, True, False] and rows[2].decode_tps == 300
    report = {"rows": [{**r.__dict__, "answer_ms": r.answer_ms} for r in rows], "winner": "o4", "runoff_rounds": 3,
              "fp32": {"bytes": 600e6, "eval_accuracy": 1.0, "ttft_ms": 50, "decode_tps": 60},
              "fidelity_spec": FidelitySpec().__dict__, "threshold": 0.98, "max_size_ratio": 0.25, "answer_tokens": 64}
    assert "Run-off: the speed of the qualifying candidates (o4, all8) was measured again, interleaved over 3 " \
        "rounds" in markdown(report)


def test_markdown_table_and_winner_keys():
    rows = [row("quick", 20, 150, eight_bit=["lm_head"]), TuneRow("broken", {}, status="failed", reason="no graph")]
    winner = judge(rows, 1.0, 0.98, FidelitySpec(), 0.25)
    report = {"rows": [{**r.__dict__, "answer_ms": r.answer_ms} for r in rows], "winner": winner.name,
              "fp32": {"bytes": 600e6, "eval_accuracy": 1.0, "ttft_ms": 50, "decode_tps": 60},
              "fidelity_spec": FidelitySpec().__dict__, "threshold": 0.98, "max_size_ratio": 0.25, "answer_tokens": 64}
    text = markdown(report)
    assert "| quick | int4 b32 sym, 8-bit: lm_head | 120.0 (0.200) | 99.0 % | 0.0200 | 0.100 | 93.0 % | +2.0 % | 20 | 150 | 447 | **winner** |" \
        in text
    assert "failed: no graph" in text and "GGUF" not in text and "Run-off" not in text
    note = "The source GGUF stores 99% …"
    assert markdown({**report, "source_note": note}).endswith(f"\n\n{note}")
    keys = winner_keys(winner)
    assert keys["conversion"]["quantization"]["eight_bit"] == ["lm_head"]
    assert keys["conversion"]["precision"] == "int4"


def test_a_candidate_is_the_same_layout_whatever_the_recipe_says():
    """Candidates start from the schema defaults, not the recipe's keys: a recipe that keeps groups at 8 bits must not
    turn the plain INT4 candidates into mixed ones."""
    plain = candidate_quantization(GRID[0])
    assert plain.eight_bit == () and plain.algorithm == "default" and plain.lm_head
    assert (plain.block_size, plain.symmetric, plain.embeddings) == (32, True, True)
    assert candidate_quantization({"name": "bare"}) == Quantization(32, True, 4, "default")


def test_a_candidate_sets_the_layout_and_keeps_the_recipes_other_conversion_keys():
    recipe_conv = replace(Conversion(precision="int4", gguf="requantize", adapter="merge", adapter_bits=8,
                                     kv_cache="int8"), fidelity=FidelitySpec(max_kld=0.01))
    conv = candidate_conversion(recipe_conv, {"name": "i8", "precision": "int8"})
    assert (conv.precision, conv.gguf, conv.adapter, conv.adapter_bits) == ("int8", "exact", "branch", 32)
    assert conv.kv_cache == "int8" and conv.fidelity.max_kld == 0.01  # the recipe's, not the candidate's
    assert candidate_conversion(recipe_conv, GRID[0]).gguf == "requantize"  # the grid re-quantizes a GGUF
    assert layout_keys({"name": "m", "adapter": "merge", "eight_bit": ["lm_head"]}) == {
        "precision": "int4", "gguf": "exact", "adapter": "merge", "adapter_bits": 32,
        "quantization": {**Quantization().__dict__, "eight_bit": ["lm_head"]}}


def test_auto_searches_what_the_model_has():
    """INT8 and the grid always; a GGUF's own blocks only when it has them; adapter widths and merging only with an
    adapter."""
    plain = auto_candidates(gguf_blocks=False, adapter=False)
    assert [c["name"] for c in plain] == ["int8", *(c["name"] for c in GRID)]
    gguf = auto_candidates(gguf_blocks=True, adapter=False)
    assert [c["name"] for c in gguf if c.get("gguf") == "exact"] == ["exact-l1", "exact-l4"]
    tuned = auto_candidates(gguf_blocks=True, adapter=True)
    names = [c["name"] for c in tuned]
    assert {"exact-l1-branch8", "exact-l1-branch32", "exact-l4-branch8", "int4-b32-sym-merged"} <= set(names)
    assert len(set(names)) == len(names) and not any(n.endswith("-merged") for n in
                                                     (c["name"] for c in plain + gguf))
    for cand in tuned:
        candidate_conversion(Conversion(precision="int4"), cand)  # every one a valid layout
    by = {c["name"]: c for c in tuned}
    assert describe(by["exact-l1-branch8"]) == "GGUF blocks exact, L1, branch 8-bit"
    assert describe(by["int4-b32-asym-merged"]) == "int4 b32 asym, merged"
    assert describe(by["int8"]) == "int8"


def test_auto_chooses_the_smallest_that_qualifies_then_the_fastest_near_its_size():
    rows = [row("big-fast", 10, 300, ratio=0.30),
            row("small-slow", 40, 80, ratio=0.20),
            row("small-quick", 20, 150, ratio=0.205),  # within 5 % of the smallest: as small
            row("tiny-lossy", 5, 400, ratio=0.10, fidelity={**GOOD, "top1": 0.5})]
    winner = judge(rows, fp32_accuracy=1.0, threshold=0.98, spec=FidelitySpec(), max_size_ratio=None, policy=SMALLEST)
    assert winner.name == "small-quick"
    assert [r.name for r in SMALLEST.finalists(rows)] == ["small-slow", "small-quick"]
    assert judge(rows[:2], 1.0, 0.98, FidelitySpec(), None, SMALLEST).name == "small-slow"
    assert judge(rows[3:], 1.0, 0.98, FidelitySpec(), None, SMALLEST) is None
