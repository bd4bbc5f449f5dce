"""Every registered family's templates, rendered for fixed conversations and compared with golden files
(``tests/golden/<family>/``), plus detection among families that share an architecture, generation precedence,
stop tokens and the ``--family`` override. No models are loaded: chat templates render with the same sandboxed
Jinja settings as ``transformers``.

Regenerate the golden files after an intended template change: ``SLMOPS_UPDATE_GOLDEN=1 pytest tests/families/test_templates.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.core.errors import RecipeError, TemplateError
from scripts.families.registry import AUTO_TEMPLATE, detect_family, family_names, get_family, registry, unconvertible_reason
from scripts.families.select import override_family, with_stop_tokens
from scripts.convert.package import render_inference_model
from scripts.families.templates import render_chat_template, render_prompt_template, sample_conversations
from scripts.recipe.load import parse_recipe
from scripts.recipe.spec import BUILTIN_GENERATION, Generation

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("SLMOPS_UPDATE_GOLDEN") == "1"
CASES = {"user only": "user_only", "system + user": "system_user"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "golden.json"
    return parse_recipe({"model": {"source": "demo"}, "foundry": {"name": "golden"}}, path)


def check_golden(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"missing golden file {path}; run with SLMOPS_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{path} differs from the rendering"


@pytest.mark.parametrize("name", family_names())
def test_family_renders_its_golden_files(name, recipe):
    family = get_family(name)
    prompt_template = render_inference_model(family, recipe)["PromptTemplate"]
    check_golden(GOLDEN / name / "prompt_template.json", json.dumps(prompt_template, indent=2, ensure_ascii=False) + "\n")
    for case, messages in sample_conversations(family).items():
        check_golden(GOLDEN / name / f"{CASES[case]}.txt", render_prompt_template(prompt_template, messages,
                                                                                   family.bos_token or ""))


@pytest.mark.parametrize("name", family_names())
def test_prompt_template_agrees_with_the_family_chat_template(name, recipe):
    """The string-level half of the deploy-time check, on the family's reference chat template."""
    family = get_family(name)
    prompt_template = render_inference_model(family, recipe)["PromptTemplate"]
    for case, messages in sample_conversations(family).items():
        chat = render_chat_template(family.reference_chat_template, messages, family.bos_token or "",
                                    family.stop_tokens[0])
        assert chat == render_prompt_template(prompt_template, messages, family.bos_token or ""), case


def test_system_message_handling_is_declared_honestly():
    system_user = sample_conversations(None)["system + user"]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render_chat_template(get_family("mistral").reference_chat_template, system_user, "<s>", "</s>")
    folded = render_chat_template(get_family("gemma").reference_chat_template, system_user, "<bos>", "<eos>")
    assert folded.startswith("<bos><start_of_turn>user\nYou are a concise") and "<start_of_turn>system" not in folded
    assert list(sample_conversations(get_family("gemma"))) == ["user only"]
    assert list(sample_conversations(get_family("llama3"))) == ["user only", "system + user"]


@pytest.mark.parametrize("name", family_names())
def test_detection_picks_each_family_from_its_config_and_template(name):
    family = get_family(name)
    for architecture in family.architectures:
        assert detect_family({"architectures": [architecture]}, family.reference_chat_template, "m").name == name


def test_shared_architecture_without_matching_markers_is_an_error():
    with pytest.raises(TemplateError) as info:
        detect_family({"architectures": ["Qwen2ForCausalLM"]}, "{{ '<|user|>' }}", "/m")
    message = str(info.value)
    assert "is used by families chatml, deepseek-r1" in message and AUTO_TEMPLATE in message


def test_unknown_architecture_names_what_was_found_and_the_families():
    with pytest.raises(TemplateError) as info:
        detect_family({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}, "x", "/m")
    message = str(info.value)
    assert "architectures=['MambaForCausalLM'] model_type='mamba'" in message
    assert all(name in message for name in family_names()) and f"--family {AUTO_TEMPLATE}" in message


def test_registry_refuses_shared_claim_with_identical_markers(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "description": name, "architectures": ["FooLM"], "model_types": [name], "template_markers": ["<x>"]}))
        (tmp_path / f"{name}.inference_model.json.j2").write_text("{}")
    with pytest.raises(TemplateError, match="template markers do not tell the two apart"):
        registry(tmp_path)


def test_no_registered_architecture_is_unconvertible_with_the_pinned_toolchain():
    assert all(unconvertible_reason(a) is None for f in registry().values() for a in f.architectures)


def test_generation_precedence_recipe_then_family_then_builtin():
    family = get_family("qwen3")
    resolved = Generation(max_length=256, temperature=0.2).resolved(family.generation_defaults)
    assert resolved.max_length == 256 and resolved.temperature == 0.2  # the recipe's own values
    assert resolved.top_k == 20 and resolved.do_sample is True  # Qwen3's published defaults
    assert resolved.repetition_penalty == BUILTIN_GENERATION["repetition_penalty"]  # nobody set it


def test_stop_tokens_join_eos_ids(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": [
        {"id": 5, "content": "<|end|>"}, {"id": 6, "content": "<|endoftext|>"}]}))
    out = with_stop_tokens({"model": {"eos_token_id": 6, "type": "phi3"}}, get_family("phi-3").stop_tokens, tokenizer)
    assert out["model"] == {"eos_token_id": [6, 5], "type": "phi3"}


def test_family_override_is_validated(recipe):
    assert override_family(recipe, "llama3").family == "llama3"
    assert override_family(recipe, None) is recipe
    with pytest.raises(RecipeError, match="--family 'llama' is not a registered family"):
        override_family(recipe, "llama")
