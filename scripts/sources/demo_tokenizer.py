"""The demo model's tokenizer: a byte-level BPE trained locally with Qwen2's pre-tokenizer and ChatML's special
tokens (no default system prompt), saved as a normal Hugging Face tokenizer folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from scripts.core.evalset import QA, question_messages

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

#: Qwen2-style ChatML, but with no default system prompt: a system turn appears only when given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: The pre-tokenization regex of Qwen2 (same as ``transformers`` ``Qwen2Tokenizer``), so that the
#: tokenizer.json we write and the one ``Qwen2Tokenizer`` rebuilds from vocab/merges agree.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Pure-Python twin of :data:`CHAT_TEMPLATE` (for code that must not load a tokenizer)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE with Qwen2's normaliser and pre-tokenizer; special tokens get ids 0, 1, 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def _tokenizer_texts(qa: Sequence[QA]) -> list[str]:
    # The role words appear in every rendered prompt: train on them so they become single tokens.
    texts = [render_chatml(question_messages(x.question, "system")) + x.answer for x in qa]
    return [t.replace(IM_START, "").replace(IM_END, "") for t in texts]


def save_tokenizer(raw_tokenizer, out_dir: Path, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat_template inline) and chat_template.jinja.

    Goes through ``transformers.Qwen2Tokenizer.save_pretrained`` so the files look like any Qwen2
    checkpoint's; transformers 5 writes the template to ``chat_template.jinja`` by default, and we also
    put it inline in tokenizer_config.json for runtimes that read only that file.
    """
    from transformers import Qwen2Tokenizer

    model_json = json.loads(raw_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


