"""Published chat templates of real models (tests/families/published/) read as turns by
scripts/families/templates.py: the PromptTemplate we derive is well formed (every field starts at a role boundary),
carries a default system prompt where the template injects one, renders exactly what the template renders, and is
stored as a golden file (tests/golden/published/). Detection picks the family from the architecture and markers.

Regenerate after an intended change: ``SLMOPS_UPDATE_GOLDEN=1 pytest tests/families/test_published.py``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.convert.package import render_inference_model
from scripts.families.registry import detect_family, get_family
from scripts.families.templates import (SAMPLE_SYSTEM, SAMPLE_USER, analyse_chat_template, render_chat_template,
                                        render_prompt_template)
from scripts.recipe.load import parse_recipe

PUBLISHED = Path(__file__).parent / "published"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "published"
UPDATE = os.environ.get("SLMOPS_UPDATE_GOLDEN") == "1"

#: model → (architecture, bos token, eos token, family detected, role-start marker, default system prompt text)
MODELS = {
    "SmolLM2-135M-Instruct": ("LlamaForCausalLM", "<|im_start|>", "<|im_end|>", "chatml", "<|im_start|>",
                              "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "Qwen2.5-0.5B-Instruct": ("Qwen2ForCausalLM", None, "<|im_end|>", "chatml", "<|im_start|>",
                              "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "Llama-3.2-1B-Instruct": ("LlamaForCausalLM", "<|begin_of_text|>", "<|eot_id|>", "llama3", "<|start_header_id|>",
                              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"),
    "Phi-3.5-mini-instruct": ("Phi3ForCausalLM", "<s>", "<|endoftext|>", "phi-3", "<|", None),
    "Phi-4-mini-instruct": ("Phi3ForCausalLM", "<|endoftext|>", "<|endoftext|>", "phi-4-mini", "<|", None),
}
CONVERSATIONS = {"user only": [{"role": "user", "content": SAMPLE_USER}],
                 "system + user": [{"role": "system", "content": SAMPLE_SYSTEM}, {"role": "user", "content": SAMPLE_USER}]}


def analysis_of(model: str):
    template = (PUBLISHED / f"{model}.jinja").read_text(encoding="utf-8")
    _arch, bos, eos, *_ = MODELS[model]

    def render(messages, add_generation_prompt):
        return render_chat_template(template, messages, bos or "", eos or "", add_generation_prompt)
    return template, render, analyse_chat_template(render, bos, eos, model)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_prompt_template_is_well_formed_and_renders_what_the_template_renders(model):
    _template, render, analysis = analysis_of(model)
    _arch, _bos, _eos, _family, role_start, default = MODELS[model]
    for key, text in analysis.prompt_template.items():
        assert text.startswith(role_start), f"{key} does not start at a role boundary: {text!r}"
        assert text.count("{Content}") == 1, key
    assert analysis.system_role == "native"
    if default:
        assert default in analysis.default_system and analysis.prompt_template["prompt"].startswith(
            analysis.default_system)
    else:
        assert analysis.default_system == ""
    for case, messages in CONVERSATIONS.items():
        ours = render_prompt_template(analysis.prompt_template, messages, analysis.bos_token or "",
                                      analysis.default_system)
        assert ours == render(messages, True), case


@pytest.mark.parametrize("model", sorted(MODELS))
def test_golden_prompt_template(model):
    _template, _render, analysis = analysis_of(model)
    text = json.dumps({"PromptTemplate": analysis.prompt_template, "bos_token": analysis.bos_token,
                       "default_system": analysis.default_system, "system_role": analysis.system_role},
                      indent=2, ensure_ascii=False) + "\n"
    path = GOLDEN / f"{model}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"missing golden file {path}; run with SLMOPS_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_detection_from_architecture_and_markers(model):
    template, render, analysis = analysis_of(model)
    architecture, _bos, _eos, family, *_ = MODELS[model]
    assert detect_family({"architectures": [architecture]}, template, model).name == family
    if not analysis.default_system:  # the family's own PromptTemplate is what is installed: it must agree
        fam = get_family(family)
        recipe = parse_recipe({"model": {"source": "demo"}, "foundry": {"name": "x"}}, Path("/tmp/r.json"))
        static = render_inference_model(fam, recipe)["PromptTemplate"]
        for case, messages in CONVERSATIONS.items():
            assert render_prompt_template(static, messages, fam.bos_token or "") == render(messages, True), case


def test_the_old_derivation_bug_is_gone():
    """SmolLM2's bos token is <|im_start|>, which also opens every turn: it is not a start-of-conversation token,
    and ``prompt`` keeps it (it used to be cut off: "prompt": "system\\nYou are …")."""
    _template, _render, analysis = analysis_of("SmolLM2-135M-Instruct")
    assert analysis.bos_token is None
    assert analysis.prompt_template["prompt"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n")
    assert analysis.prompt_template["system"] == "<|im_start|>system\n{Content}<|im_end|>\n"
