"""Models made locally from a published architecture's config, with random weights: sizes and speeds at the scale
users deploy, with nothing downloaded. Their answers are noise: use them for size and speed, never quality.

``synthetic:qwen2.5-0.5b``: ``Qwen2ForCausalLM`` shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied embeddings; 494M parameters, ~2 GB in FP32), seeded, with a
byte-level BPE tokenizer padded to the full vocabulary (every id decodes: the Foundry runtime streams nothing for
ids its tokenizer cannot decode) and ChatML special tokens at Qwen's ids.

    python -m scripts.sources.synthetic synthetic:qwen2.5-0.5b OUT_DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    "synthetic:qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True),
}
#: Qwen2.5's special-token ids (kept so that prompts and stop tokens look like the real model's).
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["The cooperative keeps careful records of every harvest, every delivery and every repair.",
        "In one sentence, what is the text above about?", "You are a helpful assistant.",
        "Hello, how are you today? What can you help me with?", "system user assistant"] * 20
SEED = 0


def full_vocab_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a little text, its vocabulary padded with decodable filler tokens
    up to ``vocab_size`` and the ChatML specials at Qwen's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    doc = json.loads(tok.to_str())
    vocab: dict[str, int] = doc["model"]["vocab"]
    taken = set(vocab)
    special_ids = set(SPECIALS.values())
    i = 0
    for idx in range(len(vocab), vocab_size):
        if idx in special_ids:
            continue
        while f"Ġw{i}" in taken:
            i += 1
        vocab[f"Ġw{i}"] = idx  # decodes to " w<i>": every id the random model may emit is printable
        taken.add(f"Ġw{i}")
        i += 1
    for token, idx in SPECIALS.items():
        vocab[token] = idx
    doc["added_tokens"] = [{"id": idx, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for token, idx in SPECIALS.items()]
    return Tokenizer.from_str(json.dumps(doc))


def build_synthetic_model(source: str, out_dir: Path, seed: int = SEED) -> dict:
    """Write the HF folder for ``source`` (config, safetensors, tokenizer with a ChatML template)."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shape = SHAPES[source]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=full_vocab_tokenizer(shape["vocab_size"]),
                                   bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(chat_template=CHATML, tokenizer_class="Qwen2Tokenizer", model_max_length=shape["max_position_embeddings"])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    config = Qwen2Config(**shape, bos_token_id=SPECIALS["<|endoftext|>"], eos_token_id=SPECIALS["<|im_end|>"],
                         pad_token_id=SPECIALS["<|endoftext|>"], architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir)
    (out_dir / "slmops_synthetic.json").write_text(json.dumps(
        {"source": source, "seed": seed, "parameters": n_params,
         "note": "random weights: sizes and speeds only, answers are noise"}, indent=2) + "\n", encoding="utf-8")
    return {"parameters": n_params}


def build(request: dict) -> dict:
    """Source-kind builder (:mod:`scripts.sources.registry`)."""
    result = build_synthetic_model(request["spec"], Path(request["out_dir"]))
    return {**result, "summary": f"{request['spec']}: {result['parameters']:,} parameters, random weights "
                                 "(size and speed only; its answers are noise)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=sorted(SHAPES))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(build_synthetic_model(args.source, args.out_dir)))


if __name__ == "__main__":
    main()
