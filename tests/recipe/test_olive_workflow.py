"""Tests for scripts/recipe/olive_workflow.py: the tutorial's whole `olive run --config` file given as a recipe is
translated (input model, ModelBuilder options, output dir), or refused naming the form that translates."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from scripts.core.errors import RecipeError
from scripts.recipe.load import load_recipe, parse_recipe
from scripts.recipe.olive_workflow import SUPPORTED_FORM, is_olive_workflow

#: The tutorial's workflow file: 9 top-level keys, none of them a recipe key.
TUTORIAL = {
    "input_model": {"type": "HfModel", "model_path": "hf"},
    "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
        {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
    "passes": {"builder": {"type": "ModelBuilder", "config": {
        "precision": "int4", "quantization_config": {"block_size": 128, "is_symmetric": False}}}},
    "host": "local_system",
    "target": "local_system",
    "cache_dir": "cache",
    "output_dir": "models/qwen-int4",
    "log_severity_level": 1,
    "evaluate_input_model": False,
}


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "hf").mkdir()
    return tmp_path


def workflow(**changes) -> dict:
    doc = copy.deepcopy(TUTORIAL)
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


def refusal(folder: Path, doc: dict, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(doc, folder / "workflow.json", **kwargs)
    message = str(info.value)
    assert f"{folder / 'workflow.json'}: this is an Olive workflow (olive run --config), not a recipe, and " in message
    assert message.endswith(SUPPORTED_FORM + ".")
    return message


def test_the_tutorials_workflow_file_is_translated_into_a_recipe(folder):
    path = folder / "workflow.json"
    path.write_text(json.dumps(TUTORIAL))
    recipe = load_recipe(str(path))
    assert recipe.name == recipe.foundry.name == "qwen-int4"
    assert recipe.source.folder == folder / "hf" and recipe.family == "auto"
    assert recipe.conversion.precision == "int4"
    assert (recipe.conversion.quantization.block_size, recipe.conversion.quantization.symmetric) == (128, False)
    notes = "\n".join(recipe.notes)
    assert "workflow.json: Olive workflow: input_model.model_path → model.source = 'hf'" in notes
    assert "passes.builder (ModelBuilder) → conversion" in notes
    assert "output_dir 'models/qwen-int4' → name and foundry.name 'qwen-int4'" in notes
    assert "systems, host, target, cache_dir, log_severity_level, evaluate_input_model: not needed" in notes
    assert "quantization_config.block_size → conversion.quantization.block_size = 128" in notes


def test_the_older_engine_layout_flat_pass_options_and_search(folder):
    doc = workflow(output_dir=None, cache_dir=None, host=None, target=None,
                   engine={"output_dir": "out/tiny", "cache_dir": "c"},
                   passes={"mb": {"type": "ModelBuilder", "precision": "fp32",
                                  "search": {"max_length": 256, "do_sample": False}}})
    recipe = parse_recipe(doc, folder / "workflow.json")
    assert recipe.name == "tiny" and recipe.conversion.precision == "fp32"
    assert recipe.generation.max_length == 256 and recipe.generation.do_sample is False
    assert any("engine.* read as top-level keys" in n for n in recipe.notes)


def test_model_path_flag_replaces_a_missing_model_path(folder):
    doc = workflow(input_model={"type": "HfModel"})
    recipe = parse_recipe(doc, folder / "workflow.json", model_path=folder / "hf")
    assert recipe.source.folder == folder / "hf"
    assert "model_path is missing" in refusal(folder, doc)


def test_a_hub_id_is_refused_with_how_to_download_it(folder):
    message = refusal(folder, workflow(input_model={"type": "HfModel", "model_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert "'Qwen/Qwen2.5-0.5B-Instruct' is a Hugging Face Hub id, which Olive downloads" in message
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR" in message


@pytest.mark.parametrize("change, expected", [
    ({"systems": {"gpu": {"type": "LocalSystem", "accelerators": [
        {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}}},
     "systems.gpu targets gpu (CUDAExecutionProvider); this tool builds for CPU"),
    ({"passes": {**TUTORIAL["passes"], "quant": {"type": "OnnxDynamicQuantization"}}},
     "its passes quant (OnnxDynamicQuantization) do not translate"),
    ({"passes": {"conv": {"type": "OnnxConversion"}}}, "its passes conv (OnnxConversion) do not translate"),
    ({"input_model": {"type": "ONNXModel", "model_path": "m.onnx"}}, "its input_model type is 'ONNXModel', not HfModel"),
    ({"data_dir": "x", "auto_opt": True}, "its keys auto_opt, data_dir have no recipe equivalent"),
    ({"foundry": {"name": "x"}}, "it also has the recipe keys foundry"),
    ({"passes": {"b": {"type": "ModelBuilder", "config": {"precision": "int4", "search": {"num_beams": 4}}}}},
     "passes.b.search.num_beams has no recipe equivalent"),
])
def test_what_a_recipe_cannot_say_is_refused_naming_the_supported_form(folder, change, expected):
    assert expected in refusal(folder, {**copy.deepcopy(TUTORIAL), **change})


def test_an_unknown_builder_option_is_refused_like_the_tutorial_form(folder):
    doc = workflow(passes={"b": {"type": "ModelBuilder", "config": {"precision": "int4", "int4_blocksize": 64}}})
    with pytest.raises(RecipeError, match=r"conversion.config.int4_blocksize: unknown key"):
        parse_recipe(doc, folder / "workflow.json")


def test_recipes_are_not_mistaken_for_workflows():
    assert is_olive_workflow(TUTORIAL) and is_olive_workflow({"engine": {}})
    assert not is_olive_workflow({"model": {"source": "demo"}, "foundry": {"name": "x"}})
    assert not is_olive_workflow(["input_model"])
