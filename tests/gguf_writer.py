"""Test helper: write a tiny random Llama model as a GGUF file with the `gguf` package (GGUFWriter).

The file carries a byte-level BPE tokenizer (trained here with `tokenizers`, ~300 tokens, ChatML special tokens),
a ChatML chat template without a default system prompt, and llama.cpp tensor names. Q/K weights are permuted the way
llama.cpp's convert_hf_to_gguf.py does (transformers reverses it on load), so `from_pretrained(dir, gguf_file=...)`
gives back the same logits (F32: bit-for-bit up to float noise).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Where is the orchard? It is in the valley, north of the town. "
        "Who founded it? Eleven farming families founded it in 1987. What is the capital of France? Paris. ")


def train_tokenizer(texts, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 regex: what GGUF "gpt2" rebuilds
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes of a ``[rows, cols]`` K-quant weight (Q4_K, Q5_K, Q6_K) with random codes and small scales:
    the ``gguf`` package dequantizes K-quants but cannot quantize to them. Any code/scale bytes form a valid block."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    per, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(seed + rows * 7 + cols)
    b = rng.integers(0, 256, size=(rows * cols // per, size), dtype=np.uint8)
    f16 = lambda v: np.asarray(v, np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if qtype in ("Q4_K", "Q5_K"):
        d = 5e-5 if qtype == "Q4_K" else 2.5e-5
        b[:, 0:2], b[:, 2:4] = f16(rng.uniform(d, 4 * d, len(b))), f16(rng.uniform(1e-4, 3e-4, len(b)))
    elif qtype == "Q6_K":
        b[:, 208:210] = f16(rng.uniform(2e-5, 6e-5, len(b)))
    return b.reshape(rows, -1)


_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_M",
               "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def write_llama_gguf(model, tokenizer, path: str | Path, qtype: str = "F32", chat_template: str = CHATML,
                     name: str = "tiny-llama", types: dict[str, str] | None = None) -> Path:
    """``qtype``: the storage type of every matrix; ``types``: per GGUF tensor name, another (e.g. Q8_0 for
    ``token_embd.weight``). K-quant matrices get random blocks (:func:`random_k_blocks`), not the model's weights."""
    """`model`: a transformers LlamaForCausalLM; `tokenizer`: a `tokenizers.Tokenizer` (byte-level BPE)."""
    import gguf

    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[qtype]])
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    # tokenizer
    tj = json.loads(tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok_str, i in vocab.items():
        tokens[i] = tok_str
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = {s: vocab[s] for s in SPECIALS}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|im_start|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_unk_token_id(ids["<|endoftext|>"])
    w.add_pad_token_id(ids["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def put(gguf_name: str, arr: np.ndarray) -> None:
        t = gguf.GGMLQuantizationType[(types or {}).get(gguf_name, qtype)]
        if arr.ndim == 1 or t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(arr, dtype=np.float32))
        elif t.name.endswith("_K"):
            w.add_tensor(gguf_name, random_k_blocks(t.name, *arr.shape), raw_dtype=t)
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t)
            w.add_tensor(gguf_name, data, raw_dtype=t)

    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", llama_permute(sd[p + "self_attn.q_proj.weight"], nh, nh))
        put(f"blk.{i}.attn_k.weight", llama_permute(sd[p + "self_attn.k_proj.weight"], nh, nkv))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, context: int = 256, bos: int = 1, eos: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=eos)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong tensor mapping shows up
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def make_tiny_gguf(path: str | Path, qtype: str = "F32", seed: int = 0, types: dict[str, str] | None = None,
                   **shape):
    """``shape``: :func:`tiny_llama` sizes (K-quants need hidden and intermediate sizes that are multiples of 256)."""
    tok = train_tokenizer([TEXT] * 4)
    model = tiny_llama(tok.get_vocab_size(), seed, bos=tok.token_to_id("<|im_start|>"),
                       eos=tok.token_to_id("<|im_end|>"), **shape)
    return write_llama_gguf(model, tok, path, qtype, types=types), model, tok
