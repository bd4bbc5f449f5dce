"""LoRA (PEFT) adapters as input: check an adapter folder against its base model and merge it into a full
Hugging Face folder (``merge_and_unload``) that the converter takes like any other model.

Runs in a worker process (:func:`merge_job` through :mod:`scripts.core.workers`) so the pipeline process never imports torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from scripts.core.errors import ModelSourceError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Tokenizer files, copied as one set: from the adapter folder when it has a tokenizer of its own (a fine-tune may add
#: tokens or a chat template), else from the base. Never mixed: a base chat_template.jinja beside the adapter's
#: tokenizer_config.json template would be two templates that may differ.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def check_adapter(adapter_dir: Path, base_config: dict[str, Any]) -> dict[str, Any]:
    """Read ``adapter_config.json``; raise :class:`ModelSourceError` when the folder is not a LoRA adapter."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelSourceError(f"{adapter_dir} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder. Save the "
                               "adapter with peft_model.save_pretrained(folder), or set model.source to a full model "
                               "folder and drop model.adapter.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{config_file}: not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    if config.get("peft_type") != "LORA":
        raise ModelSourceError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be "
                               "merged before conversion.")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelSourceError(f"{adapter_dir} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
    return config


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Load the base, apply the adapter, ``merge_and_unload`` and save a full model folder in ``out_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    adapter_config = check_adapter(adapter_dir, base_config)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch, missing target modules
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"The adapter {adapter_dir} does not fit the base model {base_dir} "
            f"(adapter trained on {adapter_config.get('base_model_name_or_path')!r}): {first[:500]}. "
            "Set model.source to the base model the adapter was trained on.") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tokenizer_dir = adapter_dir if any((adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                                              "vocab.json")) else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    if (base_dir / "generation_config.json").is_file() and not (out_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    return {"rank": adapter_config.get("r"), "target_modules": adapter_config.get("target_modules"),
            "base": adapter_config.get("base_model_name_or_path")}


def merge_job(request: dict) -> dict[str, Any]:
    """Worker entry (:mod:`scripts.core.workers`): :func:`merge_adapter` on a JSON request."""
    return merge_adapter(Path(request["base_dir"]), Path(request["adapter_dir"]), Path(request["out_dir"]))
