"""Tests for scripts/convert/package.py: inference_model.json rendering and genai_config search settings."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scripts.core import settings
from scripts.core.errors import TemplateError
from scripts.families.registry import Family, get_family
from scripts.convert.package import (PROMPT_KEYS, render_inference_model, search_options, with_search,
                                     with_session_options)
from scripts.families.templates import PLACEHOLDER
from scripts.recipe.load import load_recipe
from scripts.recipe.spec import Generation

@pytest.fixture(scope="module")
def qwen_recipe():
    return load_recipe(str(settings.REPO_ROOT / "recipes" / "qwen.json"))


@pytest.fixture
def chatml() -> Family:
    return get_family("chatml")


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
    assert out["model"] == {"context_length": 256, "type": "qwen2"}, "max_length below the context lowers it"
    assert genai["search"]["max_length"] == 512 and genai["model"]["context_length"] == 512, \
        "the input must not be modified"


def test_with_search_keeps_the_context_when_max_length_fills_it():
    genai = {"model": {"context_length": 256, "type": "qwen2"}, "search": {}}
    assert with_search(genai, GEN)["model"] == genai["model"]
    assert with_search({"search": {}}, GEN)["search"]["max_length"] == 256  # no context known: search only


def test_with_search_refuses_max_length_beyond_context():
    with pytest.raises(TemplateError, match=r"generation.max_length 1024 exceeds the model's context length 512"):
        with_search({"model": {"context_length": 512}}, replace(GEN, max_length=1024))


def test_search_options_without_known_context_length():
    assert search_options(replace(GEN, max_length=4096), None)["max_length"] == 4096


# ----- genai_config.json session options (recipe runtime block) ---------------------------------------------
def test_session_options_land_under_the_decoder():
    config = {"model": {"type": "qwen2", "decoder": {"filename": "model.onnx",
                                                     "session_options": {"log_id": "x", "provider_options": []}}},
              "search": {"max_length": 64}}
    out = with_session_options(config, {"intra_op_num_threads": 2})
    assert out["model"]["decoder"]["session_options"] == {"log_id": "x", "provider_options": [],
                                                          "intra_op_num_threads": 2}
    assert out["model"]["decoder"]["filename"] == "model.onnx" and out["search"] == {"max_length": 64}
    assert "intra_op_num_threads" not in config["model"]["decoder"]["session_options"], "the input is not changed"


def test_session_options_without_any_before():
    out = with_session_options({"model": {"decoder": {}}}, {"intra_op_num_threads": 4})
    assert out["model"]["decoder"]["session_options"] == {"intra_op_num_threads": 4}
