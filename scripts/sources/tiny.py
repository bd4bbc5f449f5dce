"""Tiny random-weight Hugging Face models, one per registered family, for tests and demos of the family machinery.

Each is built locally from its architecture's ``transformers`` config (hidden 64, 2 layers), with a byte-level BPE
tokenizer of ~500 tokens trained here, the family's control tokens as special tokens and the family's real chat
template (``templates/families/<name>.chat_template.jinja``). Nothing is downloaded. The answers are garbage: these
models prove conversion, templates and loading, not quality.

    python -m scripts.sources.tiny FAMILY OUT_DIR [--architecture ARCH]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scripts.families.registry import Family, get_family

#: Extra config keys some architectures need to be small and convertible by the pinned GenAI builder.
ARCH_EXTRAS: dict[str, dict[str, Any]] = {
    "Phi3ForCausalLM": {"original_max_position_embeddings": 512, "rope_scaling": None},
    "Qwen3ForCausalLM": {"head_dim": 16},
    "Gemma3ForCausalLM": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "Gemma2ForCausalLM": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "GemmaForCausalLM": {"head_dim": 16},
}
_MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3",
                "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Gemma3ForCausalLM": "gemma3_text",
                "Gemma2ForCausalLM": "gemma2", "GemmaForCausalLM": "gemma",
                "OlmoForCausalLM": "olmo"}
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TRAINING_TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
                 "What is the capital of France? Paris is the capital.", "system user assistant model",
                 "You are a concise assistant for the orchard cooperative.", "When does the cider press open?",
                 "Foundry Local runs small language models on device.", "INST think"] * 20


def control_tokens(family: Family) -> list[str]:
    """The family's special tokens, bos and stop tokens first, without duplicates."""
    out: list[str] = []
    for token in ([family.bos_token] if family.bos_token else []) + list(family.special_tokens) + list(family.stop_tokens):
        if token not in out:
            out.append(token)
    return out


def build_tiny_model(family_name: str, out_dir: Path, architecture: str | None = None, vocab_size: int = 500,
                     seed: int = 0) -> Path:
    """Write a tiny HF model folder of ``family_name`` (its first architecture unless ``architecture``)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    family = get_family(family_name)
    architecture = architecture or family.architectures[0]
    template = family.reference_chat_template
    if template is None:
        raise ValueError(f"family {family.name!r} has no reference chat template to build a tiny model with")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = control_tokens(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = family.bos_token or specials[0]
    eos = family.stop_tokens[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   additional_special_tokens=[t for t in specials if t not in (bos, eos)])
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(chat_template=template, tokenizer_class="Qwen2Tokenizer", add_bos_token=False, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ids = {t: fast.convert_tokens_to_ids(t) for t in (bos, eos)}
    config = AutoConfig.for_model(
        _MODEL_TYPES[architecture], vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=ids[bos],
        eos_token_id=ids[eos], pad_token_id=ids[eos], tie_word_embeddings=False, architectures=[architecture],
        **ARCH_EXTRAS.get(architecture, {}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def build(request: dict) -> dict:
    """Source-kind builder (:mod:`scripts.sources.registry`): ``request["arg"]`` is the family."""
    family = request["arg"]
    build_tiny_model(family, Path(request["out_dir"]))
    return {"family": family, "summary": f"tiny {family} model: random weights, the family's real chat template (it "
            "proves conversion, templates and loading; its answers are noise). Deploy your own with --model-path."}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--architecture", default=None)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.family, args.out_dir, args.architecture))


if __name__ == "__main__":
    main()
