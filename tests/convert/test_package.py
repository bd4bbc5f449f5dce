"""Tests for scripts/convert/package.py: inference_model.json rendering, genai_config search settings, and the
PromptTemplate vs tokenizer chat template agreement check (with the tiny fixture model's real tokenizer)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from scripts import settings
from scripts.errors import TemplateError
from scripts.families.registry import Family, get_family
from scripts.convert.package import (PLACEHOLDER, PROMPT_KEYS, SAMPLE_SYSTEM, SAMPLE_USER, check_template_agreement,
                                      compare_templates, fill, render_inference_model, search_options, with_search)
from scripts.recipe.load import Generation, load_recipe

# Qwen2.5's real chat template (tool branches removed): a default system prompt when none is given.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="module")
def qwen_recipe():
    return load_recipe(str(settings.REPO_ROOT / "recipes" / "qwen.json"))


@pytest.fixture
def chatml() -> Family:
    return get_family("chatml")


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


# ----- inference_model.json -----------------------------------------------------------------------------
def test_render_chatml_inference_model(chatml, qwen_recipe):
    doc = render_inference_model(chatml, qwen_recipe)
    assert doc["Name"] == qwen_recipe.foundry.name == "brightwater-qwen-int4"
    assert doc["Description"] == qwen_recipe.foundry.description
    assert doc["Version"] == "1"
    assert set(doc["PromptTemplate"]) == set(PROMPT_KEYS)
    for key in PROMPT_KEYS:
        assert PLACEHOLDER in doc["PromptTemplate"][key], key
    assert doc["PromptTemplate"]["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
    assert doc["PromptTemplate"]["system"] == "<|im_start|>system\n{Content}<|im_end|>\n"
    assert doc["ModelConfig"]["generation"]["max_length"] == qwen_recipe.generation.max_length
    assert doc["ModelConfig"]["precision"] == "int4"
    assert "recipe qwen (family chatml)" in doc["_generated"]


def test_description_falls_back_to_recipe_description(chatml, qwen_recipe):
    recipe = replace(qwen_recipe, foundry=replace(qwen_recipe.foundry, description=""))
    assert render_inference_model(chatml, recipe)["Description"] == qwen_recipe.description


def test_names_with_quotes_are_escaped_json(chatml, qwen_recipe):
    recipe = replace(qwen_recipe, description='say "hi"\n', foundry=replace(qwen_recipe.foundry, description=""))
    assert render_inference_model(chatml, recipe)["Description"] == 'say "hi"\n'


def write_family_template(tmp_path: Path, monkeypatch, body: str) -> Family:
    """A throwaway family template rendered through the real Jinja environment (templates/ + tmp)."""
    import jinja2

    from scripts.convert import package as inference_config

    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "broken.inference_model.json.j2").write_text(body, encoding="utf-8")
    env = inference_config._env.overlay(loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(settings.TEMPLATES_DIR),
                                                                    jinja2.FileSystemLoader(tmp_path)]))
    monkeypatch.setattr(inference_config, "_env", env)
    return Family("broken", "", (), (), (), ())


def test_template_missing_placeholder_is_refused(tmp_path, monkeypatch, qwen_recipe):
    family = write_family_template(tmp_path, monkeypatch, '{% extends "inference_model.base.json.j2" %}'
                                   '{% block prompt_template %}"system": "{Content}", "user": "{Content}", '
                                   '"assistant": "{Content}", "prompt": "no placeholder"{% endblock %}')
    with pytest.raises(TemplateError, match=r"problem with: \['prompt'\]"):
        render_inference_model(family, qwen_recipe)


def test_template_with_undefined_variable_is_refused(tmp_path, monkeypatch, qwen_recipe):
    family = write_family_template(tmp_path, monkeypatch, '{"Name": {{ no_such_variable | tojson }}}')
    with pytest.raises(TemplateError, match=r"'no_such_variable' is undefined"):
        render_inference_model(family, qwen_recipe)


def test_template_rendering_invalid_json_is_refused(tmp_path, monkeypatch, qwen_recipe):
    family = write_family_template(tmp_path, monkeypatch, '{"Name": {{ name }}}')  # no tojson: bare word
    with pytest.raises(TemplateError, match=r"rendered invalid JSON"):
        render_inference_model(family, qwen_recipe)


# ----- genai_config search -------------------------------------------------------------------------------
GEN = Generation(max_length=256, do_sample=True, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1)


def test_with_search_writes_generation_settings_and_keeps_the_rest():
    genai = {"model": {"context_length": 512, "type": "qwen2"},
             "search": {"max_length": 512, "num_beams": 1, "past_present_share_buffer": True}}
    out = with_search(genai, GEN)
    assert out["search"] == {"max_length": 256, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                             "repetition_penalty": 1.1, "num_beams": 1, "past_present_share_buffer": True}
    assert out["model"] == genai["model"]
    assert genai["search"]["max_length"] == 512, "the input must not be modified"


def test_with_search_refuses_max_length_beyond_context():
    with pytest.raises(TemplateError, match=r"generation.max_length 1024 exceeds the model's context length 512"):
        with_search({"model": {"context_length": 512}}, replace(GEN, max_length=1024))


def test_search_options_without_known_context_length():
    assert search_options(replace(GEN, max_length=4096), None)["max_length"] == 4096


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
