"""Inspect a Hugging Face model folder before converting it: config, weights, tokenizer, chat template."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.core.errors import ModelSourceError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    config: dict[str, Any]
    chat_template: str | None
    weight_files: tuple[Path, ...]

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]


def read_chat_template(folder: Path) -> str | None:
    """The chat template the Foundry Local runtime applies: ``tokenizer_config.json`` ``chat_template``, else
    ``chat_template.jinja``. transformers 5 reads them the other way round (the file first), so when a folder has
    both and they differ, the model would be prompted differently in PyTorch (fine-tuning, evaluation, our
    verification) and in Foundry Local: that is a :class:`ModelSourceError`, not a silent choice."""
    config_file = folder / "tokenizer_config.json"
    inline = None
    if config_file.is_file():
        inline = _read_json(config_file).get("chat_template")
        if isinstance(inline, list):  # named templates: [{"name": "default", "template": ...}, ...]
            inline = next((t.get("template") for t in inline if t.get("name") == "default"), None)
    jinja_file = folder / CHAT_TEMPLATE_FILE
    from_file = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
    if inline and from_file is not None and _one_newline_off(inline) != _one_newline_off(from_file):
        raise ModelSourceError(
            f"{folder}: the tokenizer has two different chat templates, 'chat_template' in tokenizer_config.json and "
            "chat_template.jinja. Foundry Local applies tokenizer_config.json's; transformers 5 (fine-tuning and "
            "evaluation in PyTorch, and the ONNX conversion) applies chat_template.jinja, so the deployed model would "
            "not be prompted the way it was trained and tested. Keep the template the model was fine-tuned with: "
            "delete chat_template.jinja, or remove the 'chat_template' key from tokenizer_config.json "
            "(tokenizer.save_pretrained(folder) with transformers 5 writes only chat_template.jinja).")
    return inline or from_file


def _one_newline_off(template: str) -> str:
    """Jinja drops a single trailing newline of a template, so ``x`` and ``x\n`` render the same."""
    return template[:-1] if template.endswith("\n") else template


def inspect_model_folder(folder: Path) -> ModelFolder:
    """Check that ``folder`` holds a complete Hugging Face causal LM; raise :class:`ModelSourceError` if not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelSourceError(f"Model folder {folder} does not exist. Pass a Hugging Face model folder "
                               "(as written by model.save_pretrained) with --model-path or in the recipe.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{folder} has no config.json, so it is not a Hugging Face model folder. Save the "
                               "fine-tuned model with model.save_pretrained(folder) (for a LoRA adapter, merge it "
                               "into its base model first).")
    config = _read_json(config_file)
    weights = tuple(sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)))
    if not weights:
        raise ModelSourceError(f"{folder} has no weights (looked for {', '.join(WEIGHT_PATTERNS)}). "
                               "Save them with model.save_pretrained(folder).")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(f"{folder} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}). Copy the "
                               "tokenizer of the model you fine-tuned into it: tokenizer.save_pretrained(folder).")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # read by the builder and the runtime much later
        if (folder / name).is_file():
            _read_json(folder / name, f"Replace it with the tokenizer's own file: tokenizer.save_pretrained({folder}).")
    for key in ("eos_token_id", "bos_token_id"):
        if config.get(key, 0) is None:
            raise ModelSourceError(f"{config_file}: {key} is null; ONNX Runtime GenAI refuses to load such a model. "
                                   f"Set {key} to the id of the tokenizer's {key[:3]} token.")
    return ModelFolder(folder, config, read_chat_template(folder), weights)


def _read_json(path: Path, fix: str = "") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
                               + (f" {fix}" if fix else "")) from None
    except UnicodeDecodeError as exc:
        raise ModelSourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})." + (f" {fix}" if fix else
                                                                                               "")) from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object." + (f" {fix}" if fix else ""))
    return data


def control_tokens(model_dir: Path) -> list[str]:
    """The tokenizer's special added tokens (``<|im_end|>``, …), from ``tokenizer.json``."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    doc = _read_json(path)
    return [t["content"] for t in doc.get("added_tokens", []) if isinstance(t, dict) and t.get("special")
            and isinstance(t.get("content"), str)]
