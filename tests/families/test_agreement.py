"""Tests for scripts/families/templates.py with the tiny fixture model's real tokenizer: the PromptTemplate vs
tokenizer chat template agreement check, and reading templates with a default system prompt as turns."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.core import settings
from scripts.convert.package import render_inference_model
from scripts.core.errors import TemplateError
from scripts.families.registry import get_family
from scripts.families.templates import (SAMPLE_SYSTEM, SAMPLE_USER, analyse_model_template, check_template_agreement,
                                        compare_templates, fill, with_default_system)
from scripts.recipe.load import load_recipe

# Qwen2.5's real chat template (tool branches removed): a default system prompt when none is given.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="module")
def qwen_recipe():
    return load_recipe(str(settings.REPO_ROOT / "recipes" / "qwen.json"))


@pytest.fixture(scope="module")
def chatml_prompt_template(qwen_recipe):
    return render_inference_model(get_family("chatml"), qwen_recipe)["PromptTemplate"]


def tokenizer_copy(src: Path, dst: Path, chat_template: str | None = None) -> Path:
    """Copy the fixture's tokenizer files to ``dst``; optionally replace the chat template everywhere."""
    dst.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if chat_template is not None:
        cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg["chat_template"] = chat_template
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        (dst / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return dst


def test_fill():
    assert fill("<a>{Content}</a>", "x") == "<a>x</a>"


# ----- template agreement (real tokenizer) ---------------------------------------------------------------
def test_chatml_tokenizer_agrees(tiny_hf_model, chatml_prompt_template):
    comparisons = compare_templates(chatml_prompt_template, tiny_hf_model)
    assert [c.case for c in comparisons] == ["user only", "system + user"]
    assert all(c.agrees for c in comparisons)
    assert comparisons[1].from_chat_template == (f"<|im_start|>system\n{SAMPLE_SYSTEM}<|im_end|>\n"
                                                 f"<|im_start|>user\n{SAMPLE_USER}<|im_end|>\n<|im_start|>assistant\n")
    check_template_agreement(chatml_prompt_template, tiny_hf_model, "tiny")  # no error


def test_tokenizer_with_default_system_prompt_disagrees(tiny_hf_model, chatml_prompt_template, tmp_path):
    folder = tokenizer_copy(tiny_hf_model, tmp_path / "qwen-like", QWEN_TEMPLATE)
    with pytest.raises(TemplateError) as info:
        check_template_agreement(chatml_prompt_template, folder, "my-model")
    message = str(info.value)
    assert message.startswith("my-model: inference_model.json PromptTemplate and the tokenizer's chat template")
    assert "case user only" in message
    assert "case system + user" not in message  # an explicit system prompt renders the same both ways
    assert "--- tokenizer chat template (Foundry v2)" in message
    assert "+++ PromptTemplate (Foundry v1)" in message
    assert "-<|im_start|>system" in message
    assert "You are Qwen, created by Alibaba Cloud" in message


def test_verification_renders_the_template_foundry_applies(tiny_hf_model, chatml_prompt_template, tmp_path):
    """The chat side is rendered with the template Foundry Local applies (tokenizer_config.json's, passed in by the
    package step from the converted model), not with whichever one transformers loaded."""
    comparisons = compare_templates(chatml_prompt_template, tiny_hf_model, chat_template=QWEN_TEMPLATE)
    assert not comparisons[0].agrees and "You are Qwen" in comparisons[0].from_chat_template
    folder = tokenizer_copy(tiny_hf_model, tmp_path / "inline-only")
    (folder / "chat_template.jinja").unlink()  # tokenizer_config.json's template alone: what Foundry reads
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = QWEN_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TemplateError, match="You are Qwen, created by Alibaba Cloud"):
        check_template_agreement(chatml_prompt_template, folder, "inline-only")


def test_default_system_prompt_is_carried_into_prompt_template_and_verified(tiny_hf_model, chatml_prompt_template,
                                                                            tmp_path):
    folder = tokenizer_copy(tiny_hf_model, tmp_path / "qwen-like", QWEN_TEMPLATE)
    analysis = analyse_model_template(folder)
    default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    assert analysis.default_system == default and analysis.system_role == "native"
    assert analysis.prompt_template["prompt"] == default + chatml_prompt_template["prompt"]
    carried = with_default_system(chatml_prompt_template, analysis.default_system)
    comparisons = check_template_agreement(carried, folder, "qwen-like", default_system=analysis.default_system)
    assert [c.case for c in comparisons] == ["user only", "system + user"] and all(c.agrees for c in comparisons)
    assert comparisons[0].from_chat_template.startswith(default)  # no system message: the default one, both ways
    assert default not in comparisons[1].from_prompt_template  # a given system message replaces it, both ways
