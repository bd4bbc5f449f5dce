"""The llama.cpp peer's copies of the model: GGUF files built from the same Hugging Face folder the chain converts
with Olive, so both runtimes start from the same weights.

| type | how it is made |
|---|---|
| ``f32`` | llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` on the Hugging Face folder (the weights, unchanged) |
| ``f16`` | the same with ``--outtype f16`` |
| ``q4_0``, ``q4_k_m`` | ``llama_cpp.llama_model_quantize`` from the F32 GGUF (llama.cpp's own quantizer, as ``llama-quantize``; a
  tensor whose rows do not divide into the type's blocks gets llama.cpp's fallback type) |

Each file is a Make-style step (``gguf-<type>``, stamps in ``<out>/stamps``): skipped when the Hugging Face folder
(by content), the pinned llama-cpp-python and this code are unchanged. Conversion and quantization run in worker
processes (:mod:`scripts.core.workers`): torch and llama.cpp never load in the caller.

The converter identifies a BPE tokenizer's pre-tokenizer by hashing the tokens of a test string, so it refuses a
vocabulary it has not seen (the demo model's own BPE). When the hash is unknown but ``tokenizer.json``'s
pre-tokenization regex is exactly one llama.cpp implements (:data:`KNOWN_PRE_TOKENIZERS`), that name is used and
the build says so; likewise a plain byte-level BPE (GPT-2's regex) is ``gpt-2``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.errors import PeerError
from scripts.peers.converter_source import CONVERTER, ensure_converter
from scripts.sources.demo_tokenizer import QWEN2_PRETOKENIZE_REGEX
from scripts.core.steps import Step, StepRunner
from scripts.core.workers import run_in_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufType:
    """One GGUF build: made by the converter (``outtype``) or by quantizing the base file (``ftype``, the name of
    a ``llama_cpp.LLAMA_FTYPE_*`` constant)."""

    name: str
    label: str
    outtype: str | None = None
    ftype: str | None = None


GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType("f32", "F32", outtype="f32"),
    "f16": GgufType("f16", "F16", outtype="f16"),
    "q4_0": GgufType("q4_0", "Q4_0", ftype="LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_k_m": GgufType("q4_k_m", "Q4_K_M", ftype="LLAMA_FTYPE_MOSTLY_Q4_K_M"),
}
BASE = "f32"  # quantized from the unchanged weights
DEFAULT_QUANTS = ("q4_0", "q4_k_m")
CODE = ["scripts.peers.gguf_build"]

#: Pre-tokenization regexes (``tokenizer.json`` ``pre_tokenizer`` Split patterns) → llama.cpp's pre-tokenizer name.
KNOWN_PRE_TOKENIZERS: dict[str, str] = {QWEN2_PRETOKENIZE_REGEX: "qwen2"}


def gguf_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"model-{name}.gguf"


def check_types(names: Sequence[str]) -> list[str]:
    """``names`` as GGUF type keys; an unknown one is a :class:`PeerError` listing the valid ones."""
    bad = [n for n in names if n not in GGUF_TYPES]
    if bad:
        raise PeerError(f"Unknown GGUF type(s) {', '.join(map(repr, bad))}; choose from: {', '.join(GGUF_TYPES)}.")
    return list(dict.fromkeys(names))


def plan_steps(hf_dir: Path, out_dir: Path, names: Sequence[str], version: str, threads: int,
               converter: Callable[[], Path]) -> list[Step]:
    """The steps that build ``names`` (plus the base file they are quantized from) under ``out_dir``. Pure: nothing
    runs until a step does. ``converter`` returns the converter's folder (downloaded on first use)."""
    names = check_types(names)
    needed = [n for n in names if GGUF_TYPES[n].outtype] + ([BASE] if any(GGUF_TYPES[n].ftype for n in names) else [])
    steps: list[Step] = []
    for name in dict.fromkeys(needed):
        t, out = GGUF_TYPES[name], gguf_path(out_dir, name)
        steps.append(Step(f"gguf-{name}", _convert_body(converter, hf_dir, out, t.outtype), inputs=[Path(hf_dir)],
                          settings={"outtype": t.outtype, "llama-cpp-python": version}, outputs=[out], code=CODE))
    base = gguf_path(out_dir, BASE)
    for name in names:
        t, out = GGUF_TYPES[name], gguf_path(out_dir, name)
        if t.ftype:
            steps.append(Step(f"gguf-{name}", _quantize_body(base, out, t.ftype, threads), inputs=[base],
                              settings={"ftype": t.ftype, "llama-cpp-python": version}, outputs=[out], code=CODE))
    return steps


def _convert_body(converter: Callable[[], Path], hf_dir: Path, out: Path, outtype: str) -> Callable[[], dict]:
    def body() -> dict:
        request = {"converter_dir": str(converter()), "hf_dir": str(hf_dir), "outfile": str(out), "outtype": outtype}
        return run_in_worker("scripts.peers.gguf_build:hf_to_gguf_job", request, error=PeerError,
                             what=f"converting {hf_dir} to GGUF ({outtype}) with llama.cpp's converter")
    return body


def _quantize_body(base: Path, out: Path, ftype: str, threads: int) -> Callable[[], dict]:
    def body() -> dict:
        request = {"source": str(base), "outfile": str(out), "ftype": ftype, "threads": threads}
        return run_in_worker("scripts.peers.gguf_build:quantize_job", request, error=PeerError,
                             what=f"quantizing {base.name} to {ftype} with llama.cpp")
    return body


def build_ggufs(hf_dir: Path, out_dir: Path, names: Sequence[str], version: str, threads: int,
                announce: Callable[[str], None] = log.info, force: bool = False,
                downloads: Path | None = None) -> dict[str, Path]:
    """Build (or reuse) the GGUF files ``names`` of ``hf_dir`` in ``out_dir``; return their paths by type.
    ``downloads``: where the converter's sdist is kept (default ``<build>/downloads``)."""
    runner = StepRunner(Path(out_dir) / "stamps", force=force, announce=announce)
    for step in plan_steps(hf_dir, out_dir, names, version, threads, lambda: ensure_converter(version, downloads)):
        runner.run(step)
    return {n: gguf_path(out_dir, n) for n in check_types(names)}


# ----- pre-tokenizer recognition (pure) -----------------------------------------------------------------------------
def split_regexes(node: Any) -> list[str]:
    """Every ``Split`` regex pattern in a ``tokenizer.json`` ``pre_tokenizer`` (nested ``Sequence``s included)."""
    if not isinstance(node, dict):
        return []
    found = []
    if node.get("type") == "Split" and isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"]:
        found.append(node["pattern"]["Regex"])
    for child in node.get("pretokenizers") or []:
        found += split_regexes(child)
    return found


def _byte_level_regex(node: Any) -> bool:
    """A ``ByteLevel`` pre-tokenizer that splits with its built-in (GPT-2) regex, alone or in a ``Sequence``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel":
        return node.get("use_regex", True) is not False
    return any(_byte_level_regex(child) for child in node.get("pretokenizers") or [])


def pre_tokenizer_by_regex(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenization, when it is exactly one regex llama.cpp implements:
    one known ``Split`` regex (then byte-level encoding without a second regex), or ByteLevel's own GPT-2 regex."""
    node = tokenizer_json.get("pre_tokenizer")
    regexes = split_regexes(node)
    if len(regexes) == 1 and not _byte_level_regex(node):
        return KNOWN_PRE_TOKENIZERS.get(regexes[0])
    return "gpt-2" if not regexes and _byte_level_regex(node) else None


# ----- worker side ---------------------------------------------------------------------------------------------------
def _install_pre_tokenizer_fallback(text_model: type, notes: list[str]) -> None:
    original = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            name = pre_tokenizer_by_regex(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
            if name is None:
                raise PeerError(f"llama.cpp's converter does not recognise the pre-tokenizer of {self.dir_model} (an "
                                "unknown vocabulary hash) and its tokenizer.json regex is not one llama.cpp implements: "
                                "the llama.cpp peer cannot build this model.") from None
            notes.append(f"pre-tokenizer {name!r}: the converter did not know this vocabulary; tokenizer.json's "
                         f"pre-tokenization regex is exactly llama.cpp's {name!r}")
            log.warning("%s", notes[-1])
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def hf_to_gguf_job(request: dict) -> dict:
    """Worker: run llama.cpp's ``convert_hf_to_gguf.py`` (imported from ``converter_dir``) on ``hf_dir``."""
    import importlib
    os.environ.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py (see scripts.peers.converter_source)
    if "gguf" in sys.modules:
        raise PeerError("The pinned gguf package is already imported in this worker; the converter needs its own.")
    sys.path.insert(0, request["converter_dir"])
    converter = importlib.import_module(Path(CONVERTER).stem)
    notes: list[str] = []
    _install_pre_tokenizer_fallback(importlib.import_module("conversion.base").TextModel, notes)
    out = Path(request["outfile"])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    argv, sys.argv = sys.argv, [CONVERTER, request["hf_dir"], "--outfile", str(partial),
                                "--outtype", request["outtype"]]
    try:
        converter.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise PeerError(f"llama.cpp's converter stopped (exit {exc.code}) on {request['hf_dir']}; its log says "
                            "why (an architecture it does not support is the usual cause).") from None
    finally:
        sys.argv = argv
    if not partial.is_file():
        raise PeerError(f"llama.cpp's converter wrote no file for {request['hf_dir']}.")
    os.replace(partial, out)
    return {"file": str(out), "bytes": out.stat().st_size, "notes": notes}


def quantize_job(request: dict) -> dict:
    """Worker: ``llama_cpp.llama_model_quantize`` ``source`` → ``outfile`` with the named ``LLAMA_FTYPE_*``."""
    import ctypes
    import llama_cpp
    out = Path(request["outfile"])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, request["ftype"])
    params.nthread = int(request.get("threads") or 0)
    code = llama_cpp.llama_model_quantize(request["source"].encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise PeerError(f"llama.cpp could not quantize {request['source']} to {request['ftype']} (code {code}).")
    os.replace(partial, out)
    return {"file": str(out), "bytes": out.stat().st_size}
