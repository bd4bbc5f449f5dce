"""Tests for scripts/families/registry.py: the family registry in templates/families and detection from config.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.families import registry as families
from scripts.core.errors import TemplateError
from scripts.families.registry import (TEMPLATE_SUFFIX, confirm_template, detect_family, family_names, get_family,
                              registry)

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                   " + '<|im_end|>' + '\n'}}{% endfor %}")
OTHER_TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"


def family_doc(**changes) -> dict:
    doc = {"description": "test family", "architectures": ["FooForCausalLM"], "model_types": ["foo"],
           "template_markers": ["<foo>"], "stop_tokens": ["</foo>"]}
    doc.update(changes)
    return doc


def add_family(folder: Path, name: str, doc: dict, template: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(doc), encoding="utf-8")
    if template:
        (folder / f"{name}{TEMPLATE_SUFFIX}").write_text("{}", encoding="utf-8")


def test_registry_loads_chatml():
    assert "chatml" in family_names()
    chatml = get_family("chatml")
    assert chatml.architectures == ("Qwen2ForCausalLM",)
    assert chatml.model_types == ("qwen2",)
    assert chatml.template_markers == ("<|im_start|>", "<|im_end|>")
    assert "<|im_end|>" in chatml.stop_tokens
    assert chatml.template_name == "families/chatml.inference_model.json.j2"
    assert (families.FAMILIES_DIR / "chatml.inference_model.json.j2").is_file()


def test_get_unknown_family_lists_known():
    with pytest.raises(TemplateError) as info:
        get_family("no-such-family")
    message = str(info.value)
    assert message.startswith("Unknown family 'no-such-family'; known families: ")
    assert all(name in message for name in family_names())


def test_detect_by_architecture():
    found = detect_family({"architectures": ["Qwen2ForCausalLM"], "model_type": "something-else"}, CHATML_TEMPLATE,
                          "model/")
    assert found.name == "chatml"


def test_detect_by_model_type():
    found = detect_family({"model_type": "qwen2"}, CHATML_TEMPLATE, "model/")
    assert found.name == "chatml"


def test_detect_unknown_architecture_lists_known_families():
    with pytest.raises(TemplateError) as info:
        detect_family({"architectures": ["FooBarForCausalLM"], "model_type": "foobar"}, OTHER_TEMPLATE, "/m")
    message = str(info.value)
    assert message.startswith("/m: no registered family covers architectures=['FooBarForCausalLM'] "
                              "model_type='foobar'")
    assert "Known families: " in message
    assert "chatml (Qwen2ForCausalLM" in message
    assert all(f"{name} (" in message for name in family_names())
    assert "Set model.family" in message


def test_detect_refuses_template_without_markers():
    with pytest.raises(TemplateError) as info:
        detect_family({"architectures": ["Qwen2ForCausalLM"]}, OTHER_TEMPLATE, "/m")
    message = str(info.value)
    assert message.startswith("/m: ")
    assert "chatml" in message and "['<|im_start|>', '<|im_end|>']" in message


@pytest.fixture
def custom_registry(tmp_path, monkeypatch):
    """Point detection at a family folder under tmp_path; returns the folder to fill."""
    folder = tmp_path / "fams"
    real_registry = families.registry
    monkeypatch.setattr(families, "registry", lambda folder_=None: real_registry(folder))
    return folder


def test_detect_in_custom_registry_by_arch_then_model_type(custom_registry):
    add_family(custom_registry, "foo", family_doc())
    add_family(custom_registry, "bar", family_doc(architectures=["BarLM"], model_types=["bar"], template_markers=[]))
    assert detect_family({"architectures": ["BarLM"], "model_type": "foo"}, "", "/m").name == "bar"
    assert detect_family({"architectures": ["Unknown"], "model_type": "foo"}, "<foo>", "/m").name == "foo"
    with pytest.raises(TemplateError, match=r"family 'foo' expects \['<foo>'\]"):
        detect_family({"architectures": ["FooForCausalLM"]}, "no markers here", "/m")


def test_shared_architecture_is_told_apart_by_markers(custom_registry):
    add_family(custom_registry, "plain", family_doc(template_markers=["<foo>"]))
    add_family(custom_registry, "richer", family_doc(template_markers=["<foo>", "<sep>"]))
    config = {"architectures": ["FooForCausalLM"]}
    assert detect_family(config, "<foo> only", "/m").name == "plain"
    assert detect_family(config, "<foo> and <sep>", "/m").name == "richer"  # most markers present wins
    with pytest.raises(TemplateError, match=r"used by families plain, richer.*markers of none of them"):
        detect_family(config, "nothing", "/m")


def test_confirm_template_missing_chat_template():
    with pytest.raises(TemplateError, match=r"/m: the tokenizer has no chat template"):
        confirm_template(get_family("chatml"), None, "/m")


def test_confirm_template_reports_only_missing_markers():
    with pytest.raises(TemplateError) as info:
        confirm_template(get_family("chatml"), "<|im_start|> only", "/m")
    assert "['<|im_end|>']" in str(info.value)
    confirm_template(get_family("chatml"), CHATML_TEMPLATE, "/m")  # complete: no error


def test_registry_of_custom_folder(tmp_path):
    folder = tmp_path / "fams"
    add_family(folder, "foo", family_doc())
    add_family(folder, "bar", family_doc(architectures=["BarLM"], model_types=["bar"], template_markers=[]))
    found = registry(folder)
    assert sorted(found) == ["bar", "foo"]
    assert found["foo"].stop_tokens == ("</foo>",)
    assert found["bar"].template_markers == ()


def test_registry_refuses_duplicate_architecture_claim(tmp_path):
    folder = tmp_path / "fams"
    add_family(folder, "alpha", family_doc())
    add_family(folder, "beta", family_doc(model_types=["beta"]))  # claims FooForCausalLM again
    with pytest.raises(TemplateError) as info:
        registry(folder)
    message = str(info.value)
    assert "beta.json" in message
    assert "'FooForCausalLM' is already claimed by family 'alpha'" in message


def test_registry_refuses_duplicate_model_type_claim(tmp_path):
    folder = tmp_path / "fams"
    add_family(folder, "alpha", family_doc())
    add_family(folder, "beta", family_doc(architectures=["BetaLM"]))
    with pytest.raises(TemplateError, match=r"'foo' is already claimed by family 'alpha'"):
        registry(folder)


def test_registry_refuses_family_without_template(tmp_path):
    folder = tmp_path / "fams"
    add_family(folder, "foo", family_doc(), template=False)
    with pytest.raises(TemplateError) as info:
        registry(folder)
    assert f"family 'foo' has no template foo{TEMPLATE_SUFFIX} beside it" in str(info.value)


def test_registry_refuses_invalid_family_file(tmp_path):
    folder = tmp_path / "fams"
    add_family(folder, "foo", {"description": "x", "architectures": "FooLM", "modeltypes": []})
    with pytest.raises(TemplateError) as info:
        registry(folder)
    message = str(info.value)
    assert "foo.json" in message
    assert "architectures: expected a list" in message
    assert "model_types: missing required key" in message
    assert "modeltypes: unknown key" in message


def test_registry_refuses_malformed_json_with_template_error(tmp_path):
    folder = tmp_path / "fams"
    folder.mkdir()
    (folder / "foo.json").write_text('{"description": "x",}', encoding="utf-8")
    (folder / f"foo{TEMPLATE_SUFFIX}").write_text("{}", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"foo\.json: not valid JSON at line 1"):
        registry(folder)


def test_invoke_families_rows_and_notes():
    """`invoke families`: one row per registered family (Gemma 3 converts: scripts/convert/builder_compat.py)."""
    from scripts.families.select import family_notes, family_rows

    rows = {row["family"]: row for row in family_rows()}
    assert list(rows) == list(family_names())
    assert rows["gemma"]["architectures"].splitlines() == ["Gemma2ForCausalLM", "GemmaForCausalLM",
                                                           "Gemma3ForCausalLM"]
    assert rows["mistral"]["system message"] == "unsupported"
    notes = "\n".join(family_notes())
    assert "--family auto-template" in notes and "--model-path DIR" in notes


def test_an_unconvertible_architecture_is_marked_and_explained(custom_registry):
    from scripts.families.select import family_notes, family_rows
    add_family(custom_registry, "foo", family_doc(architectures=["FooForCausalLM", "Foo2ForCausalLM"],
                                                  unconvertible={"Foo2ForCausalLM": "the builder lacks Foo2"}))
    rows = {row["family"]: row for row in family_rows()}
    assert rows["foo"]["architectures"].splitlines() == ["FooForCausalLM", "Foo2ForCausalLM ✗"]
    assert "✗ Foo2ForCausalLM: not convertible: the builder lacks Foo2" in "\n".join(family_notes())
    assert families.unconvertible_reason("Foo2ForCausalLM") == "the builder lacks Foo2"
    assert families.unconvertible_reason("FooForCausalLM") is None


# ----- what can be deployed at all (checked before Olive runs) ------------------------------------------------------
def test_builder_architectures_are_read_from_the_pinned_builder():
    convertible = families.builder_architectures()
    assert {"Qwen2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM"} <= set(convertible)
    assert "FooForCausalLM" not in convertible


def test_unsupported_architecture_names_it_the_families_and_what_the_builder_builds():
    problem = families.unsupported_architecture({"architectures": ["FooForCausalLM"], "model_type": "foo"})
    assert problem.startswith("architecture 'FooForCausalLM' (config.json architectures[0], model_type 'foo') is not "
                              "supported: no registered family covers it (families: chatml (Qwen2ForCausalLM);")
    assert "llama3 (LlamaForCausalLM)" in problem
    assert "cannot build it (it builds ChatGLMForConditionalGeneration" in problem
    assert "Nothing was converted" in problem


@pytest.mark.parametrize("config", [{"architectures": ["Qwen2ForCausalLM"]},      # a family's
                                    {"architectures": ["SmolLM3ForCausalLM"]}])   # builder only: auto-template
def test_supported_architectures_pass(config):
    assert families.unsupported_architecture(config) is None


def test_a_config_without_architectures_is_refused():
    assert "config.json names no architecture" in families.unsupported_architecture({"model_type": "qwen2"})
