"""The recipe's keys, each declared once: :data:`SCHEMA` (type, default, allowed values, help) and the frozen spec
dataclasses built from validated data, whose defaults come from the schema (:func:`~scripts.core.schema.defaults_from`).
Loading and cross-key checks are in :mod:`scripts.recipe.load`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from scripts.core.jsonfile import text_limit
from scripts.core.schema import defaults_from, Field, in_range, Obj
from scripts.families.registry import AUTO_TEMPLATE, family_names
from scripts.recipe.precisions import CHOICES, INT4_ALGORITHMS, LAYER_KINDS
from scripts.recipe.runtime import RuntimeSpec, SCHEMA as RUNTIME_SCHEMA
from scripts.sources.registry import DEMO, ModelSource, SOURCE_KINDS, TINY_PREFIX

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


def families() -> tuple[str, ...]:
    return ("auto", AUTO_TEMPLATE, *family_names())


#: conversion.gguf: a quantized GGUF source's blocks carried into the graph unchanged, or re-quantized.
GGUF_ROUTES = ("exact", "requantize")
#: conversion.adapter: a LoRA kept as its own branch, or merged into the weights.
ADAPTER_ROUTES = ("branch", "merge")
#: ``conversion.adapter_bits``: a branch's weights in FP32, float16 (computed in FP32) or 8-bit blocks.
BRANCH_BITS = (32, 16, 8)
#: How GroupQueryAttention stores past keys and values: the graph's float type, or int8 with calibrated scales.
KV_CACHE_TYPES = ("float", "int8")

SCHEMA = Obj({
    "name": Field(str, check=_name_check, help="recipe name; defaults to the file name"),
    "description": Field(str, default="", check=text_limit, help="free text, for people reading the recipe"),
    "model": Obj({
        "source": Field(str, required=True,
                        help=f"a Hugging Face model folder, a .gguf file, {DEMO!r} for the bundled fine-tuned demo "
                             f"model, or {TINY_PREFIX}<family> for a tiny random model of a family (built locally); "
                             f"kinds: {', '.join(SOURCE_KINDS)}"),
        "family": Field(str, default="auto",
                        help="prompt-format family (`invoke families`), 'auto' to detect it from config.json confirmed "
                             "by the tokenizer's chat template, or 'auto-template' to derive PromptTemplate from the "
                             "tokenizer's own chat template"),
        "adapter": Field(str, default=None, help="a PEFT (LoRA) adapter folder to merge into model.source before "
                         "conversion; relative to the recipe"),
        "finetune": Obj({
            "dataset": Field(str, default=None, help="JSONL question/answer pairs, or a tool-calling set (OpenAI chat "
                             "lines with tools, as eval.tools), to LoRA-fine-tune model.source on (a `finetune` step; "
                             "conversion.adapter then keeps or merges it); relative to the recipe"),
            "rank": Field(int, default=16, check=in_range(1, 512), help="LoRA rank"),
            "alpha": Field(int, default=32, check=in_range(1, 4096), help="LoRA alpha (scale = alpha / rank)"),
            "epochs": Field(int, default=8, check=in_range(1, 1000), help="passes over the dataset"),
            "lr": Field(float, default=2e-3, check=in_range(1e-7, 1.0), help="AdamW learning rate"),
            "batch_size": Field(int, default=8, check=in_range(1, 1024), help="question/answer pairs per step"),
            "seed": Field(int, default=0, help="seed of the adapter's initialisation and the data order"),
            "threads": Field(int, default=2, check=in_range(1, 256), help="torch threads while training"),
            "tool_prompt_steps": Field(int, default=40, check=in_range(0, 100000),
                                       help="tool sets only: steps on the conversations with the tool definitions "
                                            "in the prompt, after `epochs` passes without them (each ~2x the cost)"),
        }),
    }, required=True),
    "conversion": Obj({
        "precision": Field(str, default="int4", choices=CHOICES,
                           help="fp32, int8, int4 (fp16 is refused on CPU), or auto: measure the layouts (INT8, INT4 "
                                "layouts, a GGUF's blocks exact, the adapter as a branch or merged) and deploy the "
                                "smallest whose eval accuracy is within auto_threshold of FP32's and that meets "
                                "conversion.fidelity"),
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
        "kv_cache": Field(str, default="float", choices=KV_CACHE_TYPES,
                          help="the KV cache: 'float' (exact) or 'int8' (per-channel scales calibrated on text the "
                               "fidelity gate never scores; a quarter of the bytes attention reads per token: decode at "
                               "8k tokens +56 %, but ONNX Runtime 1.31's int8 attention makes prefill 1.8-3.7x "
                               "slower; measured by the gate like any quantization)"),
        "gguf": Field(str, default="exact", choices=GGUF_ROUTES,
                      help="a quantized GGUF source at int4: 'exact' carries its blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                           "Q4_K, Q5_K, Q6_K) into the graph unchanged, float offsets beside the integer kernel; "
                           "'requantize' quantizes the dequantized FP32 model again with conversion.quantization"),
        "adapter": Field(str, default="branch", choices=ADAPTER_ROUTES,
                         help="a LoRA (model.adapter or model.finetune): 'branch' keeps it as its own low-rank branch "
                              "beside each projection (never rounded onto the base's grid; model.finetune then trains "
                              "on the base as the deployed graph quantizes it); 'merge' merges it into the weights "
                              "before converting"),
        "adapter_bits": Field(int, default=32, choices=BRANCH_BITS,
                              help="conversion.adapter 'branch': the branch's weights in FP32, float16 (computed in "
                                   "FP32) or 8-bit blocks (computed with int8 activations)"),
        "fidelity": Obj({
            "max_kld": Field(float, default=0.1, check=in_range(0.0, 100.0),
                             help="mean per-token KL divergence from FP32 ONNX allowed (compare, --precision auto)"),
            "min_top1": Field(float, default=0.9, check=in_range(0.0, 1.0),
                              help="teacher-forced top-1 agreement with FP32 ONNX required"),
            "max_ppl_increase": Field(float, default=0.08, check=in_range(0.0, 100.0),
                                      help="perplexity increase over FP32 ONNX allowed, as a fraction (0.08 = 8 %)"),
            "heldout_tokens": Field(int, default=10240, check=in_range(256, 1_000_000),
                                    help="tokens of held-out text (Python's pydoc topics) the fidelity is scored on"),
            "gate": Field(bool, default=True,
                          help="every deploy scores the build against the FP32 ONNX build of the same model (on the "
                               "eval answers and the held-out text) and installs nothing below these thresholds"),
        }),
        "quantization": Obj({
            "block_size": Field(int, default=32, choices=BLOCK_SIZES,
                                help="weights per quantization block (Olive's int4_block_size)"),
            "symmetric": Field(bool, default=True, help="symmetric quantization, no zero points (int4_is_symmetric)"),
            "accuracy_level": Field(int, default=4, choices=(0, 1, 2, 3, 4),
                                    help="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"),
            "algorithm": Field(str, default="default", choices=INT4_ALGORITHMS,
                               help="int4_algo_config of the builder (int8 is always round-to-nearest)"),
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
        "publisher": Field(str, default="slmops", check=_name_check,
                           help="the folder under the Foundry cache the model is installed in"),
        "name": Field(str, required=True, check=_name_check, help="the model name shown by Foundry Local"),
        "version": Field(str, default="1", check=lambda v: None if v.isdigit() else
                         f"{v!r} is not a valid version; Foundry Local model versions are whole numbers like \"1\"",
                         help="the model version; name:version is the runtime's model id"),
        "description": Field(str, default="", check=text_limit, help="written into inference_model.json"),
        "keep_versions": Field(int, default=2, check=in_range(0, 100),
                               help="earlier installed versions kept besides the current one (invoke rollback)"),
    }, required=True),
    # Unset (None) generation keys take the family's defaults (templates/families/<name>.json "generation"),
    # then BUILTIN_GENERATION: a recipe's own value always wins.
    "generation": Obj({
        "max_length": Field(int, default=None, check=in_range(8, 131072),
                            help="prompt + reply tokens (genai_config.json search.max_length); unset: the family's "
                                 "default, else the model's whole context. Below the context it lowers "
                                 "model.context_length to it: Foundry Local goes by the context alone and sizes "
                                 "each request's KV cache for it"),
        "do_sample": Field(bool, default=None, help="sample (true) or greedy (false); unset: the family's default, "
                                                    "else greedy"),
        "temperature": Field(float, default=None, check=in_range(0.0, 2.0),
                             help="sampling temperature; unset: the family's default, else 1.0"),
        "top_p": Field(float, default=None, check=in_range(0.0, 1.0),
                       help="nucleus sampling; unset: the family's default, else 1.0"),
        "top_k": Field(int, default=None, check=in_range(0, 100000),
                       help="top-k sampling; unset: the family's default, else 50"),
        "repetition_penalty": Field(float, default=None, check=in_range(0.5, 2.0),
                                    help="unset: the family's default, else 1.0"),
    }),
    "runtime": RUNTIME_SCHEMA,  # genai_config.json session options (scripts/recipe/runtime.py)
    "eval": Obj({
        "dataset": Field(str, default=None, help="JSONL of {question, answer} pairs asked through Foundry Local "
                                                 "(`check`); relative to the recipe"),
        "tools": Field(str, default=None, help="JSONL tool-calling set (OpenAI chat lines with tools, split train/"
                                               "heldout): its held-out calls, no-call cases and agent loops (results "
                                               "given, the answer must read them back) are asked with the tools as "
                                               "`invoke serve` writes them; relative to the recipe"),
        "min_accuracy": Field(float, default=0.9, check=in_range(0.0, 1.0),
                              help="share of exact answers required, below it the deploy fails; with eval.tools also "
                                   "of the held-out calls (exact names and arguments), of the no-call cases "
                                   "(answered in text) and of the agent loops (every result value in the answer), "
                                   "each"),
        "max_new_tokens": Field(int, default=64, check=in_range(1, 4096), help="longest answer generated per question"),
        "system_prompt": Field(str, default=None, check=text_limit, help="system message sent with every eval question"),
    }),
    "validate": Obj({  # thresholds of `invoke validate` (the tutorial's checklist, measured)
        "min_reference_agreement": Field(float, default=0.9, check=in_range(0.0, 1.0),
                                         help="share of eval answers equal to the FP32 PyTorch model's"),
        "format_regex": Field(str, default=None, check=_regex_check,
                              help="regular expression every eval answer must match in full"),
        "format_json_keys": Field(list, default=None, item_type=str,
                                  help="every eval answer must be a JSON object with these keys"),
        "min_format_rate": Field(float, default=1.0, check=in_range(0.0, 1.0),
                                 help="share of answers that must have the expected format"),
        "soak_requests": Field(int, default=300, check=in_range(10, 1000000),
                               help="requests of the leak soak on one loaded model"),
        "max_rss_growth_mb": Field(float, default=32.0, check=in_range(0.0, 1e6),
                                   help="RSS growth allowed over the soak (last tenth − first tenth after warm-up)"),
        "max_rss_slope_kb_per_request": Field(float, default=16.0, check=in_range(0.0, 1e6),
                                              help="the smaller of the two soak halves' least-squares slopes"),
        "max_latency_ratio": Field(float, default=3.0, check=in_range(1.0, 1000.0),
                                   help="longest-prompt ÷ shortest-prompt median per-token latency"),
        "latency_floor_ms": Field(float, default=1.0, check=in_range(0.0, 1e6),
                                  help="per-token latencies all below this pass the length item whatever the ratio"),
        "edge_timeout_seconds": Field(float, default=120.0, check=in_range(1.0, 3600.0),
                                      help="an edge case with no reply by then is a hang (fails)"),
    }),
})


def section(*path: str) -> Obj:
    """The schema of one block of a recipe, e.g. ``section("conversion", "quantization")``."""
    obj = SCHEMA
    for key in path:
        obj = obj.fields[key]
    return obj


@dataclass(frozen=True)
@defaults_from(section("conversion", "quantization"))
class Quantization:
    block_size: int
    symmetric: bool
    accuracy_level: int
    algorithm: str
    embeddings: bool
    lm_head: bool
    eight_bit: tuple[str, ...]
    eight_bit_block_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "eight_bit", tuple(self.eight_bit))


def default_quantization() -> Quantization:
    """``conversion.quantization`` with every key at its schema default (what a recipe that sets none gets)."""
    return Quantization()


@dataclass(frozen=True)
@defaults_from(section("model", "finetune"))
class FinetuneSpec:
    """A seeded LoRA fine-tune of ``model.source`` (``model.finetune``); ``dataset`` None means none."""

    dataset: Path | None
    rank: int
    alpha: int
    epochs: int
    lr: float
    batch_size: int
    seed: int
    threads: int
    tool_prompt_steps: int

    def settings(self) -> dict[str, Any]:
        """The training settings (no paths), as the ``finetune`` step hashes and the trainer reads them."""
        return {k: v for k, v in asdict(self).items() if k != "dataset"}


@dataclass(frozen=True)
@defaults_from(section("conversion", "fidelity"))
class FidelitySpec:
    """What a quantized build must keep relative to FP32 ONNX on held-out text (``conversion.fidelity``)."""

    max_kld: float
    min_top1: float
    max_ppl_increase: float
    heldout_tokens: int
    gate: bool


@dataclass(frozen=True)
@defaults_from(section("conversion"))
class Conversion:
    precision: str
    quantization: Quantization = Quantization()
    auto_threshold: float
    fidelity: FidelitySpec = FidelitySpec()
    prune_lm_head: bool  # logits for the last position only (ModelBuilder ``prune_lm_head``)
    fold_attention_scale: bool  # scripts/convert/attention_scale.py
    kv_cache: str  # scripts/convert/kv_cache.py
    gguf: str  # a GGUF source's blocks carried exactly (scripts/convert/gguf_exact.py) or re-quantized
    adapter: str  # a LoRA kept as a branch (scripts/convert/lora_branch.py) or merged
    adapter_bits: int  # the branch's weights: FP32, float16 or 8-bit

    def reference(self) -> "Conversion":
        """The FP32 build of the same model the fidelity gate and ``compare`` measure against: float weights, float
        cache, the adapter merged (the fine-tuned model itself). Keys that only shape a quantized layout take their
        defaults, so every layout of a recipe (tune's, auto's, the deployed one) shares one reference build."""
        return replace(self, precision="fp32", kv_cache="float", adapter="merge", quantization=Quantization(),
                       gguf=section("conversion").fields["gguf"].default,
                       adapter_bits=section("conversion").fields["adapter_bits"].default)


@dataclass(frozen=True)
@defaults_from(section("foundry"))
class FoundryTarget:
    publisher: str
    name: str
    version: str
    description: str
    keep_versions: int

    @property
    def model_id(self) -> str:
        """The id the Foundry Local runtime knows the model by (``name:version``)."""
        return f"{self.name}:{self.version}"


#: Generation settings used when neither the recipe nor the model's family sets a key (greedy, 512 tokens).
BUILTIN_GENERATION: dict[str, Any] = {"max_length": 512, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                      "top_k": 50, "repetition_penalty": 1.0}


@dataclass(frozen=True)
@defaults_from(section("generation"))
class Generation:
    """Generation settings; ``None`` means "not set in the recipe" until :meth:`resolved` fills it."""

    max_length: int | None
    do_sample: bool | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None

    def resolved(self, family_defaults: dict[str, Any] | None = None, context_length: int | None = None) -> "Generation":
        """Every key filled: the recipe's value, else the family default, else the model's ``context_length`` for
        ``max_length`` (the whole context: a prompt of any length the model takes gets an answer), else
        :data:`BUILTIN_GENERATION`."""
        builtin = {**BUILTIN_GENERATION, **({"max_length": context_length} if context_length else {})}
        merged = {**builtin, **{k: v for k, v in (family_defaults or {}).items() if k in BUILTIN_GENERATION}}
        return Generation(**{k: merged[k] if v is None else v for k, v in asdict(self).items()})


@dataclass(frozen=True)
@defaults_from(section("eval"))
class EvalSpec:
    dataset: Path | None
    min_accuracy: float
    max_new_tokens: int
    system_prompt: str | None
    tools: Path | None  # a tool-calling set (scripts/core/tool_evalset.py)


@dataclass(frozen=True)
@defaults_from(section("validate"))
class ValidateSpec:
    """Thresholds of ``invoke validate`` (see the ``validate`` keys of :data:`SCHEMA`)."""

    min_reference_agreement: float
    format_regex: str | None
    format_json_keys: tuple[str, ...] | None
    min_format_rate: float
    soak_requests: int
    max_rss_growth_mb: float
    max_rss_slope_kb_per_request: float
    max_latency_ratio: float
    latency_floor_ms: float
    edge_timeout_seconds: float


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
    #: A variant build's FP32 model, made by the recipe's own pipeline (the base with its adapter merged): variants
    #: convert it, or carry the source and adapter exactly, but never merge or train again (:func:`prepared_recipe`).
    prepared: str | None = None
    notes: tuple[str, ...] = ()  # what loading did on the user's behalf (e.g. the tutorial's form translated)

    def settings_for_hash(self) -> dict[str, Any]:
        """Everything that determines build outputs, as plain JSON data."""
        data = asdict(self)
        data.pop("path")
        data.pop("notes", None)
        return json.loads(json.dumps(data, default=str))
