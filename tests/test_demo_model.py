"""Tests for scripts/demo_model.py: data loading, answer normalisation, chat template, a tiny build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.demo_model import (
    CHAT_TEMPLATE,
    EXPECTED_FILES,
    PROVENANCE_FILE,
    QA,
    DemoBuildResult,
    DemoSettings,
    build_demo_model,
    check_model_dir,
    exact_match,
    file_sha256,
    load_qa,
    normalise_answer,
    render_chatml,
)
from scripts.errors import ModelSourceError, RecipeError
from scripts.settings import REPO_ROOT

DATASET = REPO_ROOT / "recipes" / "data" / "qwen-domain.jsonl"
HELDOUT = REPO_ROOT / "recipes" / "data" / "qwen-domain-heldout.txt"

TINY = DemoSettings(
    seed=7, vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
    intermediate_size=64, max_position_embeddings=128, steps=4, warmup_steps=2, batch_size=4,
    max_new_tokens=4, threads=1,
)
TINY_QA = [
    {"question": "What colour is the gate?", "answer": "The gate is green."},
    {"question": "Who feeds the goats?", "answer": "Ada feeds the goats."},
    {"question": "When does the shop open?", "answer": "The shop opens at nine."},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- load_qa


def test_bundled_dataset_is_valid_and_large_enough():
    qa = load_qa(DATASET)
    assert len(qa) >= 64
    assert all(len(x.answer.split()) <= 20 for x in qa)
    assert HELDOUT.read_text(encoding="utf-8").strip()


def test_load_qa_good_file(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", TINY_QA + [""])
    assert load_qa(p) == [QA(r["question"], r["answer"]) for r in TINY_QA]


def test_load_qa_bad_json_names_file_and_line(tmp_path):
    p = _write_jsonl(tmp_path / "bad.jsonl", [TINY_QA[0], '{"question": "x", "answer": ', TINY_QA[1]])
    with pytest.raises(RecipeError) as e:
        load_qa(p)
    assert f"{p}:2" in str(e.value)
    assert "invalid JSON" in str(e.value)


def test_load_qa_missing_key_names_key_and_line(tmp_path):
    p = _write_jsonl(tmp_path / "missing.jsonl", [TINY_QA[0], TINY_QA[1], {"question": "Only a question?"}])
    with pytest.raises(RecipeError, match=r"missing\.jsonl:3: missing key 'answer'"):
        load_qa(p)


@pytest.mark.parametrize("row", [["a", "b"], {"question": "", "answer": "x"}, {"question": "q", "answer": 3}])
def test_load_qa_rejects_wrong_shapes(tmp_path, row):
    with pytest.raises(RecipeError, match=r":1: "):
        load_qa(_write_jsonl(tmp_path / "d.jsonl", [row]))


def test_load_qa_missing_file_and_empty_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_qa(tmp_path / "nope.jsonl")
    with pytest.raises(RecipeError, match="no question/answer pairs"):
        load_qa(_write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_load_qa_duplicate_question(tmp_path):
    with pytest.raises(RecipeError, match=r":2: duplicate question \(first seen on line 1\)"):
        load_qa(_write_jsonl(tmp_path / "d.jsonl", [TINY_QA[0], TINY_QA[0]]))


# ---------------------------------------------------------------- normalise_answer


@pytest.mark.parametrize(
    "a, b",
    [
        ("The gate is green.", "the gate is green"),
        ("  The   gate\nis green!  ", "the gate is green"),
        ("Yes, it is.", "yes, it is"),
        ("Call 0412 558 730.", "call 0412 558 730"),
        ("office@brightwater.coop.", "office@brightwater.coop"),
    ],
)
def test_normalise_answer(a, b):
    assert normalise_answer(a) == b


def test_normalise_answer_keeps_inner_punctuation_and_words():
    assert normalise_answer("Grow together, share the harvest.") != normalise_answer("Grow together share the harvest")
    assert normalise_answer("It is green.") != normalise_answer("It is blue.")


def test_exact_match():
    qa = [QA("q1", "A b."), QA("q2", "C.")]
    assert exact_match(["a  B", "D"], qa) == 0.5


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


# ---------------------------------------------------------------- tiny build (shared by the tests below)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> tuple[Path, DemoBuildResult, Path]:
    root = tmp_path_factory.mktemp("demo")
    data = _write_jsonl(root / "tiny.jsonl", TINY_QA)
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
    assert prov["dataset_sha256"] == file_sha256(data)
    assert prov["settings"] == TINY.to_dict()
    assert prov["model_sha256"] == file_sha256(out / "model.safetensors")


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
        assert file_sha256(first.out_dir / name) == file_sha256(second.out_dir / name), name


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
