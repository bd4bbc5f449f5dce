"""The precisions a recipe may ask for: one :class:`Precision` entry each in :data:`PRECISIONS`, from which recipe
validation (choices, refusal), the Olive workflow (:mod:`scripts.convert.olive`), the graph check
(:mod:`scripts.convert.graph_check`), ``compare``'s table and the ``--precision`` help derive. Adding a precision is
one entry here (plus any pass it needs in the Olive renderer). Also: the tutorial's recipe form translated into ours.
Pure: no I/O, no heavy imports.

| precision | how it is built (Olive workflow, CPU) | checked in the graph | tutorial's claim |
|---|---|---|---|
| ``fp32`` | ``ModelBuilder`` fp32 | no quantized node | baseline |
| ``fp16`` | refused on CPU before anything is built (see :data:`FP16_ON_CPU`) | – | × 0.5, fast, best |
| ``int8`` | ``ModelBuilder`` fp32, then ``OnnxBlockWiseRtnQuantization`` ``bits=8`` | 8-bit ``MatMulNBits`` | × 0.25 |
| ``int4`` | ``ModelBuilder`` int4 (4-bit ``MatMulNBits``) | 4-bit ``MatMulNBits`` | × 0.125 |

With ``quantization.embeddings`` the embedding table is quantized too, by ``OnnxBlockWiseRtnQuantization`` on the
embedding ``Gather`` only (``GatherBlockQuantized``, same bits and block size): without it a Qwen2.5-0.5B-shaped
INT4 model keeps its 151936×896 table in FP32 and is 0.43× its FP32 size, not 0.125×.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

FP16_ON_CPU = (
    "FP16 is for GPU targets: this deployment runs on CPU, where Olive's ModelBuilder drops an fp16 pass "
    "(\"FP16 is not supported on CPU\", no model is produced) and a builder-made FP16 model fails at generation "
    "time in ONNX Runtime GenAI (\"Shape mismatch attempting to re-use buffer\"); its maintainers do not support "
    "FP16 on CPU. Use \"int8\" (8-bit weights, close to FP32 quality) or \"int4\" (smallest, fastest) for CPU, "
    "\"fp32\" for full precision, or \"auto\" to pick the smallest precision that keeps the eval accuracy.")
AUTO = "auto"
EMBED_GATHER = "/model/embed_tokens/Gather"
LM_HEAD = "/lm_head/MatMul"
INT4_ALGORITHMS = ("default", "rtn", "k_quant_mixed", "k_quant_last")
#: Weight groups an INT4 recipe may keep at 8 bits (``quantization.eight_bit``), as the GenAI builder names them.
LAYER_KINDS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
#: A builder node name → its kind (``qkv_proj`` also covers unfused ``q_proj``/``k_proj``/``v_proj``).
_KIND_OF_NODE = re.compile(r"/(?:attn|self_attn)/(qkv_proj|q_proj|k_proj|v_proj|o_proj)/"
                           r"|/mlp/(gate_proj|up_proj|down_proj)/|^/(lm_head)/")


@dataclass(frozen=True)
class Precision:
    """One precision. ``bits``: weight bits of the ``MatMulNBits`` the graph must hold (None: float weights, no
    quantized node). ``builder``: the ``ModelBuilder`` precision. ``builder_quantizes``: the builder itself quantizes
    (its ``int4_*`` options apply). ``rtn``: where Olive's ``OnnxBlockWiseRtnQuantization`` runs after the builder —
    ``"all"`` (every MatMul, the embedding with ``quantization.embeddings``), ``"embeddings"`` (only the embedding
    Gather, when ``quantization.embeddings``) or None. ``refusal``: why it cannot be built on CPU (None: it can)."""

    name: str
    builder: str
    bits: int | None = None
    builder_quantizes: bool = False
    rtn: str | None = None
    algorithms: tuple[str, ...] = ("default",)
    tutorial: tuple[float, str, str] = (1.0, "", "")
    refusal: str | None = None


#: Smallest first: the order `invoke compare` judges them in.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("int4", builder="int4", bits=4, builder_quantizes=True, rtn="embeddings", algorithms=INT4_ALGORITHMS,
              tutorial=(0.125, "fastest", "acceptable")),
    Precision("int8", builder="fp32", bits=8, rtn="all", algorithms=("default", "rtn"),
              tutorial=(0.25, "very fast", "good")),
    Precision("fp16", builder="fp16", tutorial=(0.5, "fast", "best"), refusal=FP16_ON_CPU),
    Precision("fp32", builder="fp32", tutorial=(1.0, "baseline", "reference")),
)}
#: Names in the tutorial's table order (largest first), and smallest first.
TABLE_ORDER = ("fp32", "fp16", "int8", "int4")
BY_SIZE = tuple(PRECISIONS)
CHOICES = (*TABLE_ORDER, AUTO)
TUTORIAL_CLAIMS = {name: PRECISIONS[name].tutorial for name in TABLE_ORDER}


def get_precision(name: str) -> Precision:
    """The entry for ``name`` (``auto`` is resolved before anything is built, so it has none)."""
    if name not in PRECISIONS:
        raise KeyError(f"{name!r} is not a precision; choose one of: {', '.join(CHOICES)}")
    return PRECISIONS[name]


def layer_kind(node_name: str) -> str | None:
    """The :data:`LAYER_KINDS` entry a builder MatMul (or its quantized ``…_Q4``/``…_Q8`` node) belongs to."""
    m = _KIND_OF_NODE.search(node_name)
    if not m:
        return None
    kind = next(g for g in m.groups() if g)
    return "qkv_proj" if kind in ("q_proj", "k_proj", "v_proj") else kind


def matmul_names(kinds: Iterable[str], num_layers: int) -> list[str]:
    """The builder's float MatMul node names of ``kinds`` over ``num_layers`` decoder layers (what Olive's RTN pass
    takes as ``nodes_to_include``); both fused and unfused attention projections are named, absent ones are ignored."""
    names: list[str] = []
    for kind in kinds:
        if kind == "lm_head":
            names.append(LM_HEAD)
            continue
        where = "mlp" if kind.endswith(("gate_proj", "up_proj", "down_proj")) else "attn"
        parts = ("qkv_proj", "q_proj", "k_proj", "v_proj") if kind == "qkv_proj" else (kind,)
        names += [f"/model/layers.{i}/{where}/{part}/MatMul" for i in range(num_layers) for part in parts]
    return names


def refusal(precision: str) -> str | None:
    """Why ``precision`` cannot be built on this (CPU) target (None when it can, or for ``auto``)."""
    return PRECISIONS[precision].refusal if precision in PRECISIONS else None


# ----- the tutorial's recipe form -------------------------------------------------------------------------------
#: ``quantization_config`` keys of the tutorial (and the Olive pass keys people copy) → our quantization keys.
_TUTORIAL_QUANT_KEYS = {"block_size": "block_size", "is_symmetric": "symmetric", "accuracy_level": "accuracy_level",
                        "algorithm": "algorithm", "algo_config": "algorithm"}
_OLIVE_FLAT_KEYS = {"int4_block_size": "block_size", "int4_is_symmetric": "symmetric",
                    "int4_accuracy_level": "accuracy_level", "int4_algo_config": "algorithm"}


class TutorialFormError(ValueError):
    """The tutorial-form block has a key we cannot translate (carries the key path)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def translate_tutorial_conversion(conversion: Any) -> tuple[Any, list[str]]:
    """Turn the tutorial's ``conversion`` form into ours; return it and notes saying what was translated.

    Accepted: ``{"type": "ModelBuilder", "config": {"precision": …, "quantization_config": {"block_size": …,
    "is_symmetric": …}}}`` (``type`` optional), and the Olive pass's flat ``int4_*`` keys inside ``config``.
    Unknown keys raise :class:`TutorialFormError`: Olive would silently ignore them, we do not."""
    if not isinstance(conversion, dict) or "config" not in conversion:
        return conversion, []
    where = "conversion"
    extra = sorted(set(conversion) - {"config", "type"})
    if extra:
        raise TutorialFormError(f"{where}.{extra[0]}", "cannot be combined with the tutorial's \"config\" block; use "
                                "either {\"config\": {\"precision\": …, \"quantization_config\": {…}}} or our "
                                "\"precision\"/\"quantization\" keys, not both")
    if conversion.get("type", "ModelBuilder") != "ModelBuilder":
        raise TutorialFormError(f"{where}.type", f"{conversion['type']!r} is not supported; only \"ModelBuilder\"")
    config = conversion["config"]
    if not isinstance(config, dict):
        raise TutorialFormError(f"{where}.config", "expected an object")
    out: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in config.items():
        if key == "precision":
            out["precision"] = value
            notes.append(f"config.precision → conversion.precision = {value!r}")
        elif key == "quantization_config":
            if not isinstance(value, dict):
                raise TutorialFormError(f"{where}.config.quantization_config", "expected an object")
            for qkey, qvalue in value.items():
                if qkey not in _TUTORIAL_QUANT_KEYS:
                    raise TutorialFormError(f"{where}.config.quantization_config.{qkey}",
                                            f"unknown key; valid keys: {', '.join(_TUTORIAL_QUANT_KEYS)}")
                quant[_TUTORIAL_QUANT_KEYS[qkey]] = qvalue
                notes.append(f"config.quantization_config.{qkey} → conversion.quantization."
                             f"{_TUTORIAL_QUANT_KEYS[qkey]} = {qvalue!r} (Olive 0.13 ignores quantization_config; "
                             f"it is rendered as the pass option it really reads)")
        elif key in _OLIVE_FLAT_KEYS:
            quant[_OLIVE_FLAT_KEYS[key]] = value
            notes.append(f"config.{key} → conversion.quantization.{_OLIVE_FLAT_KEYS[key]} = {value!r}")
        else:
            valid = ["precision", "quantization_config", *_OLIVE_FLAT_KEYS]
            raise TutorialFormError(f"{where}.config.{key}", f"unknown key; valid keys: {', '.join(valid)}")
    if quant:
        out["quantization"] = quant
    return out, notes


# ----- the smallest precision that qualifies (`invoke compare`) ---------------------------------------------------
def smallest_precision(accuracies: dict[str, float | None], threshold: float,
                refused: dict[str, str] | None = None,
                fidelity_misses: dict[str, list[str]] | None = None) -> tuple[str, list[str]]:
    """The smallest precision whose eval accuracy is ≥ ``threshold`` × FP32's and that meets the recipe's fidelity
    thresholds (``fidelity_misses``: per precision, what it misses — KLD, top-1, ΔPPL vs FP32 ONNX; a precision
    absent from it was not scored), and why, one line per candidate. ``accuracies`` must hold ``fp32``."""
    refused = refused or {}
    fidelity_misses = fidelity_misses or {}
    base = accuracies.get("fp32")
    if base is None:
        raise ValueError("smallest_precision needs the FP32 eval accuracy as the reference")
    need = threshold * base
    reasons: list[str] = []
    winner = None
    for p in BY_SIZE:
        if p in refused:
            reasons.append(f"{p}: not tried ({refused[p].split(':')[0]})")
            continue
        acc = accuracies.get(p)
        if acc is None:
            reasons.append(f"{p}: not measured")
            continue
        misses = fidelity_misses.get(p, [])
        accurate = acc >= need - 1e-12
        ok = accurate and not misses
        rel = acc / base if base else 1.0
        line = (f"{p}: eval accuracy {100 * acc:.1f} % = {100 * rel:.1f} % of FP32's {100 * base:.1f} %, "
                f"{'within' if accurate else 'below'} the {100 * threshold:.0f} % threshold")
        if misses:
            line += f"; fidelity to FP32 misses: {', '.join(misses)}"
        elif p in fidelity_misses:
            line += "; fidelity to FP32 within the recipe's thresholds"
        if ok and winner is None:
            winner = p
            line += " → chosen (smallest that qualifies)"
        elif ok:
            line += " (qualifies, but larger)"
        reasons.append(line)
    return winner or "fp32", reasons
