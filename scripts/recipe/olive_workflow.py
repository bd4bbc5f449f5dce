"""An Olive workflow file (what ``olive run --config`` takes, as the tutorial writes it) given where a recipe is
expected: recognised, and translated into a recipe when it says only what a recipe can say; otherwise refused with
a message naming the form that translates. Pure: no I/O beyond checking that a model path exists.

What translates (everything else is refused, never silently dropped):

| Olive workflow | recipe |
|---|---|
| ``input_model`` ``{"type": "HfModel", "model_path": DIR}`` (``adapter_path``) | ``model.source`` (``model.adapter``); relative to the file |
| one ``ModelBuilder`` pass: ``precision``, ``quantization_config`` or ``int4_*`` options (flat or under ``config``) | ``conversion`` (the tutorial form, translated by :mod:`scripts.recipe.precisions`) |
| the pass's ``search`` | ``generation`` |
| ``output_dir`` | the recipe's ``name`` and ``foundry.name`` (its last folder name) |
| ``systems`` / ``host`` / ``target`` on CPU, ``engine`` (older Olive: the same keys nested), ``cache_dir``, ``log_severity_level``, … | nothing: noted as not needed |
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from scripts.core.errors import RecipeError

RECIPE_KEYS = ("name", "description", "model", "conversion", "foundry", "generation", "eval", "validate")
#: Olive keys that need no translation: where Olive runs and keeps its files (the chain decides those).
_NOT_NEEDED = ("systems", "host", "target", "cache_dir", "log_severity_level", "clean_cache", "workflow_id",
               "output_name", "evaluate_input_model", "packaging_config", "plot_pareto_frontier",
               "auto_optimizer_config", "search_strategy", "execution_providers")
#: Olive keys about evaluation: the recipe's proof is ``eval.dataset`` through Foundry Local instead.
_EVALUATION = ("evaluators", "evaluator", "data_configs")
_TRANSLATED = ("input_model", "passes", "output_dir", "engine")
_GENERATION = ("max_length", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SUPPORTED_FORM = (
    "An Olive workflow given as a recipe translates when it holds an input_model {\"type\": \"HfModel\", "
    "\"model_path\": <a local Hugging Face folder>}, one ModelBuilder pass (precision, quantization_config or int4_* "
    "options, search), CPU systems and an output_dir. Otherwise write a recipe (see 'Recipe keys' in README.md, e.g. "
    "recipes/qwen.json), or keep the workflow and pass the model with --model-path")


def is_olive_workflow(doc: Any) -> bool:
    """Whether ``doc`` is an Olive workflow (``input_model`` or ``passes`` at the top, or an ``engine`` block)."""
    return isinstance(doc, dict) and any(k in doc for k in ("input_model", "passes", "engine"))


def _refuse(path: Path, problem: str) -> RecipeError:
    return RecipeError(f"{path}: this is an Olive workflow (olive run --config), not a recipe, and {problem}. "
                       f"{SUPPORTED_FORM}.")


def translate_olive_workflow(doc: dict[str, Any], path: Path, model_path_given: bool = False
                             ) -> tuple[dict[str, Any], list[str]]:
    """The recipe an Olive workflow stands for, and notes saying what was translated or not needed. Raises
    :class:`RecipeError` (naming the form that translates) for anything a recipe cannot say."""
    mixed = [k for k in RECIPE_KEYS if k in doc and k != "description"]
    if mixed:
        raise _refuse(path, f"it also has the recipe keys {', '.join(mixed)}: give either the whole Olive workflow or "
                            "a recipe")
    notes: list[str] = []
    doc = dict(doc)
    engine = doc.pop("engine", None)
    if engine is not None:
        if not isinstance(engine, dict):
            raise _refuse(path, "its engine is not an object")
        clash = sorted(set(engine) & set(doc))
        if clash:
            raise _refuse(path, f"{', '.join(clash)} is given both at the top and under engine")
        doc.update(engine)
        notes.append("engine.* read as top-level keys (the older Olive layout)")
    unknown = sorted(set(doc) - set(_NOT_NEEDED) - set(_EVALUATION) - set(_TRANSLATED) - {"description"})
    if unknown:
        raise _refuse(path, f"its keys {', '.join(unknown)} have no recipe equivalent")
    _refuse_gpu(doc.get("systems"), path)
    recipe: dict[str, Any] = {"description": doc.get("description", f"translated from the Olive workflow {path.name}")}
    recipe["model"] = _model(doc.get("input_model"), path, model_path_given, notes)
    recipe["conversion"], generation = _builder_pass(doc.get("passes"), path, notes)
    if generation:
        recipe["generation"] = generation
        notes.append(f"passes.*.search → generation ({', '.join(generation)})")
    name = _name(doc.get("output_dir"), path, notes)
    recipe["name"] = name
    recipe["foundry"] = {"name": name}
    ignored = [k for k in _NOT_NEEDED if k in doc]
    if ignored:
        notes.append(f"{', '.join(ignored)}: not needed (the chain runs Olive on this machine's CPU with its own "
                     "cache, log level and output folders)")
    evaluation = [k for k in _EVALUATION if k in doc]
    if evaluation:
        notes.append(f"{', '.join(evaluation)}: not translated (the proof is eval.dataset, asked through Foundry "
                     "Local: write a recipe to set one)")
    return recipe, [f"{path.name}: Olive workflow: {n}" for n in notes]


def _refuse_gpu(systems: Any, path: Path) -> None:
    if not isinstance(systems, dict):
        return
    for name, system in systems.items():
        accelerators = system.get("accelerators") if isinstance(system, dict) else None
        for acc in accelerators or []:
            if not isinstance(acc, dict):
                continue
            device = str(acc.get("device", "cpu")).lower()
            other = [p for p in acc.get("execution_providers") or [] if p != "CPUExecutionProvider"]
            if device != "cpu" or other:
                targets = device + (f" ({', '.join(other)})" if other else "")
                raise _refuse(path, f"systems.{name} targets {targets}; this tool builds for CPU (Foundry Local's "
                                    "CPU runtime)")


def _model(input_model: Any, path: Path, model_path_given: bool, notes: list[str]) -> dict[str, Any]:
    if not isinstance(input_model, dict):
        raise _refuse(path, "it has no input_model object")
    kind = str(input_model.get("type", "")).lower()
    if kind != "hfmodel":
        raise _refuse(path, f"its input_model type is {input_model.get('type')!r}, not HfModel (a Hugging Face folder)")
    extra = sorted(set(input_model) - {"type", "model_path", "adapter_path", "task"})
    if extra:
        raise _refuse(path, f"input_model.{extra[0]} has no recipe equivalent")
    if input_model.get("task", "text-generation") != "text-generation":
        raise _refuse(path, f"input_model.task is {input_model['task']!r}; only text-generation models deploy")
    model_path = input_model.get("model_path")
    model: dict[str, Any] = {"family": "auto"}
    if model_path_given:
        model["source"] = str(model_path or "--model-path")
    elif not isinstance(model_path, str) or not model_path:
        raise _refuse(path, "input_model.model_path is missing (or pass the model with --model-path)")
    elif not (path.parent / model_path).expanduser().exists() and _HUB_ID.match(model_path):
        raise _refuse(path, f"input_model.model_path {model_path!r} is a Hugging Face Hub id, which Olive downloads; "
                            "this tool deploys local folders, offline: download it first (e.g. huggingface-cli "
                            f"download {model_path} --local-dir DIR) and set model_path to DIR, or pass --model-path "
                            "DIR")
    else:
        model["source"] = model_path
        notes.append(f"input_model.model_path → model.source = {model_path!r} (relative to {path.name}'s folder)")
    if input_model.get("adapter_path"):
        model["adapter"] = input_model["adapter_path"]
        notes.append(f"input_model.adapter_path → model.adapter = {input_model['adapter_path']!r}")
    return model


def _builder_pass(passes: Any, path: Path, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(passes, dict) or not passes:
        raise _refuse(path, "it has no passes")
    builders = {n: p for n, p in passes.items()
                if isinstance(p, dict) and str(p.get("type", "")).lower() == "modelbuilder"}
    others = {n: (p.get("type") if isinstance(p, dict) else p) for n, p in passes.items() if n not in builders}
    if others or len(builders) != 1:
        what = ", ".join(f"{n} ({t})" for n, t in others.items()) or f"{len(builders)} ModelBuilder passes"
        raise _refuse(path, f"its passes {what} do not translate: the recipe renders the other passes itself "
                            "(conversion.precision int8 adds the 8-bit RTN pass, conversion.quantization.embeddings "
                            "quantizes the embedding)")
    (name, builder), = builders.items()
    options = dict(builder.get("config") or {}) if "config" in builder else {
        k: v for k, v in builder.items() if k != "type"}
    if "config" in builder and set(builder) - {"type", "config"}:
        raise _refuse(path, f"passes.{name} has options both beside and under config")
    search = options.pop("search", None) or {}
    unknown = sorted(set(search) - set(_GENERATION))
    if unknown:
        raise _refuse(path, f"passes.{name}.search.{unknown[0]} has no recipe equivalent (generation keys: "
                            f"{', '.join(_GENERATION)})")
    notes.append(f"passes.{name} (ModelBuilder) → conversion")
    return {"type": "ModelBuilder", "config": options}, dict(search)


def _name(output_dir: Any, path: Path, notes: list[str]) -> str:
    raw = Path(str(output_dir)).name if output_dir else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:64] or "olive-model"
    if output_dir:
        notes.append(f"output_dir {output_dir!r} → name and foundry.name {name!r} (outputs go to build/{name}/ and "
                     "the Foundry cache)")
    else:
        notes.append(f"no output_dir: name and foundry.name {name!r} from the file name")
    return name
