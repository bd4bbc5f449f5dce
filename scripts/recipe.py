"""Recipes: one JSON file per deployment, validated on load.

A recipe says where the model comes from, which prompt family it uses, how to convert and quantize it,
what to call it in Foundry Local, its generation defaults, and the evaluation set that proves it works.
Relative paths inside a recipe are relative to the recipe file.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import settings
from .errors import RecipeError
from .schema import Field, Obj, in_range, validate

log = logging.getLogger(__name__)

DEMO_SOURCE = "demo"
PRECISIONS = ("int4", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)
INT4_ALGORITHMS = ("default", "rtn", "k_quant_mixed", "k_quant_last")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _name_check(value: str) -> str | None:
    return None if _NAME.match(value) else (
        f"{value!r} is not a valid name; use letters, digits, '.', '_' or '-' (max 64), starting with a letter or digit")


def _families() -> tuple[str, ...]:
    from .families import family_names  # late import: families read template data files
    return ("auto", *family_names())


SCHEMA = Obj({
    "name": Field(str, check=_name_check, help="recipe name; defaults to the file name"),
    "description": Field(str, default=""),
    "model": Obj({
        "source": Field(str, required=True,
                        help=f"a Hugging Face model folder, or {DEMO_SOURCE!r} for the bundled fine-tuned demo model"),
        "family": Field(str, default="auto", help="prompt-format family, or 'auto' to detect from config.json"),
    }, required=True),
    "conversion": Obj({
        "precision": Field(str, default="int4", choices=PRECISIONS),
        "quantization": Obj({
            "block_size": Field(int, default=32, choices=BLOCK_SIZES),
            "symmetric": Field(bool, default=True),
            "accuracy_level": Field(int, default=4, choices=(0, 1, 2, 3, 4),
                                    help="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"),
            "algorithm": Field(str, default="default", choices=INT4_ALGORITHMS),
        }),
    }),
    "foundry": Obj({
        "publisher": Field(str, default="slmops", check=_name_check),
        "name": Field(str, required=True, check=_name_check, help="the model name shown by Foundry Local"),
        "version": Field(str, default="1", check=lambda v: None if v.isdigit() else
                         f"{v!r} is not a valid version; Foundry Local model versions are whole numbers like \"1\""),
        "description": Field(str, default=""),
    }, required=True),
    "generation": Obj({
        "max_length": Field(int, default=512, check=in_range(8, 131072)),
        "do_sample": Field(bool, default=False),
        "temperature": Field(float, default=1.0, check=in_range(0.0, 2.0)),
        "top_p": Field(float, default=1.0, check=in_range(0.0, 1.0)),
        "top_k": Field(int, default=50, check=in_range(0, 100000)),
        "repetition_penalty": Field(float, default=1.0, check=in_range(0.5, 2.0)),
    }),
    "eval": Obj({
        "dataset": Field(str, default=None, help="JSONL of {question, answer} pairs"),
        "min_accuracy": Field(float, default=0.9, check=in_range(0.0, 1.0)),
        "max_new_tokens": Field(int, default=64, check=in_range(1, 4096)),
        "system_prompt": Field(str, default=None),
    }),
})


@dataclass(frozen=True)
class Quantization:
    block_size: int
    symmetric: bool
    accuracy_level: int
    algorithm: str


@dataclass(frozen=True)
class Conversion:
    precision: str
    quantization: Quantization


@dataclass(frozen=True)
class FoundryTarget:
    publisher: str
    name: str
    version: str
    description: str

    @property
    def model_id(self) -> str:
        """The id the Foundry Local runtime knows the model by (``name:version``)."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Generation:
    max_length: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(frozen=True)
class EvalSpec:
    dataset: Path | None
    min_accuracy: float
    max_new_tokens: int
    system_prompt: str | None


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    source: str  # DEMO_SOURCE or an absolute folder path
    family: str
    conversion: Conversion
    foundry: FoundryTarget
    generation: Generation
    eval: EvalSpec

    @property
    def uses_demo_model(self) -> bool:
        return self.source == DEMO_SOURCE

    def settings_for_hash(self) -> dict[str, Any]:
        """Everything that determines build outputs, as plain JSON data."""
        data = asdict(self)
        data.pop("path")
        return json.loads(json.dumps(data, default=str))


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
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
                          "Fix the syntax (a trailing comma or a missing quote is the usual cause).") from exc
    return parse_recipe(doc, path, model_path)


def parse_recipe(doc: Any, path: Path, model_path: str | Path | None = None) -> Recipe:
    """Validate a recipe document already read from ``path``."""
    schema = Obj({**SCHEMA.fields, "model": Obj({**SCHEMA.fields["model"].fields,
                                                 "family": Field(str, default="auto", choices=_families())},
                                                required=True)})
    data, problems = validate(doc, schema)
    if problems:
        lines = "\n".join(f"  - {p.path}: {p.problem}" for p in problems)
        raise RecipeError(f"{path}: the recipe has {len(problems)} problem(s):\n{lines}\n"
                          "Fix these keys in the recipe file (see recipes/README.md for every key).")
    source = str(model_path) if model_path is not None else data["model"]["source"]
    source = _resolve_source(source, path, from_override=model_path is not None)
    conv = data["conversion"]
    ev = data["eval"]
    dataset = (path.parent / ev["dataset"]).resolve() if ev["dataset"] else None
    if dataset is not None and not dataset.is_file():
        raise RecipeError(f"{path}: eval.dataset: {dataset} does not exist. Point it at a JSONL file of "
                          "{\"question\": ..., \"answer\": ...} lines, relative to the recipe file.")
    return Recipe(
        name=data["name"] or path.stem,
        path=path,
        description=data["description"],
        source=source,
        family=data["model"]["family"],
        conversion=Conversion(conv["precision"], Quantization(**conv["quantization"])),
        foundry=FoundryTarget(**data["foundry"]),
        generation=Generation(**data["generation"]),
        eval=EvalSpec(dataset, ev["min_accuracy"], ev["max_new_tokens"], ev["system_prompt"]),
    )


def _resolve_source(source: str, recipe_file: Path, from_override: bool) -> str:
    if source == DEMO_SOURCE and not from_override:
        return DEMO_SOURCE
    folder = Path(source).expanduser()
    if not folder.is_absolute():
        folder = (Path.cwd() if from_override else recipe_file.parent) / folder
    folder = folder.resolve()
    if not folder.is_dir():
        where = "--model-path" if from_override else f"{recipe_file}: model.source"
        raise RecipeError(f"{where}: model folder {folder} does not exist. Point it at a Hugging Face model "
                          f"folder (config.json, weights, tokenizer), or use {DEMO_SOURCE!r} for the demo model.")
    return str(folder)
