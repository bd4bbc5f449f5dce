"""Tests for scripts/core/hf_folder.py: what a deployable Hugging Face folder must contain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.core.errors import ModelSourceError
from scripts.core.hf_folder import inspect_model_folder, read_chat_template

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 0, "eos_token_id": 2}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"


def make_folder(root: Path, *, config=CONFIG, weights="model.safetensors", tokenizer="tokenizer.json",
                tokenizer_config: dict | None = None) -> Path:
    folder = root / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (folder / weights).write_bytes(b"\0" * 16)
    if tokenizer:
        (folder / tokenizer).write_text("{}")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_complete_folder(tmp_path):
    folder = make_folder(tmp_path, tokenizer_config={"chat_template": TEMPLATE})
    (folder / "model-00002.safetensors").write_bytes(b"x")
    info = inspect_model_folder(folder)
    assert info.path == folder
    assert info.config == CONFIG
    assert info.architecture == "Qwen2ForCausalLM"
    assert info.chat_template == TEMPLATE
    assert [p.name for p in info.weight_files] == ["model-00002.safetensors", "model.safetensors"]


def test_pytorch_bin_weights_and_sentencepiece_tokenizer_are_accepted(tmp_path):
    folder = make_folder(tmp_path, weights="pytorch_model.bin", tokenizer="tokenizer.model")
    info = inspect_model_folder(folder)
    assert [p.name for p in info.weight_files] == ["pytorch_model.bin"]
    assert info.chat_template is None


def test_architecture_unknown_when_config_has_none(tmp_path):
    folder = make_folder(tmp_path, config={"model_type": "qwen2"})
    assert inspect_model_folder(folder).architecture == "?"


def test_missing_folder(tmp_path):
    with pytest.raises(ModelSourceError, match=r"Model folder .*nowhere does not exist.*--model-path"):
        inspect_model_folder(tmp_path / "nowhere")


def test_no_config(tmp_path):
    folder = make_folder(tmp_path, config=None)
    with pytest.raises(ModelSourceError) as info:
        inspect_model_folder(folder)
    message = str(info.value)
    assert f"{folder} has no config.json" in message
    assert "save_pretrained" in message and "LoRA" in message


def test_invalid_config_json(tmp_path):
    folder = make_folder(tmp_path, config='{"model_type": ')
    with pytest.raises(ModelSourceError, match=r"config\.json: not valid JSON \(line 1"):
        inspect_model_folder(folder)


def test_config_not_an_object(tmp_path):
    folder = make_folder(tmp_path, config="[1, 2]")
    with pytest.raises(ModelSourceError, match=r"config\.json: expected a JSON object"):
        inspect_model_folder(folder)


def test_no_weights(tmp_path):
    folder = make_folder(tmp_path, weights=None)
    (folder / "model.ckpt").write_bytes(b"x")  # not a recognised weight file
    with pytest.raises(ModelSourceError) as info:
        inspect_model_folder(folder)
    assert f"{folder} has no weights (looked for *.safetensors, pytorch_model*.bin)" in str(info.value)


def test_no_tokenizer_names_files_looked_for(tmp_path):
    folder = make_folder(tmp_path, tokenizer=None, tokenizer_config={"chat_template": TEMPLATE})
    with pytest.raises(ModelSourceError) as info:
        inspect_model_folder(folder)
    message = str(info.value)
    assert f"{folder} has no tokenizer (looked for tokenizer.json, tokenizer.model, vocab.json)" in message
    assert "tokenizer.save_pretrained(folder)" in message


@pytest.mark.parametrize("key", ["eos_token_id", "bos_token_id"])
def test_null_special_token_id(tmp_path, key):
    folder = make_folder(tmp_path, config={**CONFIG, key: None})
    with pytest.raises(ModelSourceError) as info:
        inspect_model_folder(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'config.json'}: {key} is null")
    assert f"Set {key} to the id of the tokenizer's {key[:3]} token" in message


def test_absent_special_token_ids_are_fine(tmp_path):
    folder = make_folder(tmp_path, config={"architectures": ["Qwen2ForCausalLM"]})
    assert inspect_model_folder(folder).config == {"architectures": ["Qwen2ForCausalLM"]}


# ----- chat template lookup ------------------------------------------------------------------------------
def test_chat_template_from_jinja_file_when_config_has_none(tmp_path):
    folder = make_folder(tmp_path, tokenizer_config={"eos_token": "<|im_end|>"})
    assert read_chat_template(folder) is None
    (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    assert read_chat_template(folder) == TEMPLATE


def test_same_template_in_both_places_is_fine(tmp_path):
    folder = make_folder(tmp_path, tokenizer_config={"chat_template": TEMPLATE})
    (folder / "chat_template.jinja").write_text(TEMPLATE + "\n", encoding="utf-8")  # Jinja drops one trailing newline
    assert read_chat_template(folder) == TEMPLATE


def test_two_different_templates_are_refused(tmp_path):
    """Foundry Local applies tokenizer_config.json's template, transformers 5 chat_template.jinja: never guess."""
    folder = make_folder(tmp_path, tokenizer_config={"chat_template": TEMPLATE})
    (folder / "chat_template.jinja").write_text("other", encoding="utf-8")
    with pytest.raises(ModelSourceError) as info:
        read_chat_template(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: the tokenizer has two different chat templates")
    assert "Foundry Local applies tokenizer_config.json's; transformers 5" in message
    assert "delete chat_template.jinja, or remove the 'chat_template' key from tokenizer_config.json" in message
    with pytest.raises(ModelSourceError, match="two different chat templates"):
        inspect_model_folder(folder)


def test_named_chat_templates_pick_default(tmp_path):
    folder = make_folder(tmp_path, tokenizer_config={"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]})
    assert read_chat_template(folder) == TEMPLATE
