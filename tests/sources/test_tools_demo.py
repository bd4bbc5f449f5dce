"""Tests for scripts/sources/tools_demo.py: the shared-prefix training step computes the same loss as whole padded
conversations, prompts are rendered as `invoke serve` renders them, and a tiny build is a valid model folder."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from scripts.core.tool_evalset import load_lines
from scripts.families.tools import format_path, load_format, plain_messages, serving_spec
from scripts.sources import tool_training, tools_demo
from scripts.sources.demo import check_model_dir
from scripts.sources.demo_tokenizer import CHAT_TEMPLATE

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "brightwater-tools.jsonl"
TINY = replace(tools_demo.SETTINGS, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
               intermediate_size=64, steps=3, warmup_steps=1, batch_size=4, max_new_tokens=4)


def test_shared_prefix_stops_before_anything_learnt_and_leaves_each_example_a_token():
    examples = [([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5]), ([1, 2, 3, 9], [-100, -100, -100, 9])]
    assert tool_training.shared_prefix(examples) == 3
    assert tool_training.shared_prefix([([1, 2, 3], [-100, 2, 3]), ([1, 2, 4], [-100, 2, 4])]) == 1
    assert tool_training.shared_prefix([([1, 2], [-100, -100]), ([1, 2, 3], [-100, -100, 3])]) == 1


def test_training_prompts_are_what_serve_writes():
    """The builder's prompts (ChatML without a default system prompt, tools per chatml.tools.json) are the plain
    messages the server makes from an OpenAI request for this model's template."""
    spec = serving_spec(CHAT_TEMPLATE)
    assert spec["family"] == "chatml" and spec["default_system"] == ""
    fmt = load_format(format_path("chatml"), "chatml")
    line = load_lines(DATA, "heldout")[0]
    assert plain_messages(line["messages"], line["tools"], fmt, "") == \
        plain_messages(line["messages"], line["tools"], fmt, spec["default_system"])


def test_shared_prefix_loss_equals_whole_conversation_loss():
    """One step's loss with the prefix run once and its cache repeated equals the loss of the padded whole
    conversations (the model's own loss), so the shortcut changes cost, not what is learnt."""
    import torch
    from transformers import Qwen2ForCausalLM

    from scripts.sources.demo_training import make_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(make_config(TINY, 50, 0, 1, 0))
    prefix = [5, 6, 7, 8, 9, 10]
    examples = [(prefix + [11, 12, 13, 1], [-100] * 6 + [-100, 12, 13, 1]),
                (prefix + [14, 15, 1], [-100] * 6 + [-100, 15, 1])]
    with torch.no_grad():
        width = max(len(i) for i, _ in examples)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in examples])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
        whole = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    # one step: the returned loss is computed before the update
    shared = tool_training.train_shared_prefix(model, examples, 6, 0, replace(TINY, steps=1, batch_size=2), False)
    assert shared == pytest.approx(whole, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tools_demo")
    lines = load_lines(DATA)
    subset = [x for x in lines if x["split"] == "train"][:12] + [x for x in lines if x["split"] == "heldout"][:3]
    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in subset), encoding="utf-8")
    return data, tools_demo.build_tools_model(data, root / "hf", TINY, progress=False, short_steps=2)


def test_tiny_build_is_a_model_folder_with_its_scores(tiny_build):
    data, result = tiny_build
    out = data.parent / "hf"
    cfg = check_model_dir(out)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["max_position_embeddings"] == 1024
    assert result["shared_prefix_tokens"] > 100 and result["short_steps"] == 2  # the tool preamble; phase 1
    assert result["heldout_calls"] == 3 and 0.0 <= result["heldout_call_exact"] <= 1.0
    saved = json.loads((out / tools_demo.PROVENANCE_FILE).read_text())
    assert saved["dataset_sha256"] == result["dataset_sha256"] and saved["conversations"] == 12


def test_build_entry_reports_for_the_pipeline(tiny_build, monkeypatch, tmp_path):
    data, _ = tiny_build
    import functools
    monkeypatch.setattr(tools_demo, "SETTINGS", TINY)
    monkeypatch.setattr(tools_demo, "build_tools_model", functools.partial(tools_demo.build_tools_model, short_steps=2))
    out = tools_demo.build({"inputs": [str(data)], "out_dir": str(tmp_path / "hf")})
    assert "held-out in PyTorch" in out["summary"] and out["train_seconds"] > 0


def test_fresh_digits_are_copied_from_the_question_and_read_back_from_the_result():
    """redraw_digits: a membership number the user wrote and the call repeats, and a year the result holds and the
    answer reads back, are drawn afresh and changed everywhere they occur; other digits stay."""
    import random

    from scripts.sources.tool_examples import redraw_digits

    item = {"messages": [
        {"role": "user", "content": "Who is member BW-3172? (asked at 9)"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "function": {"name": "member_lookup", "arguments": '{"member_id": "BW-3172"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"member_id": "BW-3172", "since": 1999, "rank": 5}'},
        {"role": "assistant", "content": "BW-3172 is the Reyes household, members since 1999."}]}
    out = redraw_digits(item, random.Random(1), avoid={"BW-0000"})
    number = json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"])["member_id"]
    result = json.loads(out["messages"][2]["content"])
    assert number != "BW-3172" and number in out["messages"][0]["content"] and result["member_id"] == number
    assert result["since"] != 1999 and f"members since {result['since']}." in out["messages"][3]["content"]
    assert number in out["messages"][3]["content"]
    assert result["rank"] == 5 and "(asked at 9)" in out["messages"][0]["content"]  # not repeated: kept
    assert item["messages"][2]["content"].startswith('{"member_id": "BW-3172"')       # the original is untouched
