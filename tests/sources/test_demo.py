"""Tests for scripts/sources/demo.py: settings, chat template, a tiny build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.sources.demo_tokenizer import CHAT_TEMPLATE, render_chatml
from scripts.core.fileops import hash_file
from scripts.sources.demo import EXPECTED_FILES, PROVENANCE_FILE, DemoBuildResult, build_demo_model, check_model_dir
from scripts.sources.demo_training import SYSTEM_PROMPTS, ConversationEncoder, DemoSettings, sample_session
from scripts.core.errors import ModelSourceError
from scripts.core.evalset import load_qa
from tests.qa_data import TINY_QA, write_jsonl


TINY = DemoSettings(
    seed=7, vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
    intermediate_size=64, max_position_embeddings=128, steps=4, warmup_steps=2, batch_size=4,
    max_new_tokens=4, threads=1, session_max_turns=3, session_max_tokens=96,
)


# ---------------------------------------------------------------- pure template twin


def test_render_chatml_matches_spec():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chatml(msgs) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chatml(msgs[1:]) == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chatml(msgs[1:], add_generation_prompt=False) == "<|im_start|>user\nU<|im_end|>\n"


def test_settings_to_dict_and_validation():
    d = DemoSettings().to_dict()
    assert d["max_position_embeddings"] == 512 and d["seed"] == 1234
    with pytest.raises(ValueError):
        DemoSettings(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError):
        DemoSettings(session_min_turns=3, session_max_turns=2)


# ---------------------------------------------------------------- tiny build (shared by the tests below)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> tuple[Path, DemoBuildResult, Path]:
    root = tmp_path_factory.mktemp("demo")
    data = write_jsonl(root / "tiny.jsonl", TINY_QA)
    result = build_demo_model(data, root / "hf", TINY, progress=False)
    return data, result, root


def test_build_folder_layout(tiny_build):
    data, result, _ = tiny_build
    out = result.out_dir
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    assert result.n_questions == len(TINY_QA)
    assert 0.0 <= result.accuracy <= 1.0 and result.train_seconds > 0
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["dataset_sha256"] == hash_file(data)
    assert prov["settings"] == TINY.to_dict()
    assert prov["model_sha256"] == hash_file(out / "model.safetensors")


def test_config_ids_non_null_and_vocab_matches_tokenizer(tiny_build):
    from transformers import AutoTokenizer

    out = tiny_build[1].out_dir
    cfg = check_model_dir(out)
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert cfg["vocab_size"] == len(tok)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    for d in (cfg, gen):
        assert d["eos_token_id"] == im_end
        assert d["bos_token_id"] == eot and d["pad_token_id"] == eot
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>"
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert tcfg["chat_template"] == CHAT_TEMPLATE == (out / "chat_template.jinja").read_text()


def test_chat_template_renders_exactly(tiny_build):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_build[1].out_dir))
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    got = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert got == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    got = tok.apply_chat_template(with_system[1:], tokenize=False, add_generation_prompt=True)
    assert got == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    for msgs in (with_system, with_system[1:]):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chatml(msgs)


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tiny_build):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_build[1].out_dir))
    text = render_chatml([{"role": "user", "content": "Who feeds the goats? Ünïcode ✓"}])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode("Who feeds the goats?", add_special_tokens=False)[0] != tok.bos_token_id


def test_build_is_deterministic(tiny_build):
    data, first, root = tiny_build
    second = build_demo_model(data, root / "hf-again", TINY, progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert hash_file(first.out_dir / name) == hash_file(second.out_dir / name), name


def test_check_model_dir_rejects_null_eos_and_vocab_mismatch(tiny_build, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_build[1].out_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "eos_token_id": None}))
    with pytest.raises(ModelSourceError, match="eos_token_id is null"):
        check_model_dir(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(ModelSourceError, match="vocab_size"):
        check_model_dir(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        check_model_dir(bad)


# ---------------------------------------------------------------- multi-turn training conversations


@pytest.mark.parametrize("items,system", [([0], None), ([1], 0), ([0, 1, 2], None), ([2, 0, 1], 3)])
def test_training_conversation_is_exactly_the_whole_rendered_conversation(tiny_build, items, system):
    """The pieces the trainer joins are the ids the runtime gets when it renders and tokenizes the chat whole;
    the loss falls on the answers and their <|im_end|> only."""
    from transformers import AutoTokenizer

    data, result, _ = tiny_build
    tok = AutoTokenizer.from_pretrained(str(result.out_dir))
    encoder = ConversationEncoder(tok, load_qa(data))
    ids, labels = encoder.encode(items, system)
    whole = tok.apply_chat_template(encoder.messages(items, system), tokenize=False)
    assert whole == render_chatml(encoder.messages(items, system), add_generation_prompt=False)
    assert ids == tok.encode(whole.removesuffix("\n"), add_special_tokens=False)
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert learned == "".join(encoder.qa[i].answer + "<|im_end|>" for i in items)
    assert len(labels) == len(ids)


def test_sessions_are_seeded_distinct_and_fit(tiny_build):
    import random
    from transformers import AutoTokenizer

    data, result, _ = tiny_build
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(str(result.out_dir)), load_qa(data))
    settings = DemoSettings(session_max_turns=3, session_max_tokens=160, system_share=0.5)
    first = [sample_session(random.Random(3), encoder, settings) for _ in range(20)]
    assert first == [sample_session(random.Random(3), encoder, settings) for _ in range(20)]
    rng = random.Random(5)
    sessions = [sample_session(rng, encoder, settings) for _ in range(200)]
    for items, system in sessions:
        assert len(set(items)) == len(items) >= 1
        assert len(items) == 1 or len(encoder.encode(items, system)[0]) <= 160
        assert system is None or 0 <= system < len(SYSTEM_PROMPTS)
    assert {len(items) for items, _ in sessions} >= {2, 3}
    assert any(s is None for _, s in sessions) and any(s is not None for _, s in sessions)
