"""The layouts `invoke tune` and `--precision auto` search, and the choice between them (pure).

A *layout* is a named set of conversion keys: the precision, how a GGUF's blocks and a LoRA adapter are carried
(``gguf``, ``adapter``, ``adapter_bits``) and the ``conversion.quantization`` keys. Keys a candidate does not set take
the schema's defaults — never the recipe's — so a candidate means the same layout whatever the recipe says.

- :data:`GRID` (`invoke tune`): INT4 re-quantization layouts, plain and with weight groups kept at 8 bits;
- :func:`auto_candidates` (`--precision auto`): INT8 and the grid, plus, where the model has them, the GGUF's own
  blocks carried exactly (:mod:`scripts.convert.gguf_exact`) and the adapter kept as a branch at each width or merged;
- the choice (:class:`Policy`): tune's :data:`FASTEST`, ``--precision auto``'s :data:`SMALLEST` (then fastest).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

from scripts.core.errors import RecipeError
from scripts.recipe.spec import Conversion, default_quantization, Quantization, section

#: The conversion keys (besides ``quantization``) a candidate may set; the others (fidelity, thresholds, KV cache,
#: graph options) are the recipe's.
LAYOUT_KEYS = ("precision", "gguf", "adapter", "adapter_bits")
#: Sizes within this fraction of the smallest qualifying layout count as equally small: the fastest of them wins.
SIZE_BAND = 0.05

_ALL8 = ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
_REQ = {"gguf": "requantize", "block_size": 32, "embeddings": True}

#: `invoke tune`'s search: plain INT4 layouts, then more and more weight groups kept at 8 bits (most sensitive first).
#: A GGUF source's dequantized weights are quantized again (``gguf: "requantize"``).
GRID: tuple[dict[str, Any], ...] = (
    {"name": "int4-b32-sym", **_REQ, "symmetric": True},
    {"name": "int4-b32-asym", **_REQ, "symmetric": False},
    {"name": "int4-b128-sym", **_REQ, "block_size": 128, "symmetric": True},
    {"name": "mixed-head-down8", **_REQ, "symmetric": False, "eight_bit": ["lm_head", "down_proj"]},
    {"name": "mixed-head-qkv-up-down8", **_REQ, "symmetric": False,
     "eight_bit": ["lm_head", "qkv_proj", "up_proj", "down_proj"]},
    {"name": "mixed-gate4", **_REQ, "symmetric": False, "eight_bit": [k for k in _ALL8 if k != "gate_proj"]},
    {"name": "mixed-o4", **_REQ, "symmetric": False, "eight_bit": [k for k in _ALL8 if k != "o_proj"]},
    # every projection at 8 bits: block_size then applies to the 4-bit embedding table only
    {"name": "mixed-all8-emb4", **_REQ, "block_size": 64, "symmetric": False, "eight_bit": _ALL8},
)


def auto_candidates(gguf_blocks: bool, adapter: bool) -> list[dict[str, Any]]:
    """What ``--precision auto`` measures for a model (pure): INT8, every :data:`GRID` layout; with a GGUF source whose
    matrices are all in carried block types, its blocks exactly (ONNX Runtime's FP32 and int8-activation kernels); with
    an adapter (``model.adapter``/``model.finetune``), the exact base with the branch at 8 and 32 bits, and the grid's
    plain layouts with the adapter merged as well as branched (the schema's default)."""
    out: list[dict[str, Any]] = [{"name": "int8", "precision": "int8"}]
    if gguf_blocks:
        widths = (8, 32) if adapter else (32,)
        for level in (1, 4):
            for bits in widths:
                suffix = f"-branch{bits}" if adapter else ""
                out.append({"name": f"exact-l{level}{suffix}", "gguf": "exact", "accuracy_level": level,
                            **({"adapter_bits": bits} if adapter else {})})
    out += [{**c, "adapter": "branch"} if adapter else dict(c) for c in GRID]
    if adapter:
        out += [{**c, "name": f"{c['name']}-merged", "adapter": "merge"} for c in GRID if "eight_bit" not in c]
    return out


def _keys_doc() -> str:
    return ", ".join([*LAYOUT_KEYS, *asdict(default_quantization())])


def candidate_quantization(candidate: dict[str, Any]) -> Quantization:
    """A candidate's ``conversion.quantization``: its keys over the schema defaults. Unknown keys are a
    :class:`RecipeError`."""
    base = default_quantization()
    keys = {k: v for k, v in candidate.items() if k != "name" and k not in LAYOUT_KEYS}
    unknown = sorted(set(keys) - set(asdict(base)))
    if unknown:
        raise RecipeError(f"candidate {candidate.get('name')!r}: {unknown[0]!r} is not a layout key; valid keys: "
                          f"{_keys_doc()}")
    return replace(base, **keys)


def candidate_conversion(conversion: Conversion, candidate: dict[str, Any]) -> Conversion:
    """``conversion`` (the recipe's: fidelity, thresholds, KV cache, graph options) with the candidate's layout: its
    :data:`LAYOUT_KEYS` over the schema defaults (precision INT4) and :func:`candidate_quantization`. A value the
    schema does not allow is a :class:`RecipeError`."""
    fields = section("conversion").fields
    layout = {k: fields[k].default for k in LAYOUT_KEYS}
    for key in LAYOUT_KEYS:
        if key in candidate:
            allowed = fields[key].choices
            if allowed is not None and candidate[key] not in allowed:
                raise RecipeError(f"candidate {candidate.get('name')!r}: {key} {candidate[key]!r} is not allowed; "
                                  f"choose one of: {', '.join(map(repr, allowed))}")
            layout[key] = candidate[key]
    if layout["precision"] == "auto":
        raise RecipeError(f"candidate {candidate.get('name')!r}: precision 'auto' is what searches the layouts; give "
                          "fp32, int8 or int4.")
    return replace(conversion, quantization=candidate_quantization(candidate), **layout)


def layout_keys(candidate: dict[str, Any]) -> dict[str, Any]:
    """The ``conversion`` block that builds ``candidate``, every layout key written out (to paste into a recipe, and
    what ``--precision auto`` records)."""
    conv = candidate_conversion(Conversion(precision="int4"), candidate)
    q = asdict(conv.quantization)
    q["eight_bit"] = list(q["eight_bit"])
    return {**{k: getattr(conv, k) for k in LAYOUT_KEYS}, "quantization": q}


def describe(candidate: dict[str, Any]) -> str:
    """A layout in a few words for a table cell, e.g. "exact L1, branch 8-bit" or "int4 b32 asym, 8-bit: lm_head"."""
    conv = candidate_conversion(Conversion(precision="int4"), candidate)
    q = conv.quantization
    if conv.precision != "int4":
        words = [conv.precision]
    elif conv.gguf == "exact" and candidate.get("gguf") == "exact":
        words = [f"GGUF blocks exact, L{q.accuracy_level}"]
    else:
        words = [f"int4 b{q.block_size} {'sym' if q.symmetric else 'asym'}"
                 + (f", 8-bit: {', '.join(q.eight_bit)}" if q.eight_bit else "")]
    if "adapter" in candidate or "adapter_bits" in candidate:
        words.append("merged" if conv.adapter == "merge" else f"branch {conv.adapter_bits}-bit")
    return ", ".join(words)


def timed_qualifying(rows: Sequence[Any]) -> list[Any]:
    """The qualifying rows with an answer time (pure; rows as :class:`scripts.commands.tune.TuneRow`, judged)."""
    return [r for r in rows if r.qualifies and r.answer_ms is not None]


def fastest(rows: Sequence[Any]) -> Any | None:
    """`invoke tune`'s choice: the qualifying row with the shortest answer time (pure)."""
    ok = timed_qualifying(rows)
    return min(ok, key=lambda r: r.answer_ms) if ok else None


def near_smallest(rows: Sequence[Any], band: float = SIZE_BAND) -> list[Any]:
    """The qualifying rows within ``band`` of the smallest qualifying one's bytes (pure)."""
    ok = [r for r in rows if r.qualifies and r.bytes is not None]
    if not ok:
        return []
    smallest = min(r.bytes for r in ok)
    return [r for r in ok if r.bytes <= (1 + band) * smallest]


def smallest_then_fastest(rows: Sequence[Any], band: float = SIZE_BAND) -> Any | None:
    """``--precision auto``'s choice: among :func:`near_smallest`, the shortest answer time (pure)."""
    near = near_smallest(rows, band)
    return fastest(near) or (min(near, key=lambda r: r.bytes) if near else None)


@dataclass(frozen=True)
class Policy:
    """How a search chooses among the qualifying layouts, and which of them its run-off measures again."""

    name: str  # the report's files: proof/<name>.{json,md}
    choose: Callable[[Sequence[Any]], Any | None]
    finalists: Callable[[Sequence[Any]], list[Any]]
    rule: str  # the choice, in one sentence under the table


FASTEST = Policy("tune", fastest, timed_qualifying, "Chosen: the fastest that qualifies")
SMALLEST = Policy("auto", smallest_then_fastest, near_smallest,
                  f"Chosen: the smallest that qualifies, then the fastest of those within {100 * SIZE_BAND:.0f} % of "
                  "its size")
