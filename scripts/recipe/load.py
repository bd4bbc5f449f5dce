"""Recipes: one JSON file per deployment, validated on load.

A recipe says where the model comes from, which prompt family it uses, how to convert and quantize it,
what to call it in Foundry Local, its generation defaults, and the evaluation set that proves it works.
Relative paths inside a recipe are relative to the recipe file. The keys are declared in
:mod:`scripts.recipe.spec`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from scripts.core import settings
from scripts.core.errors import RecipeError
from scripts.core.jsonfile import read_json_strict
from scripts.core.schema import Field, Obj, validate
from scripts.recipe.olive_workflow import is_olive_workflow, translate_olive_workflow
from scripts.recipe.precisions import AUTO, CHOICES, PRECISIONS, refusal, translate_tutorial_conversion, TutorialFormError
from scripts.recipe.runtime import RuntimeSpec
from scripts.recipe.spec import (Conversion, EvalSpec, families, FinetuneSpec, FoundryTarget, Generation, Quantization,
                                 Recipe, SCHEMA, FidelitySpec, ValidateSpec)
from scripts.sources.registry import parse_source

log = logging.getLogger(__name__)


def recipe_path(name_or_path: str) -> Path:
    """Resolve ``--model NAME`` to ``recipes/NAME.json``; a path to a .json file is used as is."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".json":
        if not candidate.is_file():
            raise RecipeError(f"Recipe file {candidate} does not exist. Check the path, or use --model NAME "
                              f"for one of: {', '.join(available_recipes()) or '(none found)'}.")
        return candidate.resolve()
    path = settings.recipes_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise RecipeError(f"No recipe named {name_or_path!r} in {settings.recipes_dir()}. Available: "
                          f"{', '.join(available_recipes()) or '(none)'}. Create {path.name} there or pass a path "
                          "to a recipe .json file.")
    return path


def available_recipes() -> list[str]:
    """Names of the recipes in the recipes folder."""
    folder = settings.recipes_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_recipe(name_or_path: str, model_path: str | Path | None = None) -> Recipe:
    """Load and validate a recipe. ``model_path`` overrides ``model.source`` (``--model-path``)."""
    path = recipe_path(name_or_path)
    return parse_recipe(read_json_strict(path), path, model_path)


def parse_recipe(doc: Any, path: Path, model_path: str | Path | None = None) -> Recipe:
    """Validate a recipe document already read from ``path``."""
    schema = Obj({**SCHEMA.fields, "model": Obj({**SCHEMA.fields["model"].fields,
                                                 "family": Field(str, default="auto", choices=families())},
                                                required=True)})
    notes: list[str] = []
    if is_olive_workflow(doc):
        doc, notes = translate_olive_workflow(doc, path, model_path is not None)
    doc, tutorial_notes = _translate_tutorial_form(doc, path)
    notes += tutorial_notes
    data, problems = validate(doc, schema)
    if problems:
        lines = "\n".join(f"  - {p.path}: {p.problem}" for p in problems)
        raise RecipeError(f"{path}: the recipe has {len(problems)} problem(s):\n{lines}\n"
                          "Fix these keys in the recipe file (every key is described under 'Recipe keys' in README.md).")
    if model_path is not None:
        source = parse_source(str(model_path), Path.cwd(), "--model-path", user_path=True)
    else:
        source = parse_source(data["model"]["source"], path.parent, f"{path}: model.source")
    conv = data["conversion"]
    ev = data["eval"]
    dataset = (path.parent / ev["dataset"]).resolve() if ev["dataset"] else None
    if dataset is not None and not dataset.is_file():
        raise RecipeError(f"{path}: eval.dataset: {dataset} does not exist. Point it at a JSONL file of "
                          "{\"question\": ..., \"answer\": ...} lines, relative to the recipe file.")
    if source.gguf_file and conv["gguf"] == "exact" and conv["adapter"] == "merge" and \
            (data["model"]["adapter"] or data["model"]["finetune"]["dataset"]):
        notes.append(f"{path.name}: conversion.adapter \"merge\" changes the GGUF's weights, so the merged model is "
                     "quantized again (conversion.gguf \"exact\" keeps a GGUF's blocks only when nothing is merged "
                     "into them; conversion.adapter \"branch\" keeps both exact)")
    tools = (path.parent / ev["tools"]).resolve() if ev["tools"] else None
    if tools is not None and not tools.is_file():
        raise RecipeError(f"{path}: eval.tools: {tools} does not exist. Point it at a JSONL tool-calling set (OpenAI "
                          "chat lines with tools), relative to the recipe file.")
    return Recipe(
        name=data["name"] or path.stem,
        path=path,
        description=data["description"],
        source=source,
        family=data["model"]["family"],
        conversion=_conversion(conv, path),
        foundry=FoundryTarget(**data["foundry"]),
        generation=Generation(**data["generation"]),
        eval=EvalSpec(dataset, ev["min_accuracy"], ev["max_new_tokens"], ev["system_prompt"], tools),
        adapter=_resolve_adapter(data["model"]["adapter"], path),
        finetune=_finetune(data["model"]["finetune"], data["model"]["adapter"], path),
        validate=ValidateSpec(**{**data["validate"], "format_json_keys": tuple(data["validate"]["format_json_keys"])
                                 if data["validate"]["format_json_keys"] is not None else None}),
        runtime=RuntimeSpec(**data["runtime"]),
        notes=tuple(notes),
    )


def _translate_tutorial_form(doc: Any, path: Path) -> tuple[Any, list[str]]:
    """Accept the tutorial's ``conversion.config`` block (``precision`` + ``quantization_config``), translated."""
    if not isinstance(doc, dict) or "conversion" not in doc:
        return doc, []
    try:
        conversion, notes = translate_tutorial_conversion(doc["conversion"])
    except TutorialFormError as exc:
        raise RecipeError(f"{path}: {exc.path}: {exc.problem}. Olive would silently ignore it; fix or remove it.") from None
    if notes:
        log.info("%s: tutorial-form conversion translated: %s", path, "; ".join(notes))
    return {**doc, "conversion": conversion}, [f"{path.name}: {n}" for n in notes]


def _conversion(conv: dict, path: Path) -> "Conversion":
    """The validated conversion block; precisions that cannot run on the target are refused here, before any build."""
    name = conv["precision"]
    check_precision(name, conv["quantization"]["algorithm"], f"{path}: conversion.precision",
                    f"{path}: conversion.precision: {name!r}")
    quant = conv["quantization"]
    if quant["eight_bit"] and quant["algorithm"] not in ("default", "rtn"):
        raise RecipeError(f"{path}: conversion.quantization.eight_bit is built by round-to-nearest per weight group; "
                          f"it cannot be combined with algorithm {quant['algorithm']!r} (which picks its own 8-bit "
                          "layers). Remove one of the two.")
    if quant["eight_bit"] and "lm_head" in quant["eight_bit"] and not quant["lm_head"]:
        raise RecipeError(f"{path}: conversion.quantization: eight_bit lists \"lm_head\" but lm_head is false (kept "
                          "in FP32). Remove one of the two.")
    nested = {"quantization": Quantization(**conv["quantization"]), "fidelity": FidelitySpec(**conv["fidelity"])}
    return Conversion(**{**conv, **nested})


def check_precision(name: str, algorithm: str, where: str, refused_as: str) -> None:
    """The one check of a precision name (recipe key or ``--precision``): known, buildable here, and its algorithm
    is one it has. ``where`` and ``refused_as`` name it in messages. Raises :class:`RecipeError`."""
    if name == AUTO:
        return
    if name not in PRECISIONS:
        raise RecipeError(f"{where}: {name!r} is not a precision; choose one of: {', '.join(CHOICES)}.")
    if (why := refusal(name)) is not None:
        raise RecipeError(f"{refused_as} refused. {why}")
    if algorithm not in PRECISIONS[name].algorithms:
        raise RecipeError(f"{where}: quantization.algorithm {algorithm!r} does not apply to {name} (it has: "
                          f"{', '.join(PRECISIONS[name].algorithms)}); {algorithm!r} is an INT4 algorithm of the GenAI "
                          "model builder, int8 is built with round-to-nearest. Use \"default\" or \"rtn\".")


def with_precision(recipe: "Recipe", name: str | None) -> "Recipe":
    """``recipe`` with ``conversion.precision`` set to ``name`` (``--precision``), checked like the recipe key."""
    if not name:
        return recipe
    check_precision(name, recipe.conversion.quantization.algorithm, "--precision", f"--precision {name}:")
    return replace(recipe, conversion=replace(recipe.conversion, precision=name))


def _finetune(spec: dict, adapter: str | None, recipe_file: Path) -> FinetuneSpec:
    if spec["dataset"] is None:
        return FinetuneSpec(**{**spec, "dataset": None})
    if adapter is not None:
        raise RecipeError(f"{recipe_file}: model.finetune and model.adapter are both set: the fine-tune makes the "
                          "adapter. Keep one.")
    dataset = (recipe_file.parent / spec["dataset"]).resolve()
    if not dataset.is_file():
        raise RecipeError(f"{recipe_file}: model.finetune.dataset: {dataset} does not exist. Point it at a JSONL file "
                          "of {\"question\": ..., \"answer\": ...} lines (or a tool-calling set, as eval.tools takes), "
                          "relative to the recipe file.")
    return FinetuneSpec(**{**spec, "dataset": dataset})


def _resolve_adapter(adapter: str | None, recipe_file: Path) -> str | None:
    if adapter is None:
        return None
    folder = Path(adapter).expanduser()
    folder = (folder if folder.is_absolute() else recipe_file.parent / folder).resolve()
    if not folder.is_dir():
        raise RecipeError(f"{recipe_file}: model.adapter: adapter folder {folder} does not exist. Point it at a PEFT "
                          "adapter folder (adapter_config.json + adapter_model.safetensors, as written by "
                          "peft_model.save_pretrained), relative to the recipe file.")
    return str(folder)
