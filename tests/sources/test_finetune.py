"""Tests for scripts/sources/finetune.py on a tool-calling set: the LoRA fine-tune trains on the conversations as
`invoke serve` writes them for the base's own chat template, in two phases, and scores the held-out cases; a base
whose template matches no family with a tool format is refused with what to do."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.core.errors import ModelSourceError
from scripts.core.tool_evalset import is_tool_set, load_lines
from scripts.sources import finetune

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "brightwater-tools.jsonl"
SETTINGS = {"rank": 4, "alpha": 8, "epochs": 1, "lr": 2e-3, "batch_size": 4, "seed": 0, "threads": 1,
            "tool_prompt_steps": 1}


@pytest.fixture(autouse=True)
def torch_threads():
    """The trainer sets torch's thread count for its worker process; here it runs in the test's: put it back."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tool_set(tmp_path) -> Path:
    lines = load_lines(DATA)
    train = [x for x in lines if x["split"] == "train"]
    subset = ([x for x in train if x.get("kind") == "call"][:5] + [x for x in train if x.get("kind") == "text"][:2]
              + [x for x in lines if x["split"] == "heldout"][:3])
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in subset), encoding="utf-8")
    return path


def test_a_tool_set_is_told_apart_from_question_answer_pairs(tool_set, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('\n{"question": "q", "answer": "a"}\n', encoding="utf-8")
    assert is_tool_set(tool_set) and not is_tool_set(qa)


def test_tool_finetune_trains_two_phases_and_scores_the_heldout_cases(tool_set, tmp_path, tiny_hf_model):
    out = tmp_path / "adapter"
    result = finetune.train({"base_dir": str(tiny_hf_model), "dataset": str(tool_set), "settings": SETTINGS,
                             "out_dir": str(out)})
    # 5 calls + 2 no-call questions drawn NO_CALL_WEIGHT times: the first phase is one pass over them
    weighted = 5 + 2 * finetune.NO_CALL_WEIGHT
    assert result["conversations"] == weighted and result["short_steps"] == -(-weighted // 4)
    assert result["shared_prefix_tokens"] > 100  # the tool definitions, in the system turn every conversation shares
    assert result["heldout_calls"] + result["heldout_no_calls"] == 3
    assert "held-out in PyTorch: calls" in result["summary"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "slmops_finetune.json").read_text())
    assert record["settings"] == SETTINGS and "summary" not in record


def test_a_base_without_a_tool_format_is_refused(tool_set, tmp_path, tiny_hf_model):
    base = tmp_path / "base"
    shutil.copytree(tiny_hf_model, base)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (base / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (base / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ModelSourceError, match="matches no family with a tool format"):
        finetune.train({"base_dir": str(base), "dataset": str(tool_set), "settings": SETTINGS,
                        "out_dir": str(tmp_path / "adapter")})


def test_a_tool_set_without_training_lines_is_refused(tool_set, tmp_path, tiny_hf_model):
    only_heldout = tmp_path / "heldout.jsonl"
    only_heldout.write_text("".join(json.dumps(x) + "\n" for x in load_lines(tool_set, "heldout")), encoding="utf-8")
    with pytest.raises(ModelSourceError, match="no conversation to train on"):
        finetune.train({"base_dir": str(tiny_hf_model), "dataset": str(only_heldout), "settings": SETTINGS,
                        "out_dir": str(tmp_path / "adapter")})
