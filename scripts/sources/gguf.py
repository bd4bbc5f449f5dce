"""GGUF files as a model source: dequantize a ``.gguf`` (llama.cpp, Ollama, unsloth exports) into a Hugging Face
folder (config with ``architectures``, FP32 safetensors, tokenizer, chat template) that the converter takes like any
other model.

transformers (with the ``gguf`` package) reads the GGUF and dequantizes its tensors on load; a model loaded that way
refuses ``save_pretrained``, so a fresh model is built from its config and given the state dict. The architecture is
read from the header first (``general.architecture``), so a GGUF that transformers cannot load is refused before any
tensor is read, with the list of what it can load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from scripts.core.errors import ModelSourceError
from scripts.core.fileops import link_or_copy

log = logging.getLogger(__name__)

#: Keys a GGUF-loaded config carries that would make downstream tools treat the FP32 folder as quantized.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


#: The GGUF itself, kept in the folder it was dequantized into: ``conversion.gguf: "exact"`` carries its blocks into the
#: graph (:mod:`scripts.convert.gguf_exact`), and the dequantized FP32 weights beside it are exactly what that graph
#: computes (the reference, and the base a fine-tune trains on).
KEPT_GGUF = "source.gguf"

#: Storage types that are not quantized.
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
#: Quantized types whose blocks carry a float offset (w = d·q + m, or per-sub-block minimums): no integer zero point
#: reproduces their grid.
_OFFSET_TYPES = frozenset({"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"})


def _reader(path: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise ModelSourceError(f"{path} is not a readable GGUF file ({exc}). Check that the download is complete "
                               "(GGUF files start with the magic bytes 'GGUF').") from None


def read_metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Selected metadata values of a GGUF file (the header only; tensors stay on disk)."""
    reader = _reader(path)
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


def weight_types(path: Path) -> dict[str, int]:
    """Parameters per storage type (``"Q4_1"``, ``"F32"``…) over the file's matrices; vectors (norms, biases) are F32
    in every GGUF and say nothing of how the weights were quantized. Tensor data stays on disk."""
    counts: dict[str, int] = {}
    for tensor in _reader(path).tensors:
        if len(tensor.shape) >= 2:
            name = tensor.tensor_type.name
            counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    return counts


def requantization_note(types: dict[str, int] | None, merged_finetune: bool = False) -> str | None:
    """Pure: what a user should know before judging a layout that quantizes a model imported from a quantized GGUF
    again (``types``: :func:`weight_types`); None for a float GGUF or an unknown source."""
    quantized = {t: n for t, n in (types or {}).items() if t not in _FLOAT_TYPES}
    if not quantized:
        return None
    main = max(quantized, key=lambda t: quantized[t])
    share = sum(quantized.values()) / sum(types.values())
    text = (f"The source GGUF stores {share:.0%} of its weight parameters quantized (mostly {main}), so the FP32 "
            "reference is a dequantized model: a layout that re-quantizes it (conversion.gguf \"requantize\", INT8) "
            "quantizes its weights a second time, where conversion.gguf \"exact\" (INT4) carries its blocks "
            "unchanged.")
    if main in _OFFSET_TYPES:
        text += (f" {main} blocks carry a float offset (w = d·q + m); re-quantized layouts have integer zero "
                 "points (or none), so at 4 bits every weight is re-rounded onto a shifted grid, a second full "
                 "quantization error, while an 8-bit grid is 16× finer. (MatMulNBits' float zero points would "
                 "reproduce the grid, but ONNX Runtime's CPU kernel dequantizes the whole matrix on every call with "
                 "them; the exact route adds the offsets beside the integer kernel instead.)")
    if merged_finetune:
        text += (" Where a fine-tune is merged onto these weights (conversion.adapter \"merge\") and moved a weight "
                 "by less than half a 4-bit step, a 4-bit layout rounds the change away, and fidelity to the merged "
                 "FP32 model counts that as error.")
    return text


def loadable_architectures() -> list[str]:
    """GGUF ``general.architecture`` values the pinned transformers can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def check_architecture(path: Path) -> str:
    """The file's architecture; :class:`ModelSourceError` when transformers cannot load it."""
    arch = read_metadata(path, ("general.architecture",)).get("general.architecture")
    supported = loadable_architectures()
    if arch not in supported:
        raise ModelSourceError(
            f"{path}: GGUF architecture {arch!r} cannot be read by the pinned transformers, so it cannot be "
            f"dequantized for conversion. Readable GGUF architectures: {', '.join(supported)}. Deploy the model's "
            "Hugging Face folder instead (--model-path DIR).")
    return arch


def _clean_config(config, tokenizer) -> None:
    for key in _DROP_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    # ONNX Runtime GenAI refuses null bos/eos ids: take them from the tokenizer when the GGUF config lacks them.
    for key, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token),
                       ("pad_token_id", tokenizer.pad_token)):
        if getattr(config, key, None) is None and token is not None:
            setattr(config, key, tokenizer.convert_tokens_to_ids(token))


def dequantize(path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the Hugging Face folder of the GGUF at ``path`` into ``out_dir`` (FP32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, out_dir = Path(path).resolve(), Path(out_dir)
    arch = check_architecture(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    _clean_config(config, tokenizer)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"{path}: the dequantized weights do not fit a {type(loaded).__name__} built from the "
                               f"file's own config (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    for key in _DROP_CONFIG_KEYS:
        saved.pop(key, None)
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    link_or_copy(path, out_dir / KEPT_GGUF)
    return {"architecture": arch, "class": type(loaded).__name__,
            "parameters": sum(p.numel() for p in fresh.parameters()), "vocab": len(tokenizer),
            "chat_template": bool(tokenizer.chat_template), "weight_types": weight_types(path)}


def build(request: dict) -> dict:
    """Source-kind builder (:mod:`scripts.sources.registry`): ``request["arg"]`` is the GGUF file."""
    result = dequantize(Path(request["arg"]), Path(request["out_dir"]))
    note = "" if result["chat_template"] else "; it carries no chat template (the family's is used)"
    return {**result, "summary": f"GGUF {Path(request['arg']).name}: {result['class']} ({result['architecture']}), "
                                 f"{result['parameters']:,} parameters, dequantized to FP32{note}"}
