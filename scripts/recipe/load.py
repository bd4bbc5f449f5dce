"""Recipes: one JSON file per deployment, validated on load.

A recipe says where the model comes from, which prompt family it uses, how to convert and quantize it,
what to call it in Foundry Local, its generation defaults, and the evaluation set that proves it works.
Relative paths inside a recipe are relative to the recipe file.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from scripts.core import settings
from scripts.core.errors import RecipeError
from scripts.families.registry import AUTO_TEMPLATE, family_names
from scripts.recipe.precisions import (AUTO, CHOICES, INT4_ALGORITHMS, LAYER_KINDS, PRECISIONS, refusal,
                                       translate_tutorial_conversion, TutorialFormError)
from scripts.recipe.olive_workflow import is_olive_workflow, translate_olive_workflow
from scripts.recipe.runtime import RuntimeSpec, SCHEMA as RUNTIME_SCHEMA
from scripts.core.schema import Field, in_range, Obj, validate
from scripts.sources.registry import DEMO, ModelSource, parse_source, SOURCE_KINDS, TINY_PREFIX

log = logging.getLogger(__name__)

BLOCK_SIZES = (16, 32, 64, 128, 256)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _name_check(value: str) -> str | None:
    return None if _NAME.match(value) else (
        f"{value!r} is not a valid name; use letters, digits, '.', '_' or '-' (max 64), starting with a letter or digit")


def _regex_check(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"{value!r} is not a valid regular expression ({exc})"
    return None


def _kinds_check(value: list) -> str | None:
    unknown = [v for v in value if v not in LAYER_KINDS]
    if unknown:
        return f"{unknown[0]!r} is not a weight group; choose from: {', '.join(LAYER_KINDS)}"
    return None if len(set(value)) == len(value) else "a weight group is listed twice"


def _families() -> tuple[str, ...]:
    return ("auto", AUTO_TEMPLATE, *family_names())


#: conversion.gguf: a quantized GGUF source's blocks carried into the graph unchanged, or re-quantized.
GGUF_ROUTES = ("exact", "requantize")
#: conversion.adapter: a LoRA kept as its own branch, or merged into the weights.
ADAPTER_ROUTES = ("branch", "merge")

SCHEMA = Obj({
    "name": Field(str, check=_name_check, help="recipe name; defaults to the file name"),
    "description": Field(str, default=""),
    "model": Obj({
        "source": Field(str, required=True,
                        help=f"a Hugging Face model folder, a .gguf file, {DEMO!r} for the bundled fine-tuned demo "
                             f"model, or {TINY_PREFIX}<family> for a tiny random model of a family (built locally); "
                             f"kinds: {', '.join(SOURCE_KINDS)}"),
        "family": Field(str, default="auto", help="prompt-format family, or 'auto' to detect from config.json"),
        "adapter": Field(str, default=None, help="a PEFT (LoRA) adapter folder to merge into model.source before "
                         "conversion; relative to the recipe"),
        "finetune": Obj({
            "dataset": Field(str, default=None, help="JSONL question/answer pairs to LoRA-fine-tune model.source on "
                             "(a `finetune` step; the adapter is then merged); relative to the recipe"),
            "rank": Field(int, default=16, check=in_range(1, 512)),
            "alpha": Field(int, default=32, check=in_range(1, 4096)),
            "epochs": Field(int, default=8, check=in_range(1, 1000)),
            "lr": Field(float, default=2e-3, check=in_range(1e-7, 1.0)),
            "batch_size": Field(int, default=8, check=in_range(1, 1024)),
            "seed": Field(int, default=0),
            "threads": Field(int, default=2, check=in_range(1, 256), help="torch threads while training"),
        }),
    }, required=True),
    "conversion": Obj({
        "precision": Field(str, default="int4", choices=CHOICES,
                           help="fp32, int8, int4 (fp16 is refused on CPU), or auto: the smallest precision whose "
                                "eval accuracy is within auto_threshold of FP32's"),
        "auto_threshold": Field(float, default=0.98, check=in_range(0.0, 1.0),
                                help="--precision auto: minimum eval accuracy relative to FP32"),
        "prune_lm_head": Field(bool, default=True,
                               help="compute logits for the last prompt position only (ModelBuilder prune_lm_head): "
                                    "prefill skips the LM head for every other position (-25 to -30 % prompt time "
                                    "at 0.5B); fidelity scoring loads a copy returning every position's logits"),
        "fold_attention_scale": Field(bool, default=True,
                                      help="multiply the query projection by the attention scale and set "
                                           "GroupQueryAttention's scale to 1, where that is exact (a power of two): "
                                           "ONNX Runtime's CPU kernel then skips packing the key cache per head "
                                           "and token (decode at long context)"),
        "gguf": Field(str, default="exact", choices=GGUF_ROUTES,
                      help="a quantized GGUF source at int4: 'exact' carries its blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                           "Q4_K, Q5_K, Q6_K) into the graph unchanged, float offsets beside the integer kernel; "
                           "'requantize' quantizes the dequantized FP32 model again with conversion.quantization"),
        "adapter": Field(str, default="branch", choices=ADAPTER_ROUTES,
                         help="a LoRA (model.adapter or model.finetune): 'branch' keeps it as its own low-rank branch "
                              "beside each projection (never rounded onto the base's grid); 'merge' merges it into the "
                              "weights before converting"),
        "adapter_bits": Field(int, default=32, choices=(32, 8),
                              help="conversion.adapter 'branch': the branch's weights in FP32 or 8-bit blocks"),
        "fidelity": Obj({
            "max_kld": Field(float, default=0.1, check=in_range(0.0, 100.0),
                             help="mean per-token KL divergence from FP32 ONNX allowed (compare, --precision auto)"),
            "min_top1": Field(float, default=0.9, check=in_range(0.0, 1.0),
                              help="teacher-forced top-1 agreement with FP32 ONNX required"),
            "max_ppl_increase": Field(float, default=0.08, check=in_range(0.0, 100.0),
                                      help="perplexity increase over FP32 ONNX allowed, as a fraction (0.08 = 8 %)"),
            "heldout_tokens": Field(int, default=10240, check=in_range(256, 1_000_000),
                                    help="tokens of held-out text (Python's pydoc topics) the fidelity is scored on"),
        }),
        "quantization": Obj({
            "block_size": Field(int, default=32, choices=BLOCK_SIZES),
            "symmetric": Field(bool, default=True),
            "accuracy_level": Field(int, default=4, choices=(0, 1, 2, 3, 4),
                                    help="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"),
            "algorithm": Field(str, default="default", choices=INT4_ALGORITHMS),
            "embeddings": Field(bool, default=False,
                                help="quantize the embedding table too (GatherBlockQuantized, same bits/block size)"),
            "lm_head": Field(bool, default=True, help="quantize the LM head (false keeps it in FP32)"),
            "eight_bit": Field(list, default=(), item_type=str, check=_kinds_check,
                               help="int4 only: weight groups kept at 8 bits (mixed INT4, like llama.cpp's Q4_K_M "
                                    f"keeps some at 6): any of {', '.join(LAYER_KINDS)}"),
            "eight_bit_block_size": Field(int, default=64, choices=BLOCK_SIZES,
                                          help="block size of the 8-bit groups (symmetric)"),
        }),
    }),
    "foundry": Obj({
        "publisher": Field(str, default="slmops", check=_name_check),
        "name": Field(str, required=True, check=_name_check, help="the model name shown by Foundry Local"),
        "version": Field(str, default="1", check=lambda v: None if v.isdigit() else
                         f"{v!r} is not a valid version; Foundry Local model versions are whole numbers like \"1\""),
        "description": Field(str, default=""),
    }, required=True),
    # Unset (None) generation keys take the family's defaults (templates/families/<name>.json "generation"),
    # then BUILTIN_GENERATION: a recipe's own value always wins.
    "generation": Obj({
        "max_length": Field(int, default=None, check=in_range(8, 131072)),
        "do_sample": Field(bool, default=None),
        "temperature": Field(float, default=None, check=in_range(0.0, 2.0)),
        "top_p": Field(float, default=None, check=in_range(0.0, 1.0)),
        "top_k": Field(int, default=None, check=in_range(0, 100000)),
        "repetition_penalty": Field(float, default=None, check=in_range(0.5, 2.0)),
    }),
    "runtime": RUNTIME_SCHEMA,  # genai_config.json session options (scripts/recipe/runtime.py)
    "eval": Obj({
        "dataset": Field(str, default=None, help="JSONL of {question, answer} pairs"),
        "min_accuracy": Field(float, default=0.9, check=in_range(0.0, 1.0)),
        "max_new_tokens": Field(int, default=64, check=in_range(1, 4096)),
        "system_prompt": Field(str, default=None),
    }),
    "validate": Obj({  # thresholds of `invoke validate` (the tutorial's checklist, measured)
        "min_reference_agreement": Field(float, default=0.9, check=in_range(0.0, 1.0),
                                         help="share of eval answers equal to the FP32 PyTorch model's"),
        "format_regex": Field(str, default=None, check=_regex_check,
                              help="regular expression every eval answer must match in full"),
        "format_json_keys": Field(list, default=None, item_type=str,
                                  help="every eval answer must be a JSON object with these keys"),
        "min_format_rate": Field(float, default=1.0, check=in_range(0.0, 1.0)),
        "soak_requests": Field(int, default=300, check=in_range(10, 1000000)),
        "max_rss_growth_mb": Field(float, default=32.0, check=in_range(0.0, 1e6)),
        "max_rss_slope_kb_per_request": Field(float, default=16.0, check=in_range(0.0, 1e6)),
        "max_latency_ratio": Field(float, default=3.0, check=in_range(1.0, 1000.0),
                                   help="longest-prompt ÷ shortest-prompt median per-token latency"),
        "latency_floor_ms": Field(float, default=1.0, check=in_range(0.0, 1e6),
                                  help="per-token latencies all below this pass the length item whatever the ratio"),
        "edge_timeout_seconds": Field(float, default=120.0, check=in_range(1.0, 3600.0)),
    }),
})


@dataclass(frozen=True)
class Quantization:
    block_size: int
    symmetric: bool
    accuracy_level: int
    algorithm: str
    embeddings: bool = False
    lm_head: bool = True
    eight_bit: tuple[str, ...] = ()
    eight_bit_block_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "eight_bit", tuple(self.eight_bit))


def default_quantization() -> Quantization:
    """``conversion.quantization`` with every key at its schema default (what a recipe that sets none gets)."""
    fields = SCHEMA.fields["conversion"].fields["quantization"].fields
    return Quantization(**{key: field.default for key, field in fields.items()})


@dataclass(frozen=True)
class FinetuneSpec:
    """A seeded LoRA fine-tune of ``model.source`` (``model.finetune``); ``dataset`` None means none."""

    dataset: Path | None = None
    rank: int = 16
    alpha: int = 32
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 8
    seed: int = 0
    threads: int = 2

    def settings(self) -> dict[str, Any]:
        """The training settings (no paths), as the ``finetune`` step hashes and the trainer reads them."""
        return {k: v for k, v in asdict(self).items() if k != "dataset"}


@dataclass(frozen=True)
class FidelitySpec:
    """What a quantized build must keep relative to FP32 ONNX on held-out text (``conversion.fidelity``)."""

    max_kld: float = 0.1
    min_top1: float = 0.9
    max_ppl_increase: float = 0.08
    heldout_tokens: int = 10240


@dataclass(frozen=True)
class Conversion:
    precision: str
    quantization: Quantization
    auto_threshold: float = 0.98
    fidelity: FidelitySpec = FidelitySpec()
    prune_lm_head: bool = True  # logits for the last position only (ModelBuilder ``prune_lm_head``)
    fold_attention_scale: bool = True  # scripts/convert/attention_scale.py
    gguf: str = "exact"  # a GGUF source's blocks carried exactly (scripts/convert/gguf_exact.py) or re-quantized
    adapter: str = "branch"  # a LoRA kept as a branch (scripts/convert/lora_branch.py) or merged
    adapter_bits: int = 32  # the branch's weights: FP32 or 8-bit


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


#: Generation settings used when neither the recipe nor the model's family sets a key (greedy, 512 tokens).
BUILTIN_GENERATION: dict[str, Any] = {"max_length": 512, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                      "top_k": 50, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Generation:
    """Generation settings; ``None`` means "not set in the recipe" until :meth:`resolved` fills it."""

    max_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    def resolved(self, family_defaults: dict[str, Any] | None = None, context_length: int | None = None) -> "Generation":
        """Every key filled: the recipe's value, else the family default, else the model's ``context_length`` for
        ``max_length`` (the whole context: a prompt of any length the model takes gets an answer), else
        :data:`BUILTIN_GENERATION`."""
        builtin = {**BUILTIN_GENERATION, **({"max_length": context_length} if context_length else {})}
        merged = {**builtin, **{k: v for k, v in (family_defaults or {}).items() if k in BUILTIN_GENERATION}}
        return Generation(**{k: merged[k] if v is None else v for k, v in asdict(self).items()})


@dataclass(frozen=True)
class EvalSpec:
    dataset: Path | None
    min_accuracy: float
    max_new_tokens: int
    system_prompt: str | None


@dataclass(frozen=True)
class ValidateSpec:
    """Thresholds of ``invoke validate`` (see the ``validate`` keys of :data:`SCHEMA`)."""

    min_reference_agreement: float = 0.9
    format_regex: str | None = None
    format_json_keys: tuple[str, ...] | None = None
    min_format_rate: float = 1.0
    soak_requests: int = 300
    max_rss_growth_mb: float = 32.0
    max_rss_slope_kb_per_request: float = 16.0
    max_latency_ratio: float = 3.0
    latency_floor_ms: float = 1.0
    edge_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    source: ModelSource  # parsed model.source (or --model-path): kind, folder, build step
    family: str
    conversion: Conversion
    foundry: FoundryTarget
    generation: Generation
    eval: EvalSpec
    validate: ValidateSpec = ValidateSpec()
    adapter: str | None = None  # absolute path of a PEFT adapter folder merged into ``source`` before conversion
    finetune: FinetuneSpec = FinetuneSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    notes: tuple[str, ...] = ()  # what loading did on the user's behalf (e.g. the tutorial's form translated)

    def settings_for_hash(self) -> dict[str, Any]:
        """Everything that determines build outputs, as plain JSON data."""
        data = asdict(self)
        data.pop("path")
        data.pop("notes", None)
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
    return Recipe(
        name=data["name"] or path.stem,
        path=path,
        description=data["description"],
        source=source,
        family=data["model"]["family"],
        conversion=_conversion(conv, path),
        foundry=FoundryTarget(**data["foundry"]),
        generation=Generation(**data["generation"]),
        eval=EvalSpec(dataset, ev["min_accuracy"], ev["max_new_tokens"], ev["system_prompt"]),
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
    return Conversion(conv["precision"], Quantization(**conv["quantization"]), conv["auto_threshold"],
                      FidelitySpec(**conv["fidelity"]), conv["prune_lm_head"], conv["fold_attention_scale"],
                      conv["gguf"], conv["adapter"], conv["adapter_bits"])


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
                          "of {\"question\": ..., \"answer\": ...} lines, relative to the recipe file.")
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
