"""Tests for scripts/commands/auto.py: ``--precision auto`` hands the layouts the model has to the search and deploys
its choice's whole layout (or FP32 when none qualifies). The search itself (builds, Foundry Local, fidelity) is
`invoke tune`'s, exercised by `invoke deploy --precision auto` on a real model (docs/quantization.md); here it is
replaced by a stand-in that records what it was asked."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from scripts.commands import auto
from scripts.recipe.load import parse_recipe


@pytest.fixture
def searched(tmp_path, monkeypatch):
    """A fine-tuning recipe on a float source at ``precision: auto``; the search answers with ``winner``."""
    (tmp_path / "hf").mkdir()
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    doc = {"model": {"source": "hf", "family": "chatml", "finetune": {"dataset": "qa.jsonl"}},
           "conversion": {"precision": "auto", "kv_cache": "int8", "quantization": {"accuracy_level": 1}},
           "foundry": {"name": "t"}, "eval": {"dataset": "qa.jsonl"}}
    recipe = parse_recipe(doc, tmp_path / "r.json")
    asked: dict = {}

    def search(winner):
        def run_tune(recipe_, candidates, max_size_ratio, announce, status, policy):
            asked.update(candidates=candidates, max_size_ratio=max_size_ratio, policy=policy)
            rows = [{"name": c["name"], "bytes": 1e6 * (i + 1), "status": "ok", "qualifies": c["name"] == winner,
                     "misses": [] if c["name"] == winner else ["top-1 agreement 71.0 % < 90 %"],
                     "eval_accuracy": 0.95, "fidelity": {"top1": 0.71, "kld_mean": 0.4}, "decode_tps": 50.0}
                    for i, c in enumerate(candidates)]
            return {"winner": winner, "rows": rows, "files": {"md": "proof/auto.md"}}
        monkeypatch.setattr(auto, "run_tune", run_tune)
        lines: list[str] = []
        return auto.resolve_auto(recipe, lines.append), lines

    monkeypatch.setattr(auto, "prepare_model", lambda *a: SimpleNamespace(base_dir=tmp_path / "hf",
                                                                          adapter_dir=tmp_path / "adapter"))
    return recipe, search, asked


def test_auto_deploys_the_whole_layout_it_chose(searched):
    recipe, search, asked = searched
    chosen, lines = search("int4-b32-asym-merged")
    names = [c["name"] for c in asked["candidates"]]
    assert "int4-b32-asym-merged" in names and not any(n.startswith("exact") for n in names)  # not a GGUF source
    assert asked["policy"] is auto.SMALLEST and asked["max_size_ratio"] is None
    c = chosen.conversion
    assert (c.precision, c.adapter, c.quantization.symmetric, c.quantization.block_size) == ("int4", "merge", False, 32)
    assert c.quantization.accuracy_level == 4  # the layout's, not the recipe's level 1
    assert c.kv_cache == "int8" and c.fidelity == recipe.conversion.fidelity  # the recipe's own keys stay
    assert any("--precision auto chose int4-b32-asym-merged (int4 b32 asym, merged)" in line for line in lines)
    assert any(line.strip().startswith("int8: 1.0 MB, eval 95.0 %, top-1 71.0 %, KLD 0.4000, 50 tok/s — top-1 "
                                       "agreement 71.0 % < 90 %") for line in lines)
    assert any(line.strip().startswith("int4-b32-asym-merged:") and line.endswith("— chosen") for line in lines)


def test_auto_falls_back_to_fp32_and_says_so(searched):
    recipe, search, _ = searched
    chosen, lines = search(None)
    assert chosen.conversion.precision == "fp32"
    assert any("no layout keeps the eval accuracy and fidelity thresholds (proof/auto.md): deploying FP32" in line
               for line in lines)


def test_a_recipe_that_is_not_auto_is_not_searched(searched, monkeypatch):
    recipe, _, _ = searched
    from dataclasses import replace
    fixed = replace(recipe, conversion=replace(recipe.conversion, precision="int8"))
    monkeypatch.setattr(auto, "prepare_model", lambda *a: pytest.fail("searched a fixed precision"))
    assert auto.resolve_auto(fixed) is fixed
