"""Convert a Hugging Face model to ONNX Runtime GenAI format with Olive, from the recipe.

The recipe's quantization options are rendered under the keys Olive 0.13's ModelBuilder pass really reads
(``int4_block_size``, ``int4_is_symmetric``, ``int4_accuracy_level``, ``int4_algo_config``); the tutorial's
``quantization_config`` block is silently ignored by Olive, so we never emit it. INT8 and quantized embeddings
add Olive's ``OnnxBlockWiseRtnQuantization`` pass to the same workflow (see :mod:`scripts.recipe.precisions`).
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from scripts.core.errors import ConversionError
from scripts.core.faults import checkpoint
from scripts.recipe.spec import Conversion
from scripts.recipe.precisions import EMBED_GATHER, get_precision, LM_HEAD, matmul_names, PRECISIONS
from scripts.core.workers import die_with_parent, worker_env

log = logging.getLogger(__name__)

REQUIRED_OUTPUTS = ("model.onnx", "genai_config.json")

# Known causes in Olive / builder logs and what the user can do about each.
_HINTS: tuple[tuple[str, str], ...] = (
    (r"cannot reshape array of size \d+ into shape", "this block size / symmetry / algorithm combination does not "
     "fit the model's layer shapes in ONNX Runtime's quantizer; use a smaller block size or symmetric=true"),
    (r"FP16 is not supported on CPU", "FP16 needs a GPU execution provider; use int4 or fp32 for CPU"),
    (r"KeyError: <Precision\.INT8", "the GenAI model builder has no int8 precision in this version"),
    (r"Hugging Face details not found in extra_options|quantized_model",
     "onnxruntime-genai does not match olive-ai 0.13; run `invoke setup` to restore the pinned versions"),
    (r"No module named '([\w.]+)'", "a Python package is missing; run `invoke setup`"),
    (r"(?i)out of memory|MemoryError|Killed", "the machine ran out of memory; close other programs or use a "
     "machine with more RAM (see `invoke doctor`)"),
)


def exact_base(conversion: Conversion) -> Conversion:
    """The builder settings under a graph whose weights :mod:`scripts.convert.gguf_exact` replaces with a GGUF's
    blocks: INT4, block 32, symmetric round-to-nearest, one shared quantized table for the embedding and a tied LM
    head (``shared_embeddings``); only the recipe's accuracy level and graph options are kept."""
    q = replace(conversion.quantization, block_size=32, symmetric=True, algorithm="rtn", embeddings=False,
                lm_head=True, eight_bit=())
    return replace(conversion, precision="int4", quantization=q)


def olive_config(conversion: Conversion, model_dir: Path, output_dir: Path, cache_dir: Path,
                 search: dict[str, Any] | None = None, shared_embeddings: bool = False) -> dict[str, Any]:
    """The Olive workflow on CPU for a recipe's conversion settings, rendered from the precision's registry entry
    (:data:`scripts.recipe.precisions.PRECISIONS`):

    - a ``ModelBuilder`` pass at the entry's builder precision (its ``int4_*`` options when the builder quantizes);
    - ``rtn == "all"`` (int8): ``OnnxBlockWiseRtnQuantization`` with the entry's bits on every MatMul;
    - ``rtn == "embeddings"`` (int4) with ``quantization.embeddings``: the same pass on the embedding Gather only.

    The recipe loader refuses what cannot run on CPU (fp16), and ``auto`` is resolved before converting; a
    conversion that still carries one is a :class:`ConversionError` here, before Olive runs."""
    if conversion.precision not in PRECISIONS:
        raise ConversionError(f"conversion.precision {conversion.precision!r} reached the converter unresolved "
                              "(`--precision auto` measures the candidates first).")
    precision = get_precision(conversion.precision)
    if precision.refusal:
        raise ConversionError(f"conversion.precision {precision.name!r} refused before building. {precision.refusal}")
    q = conversion.quantization
    mixed = precision.builder_quantizes and bool(q.eight_bit)
    builder: dict[str, Any] = {"type": "ModelBuilder", "precision": "fp32" if mixed else precision.builder}
    passes: dict[str, Any] = {"builder": builder}
    if mixed:
        passes.update(_mixed_passes(q, num_layers(model_dir)))
    elif precision.builder_quantizes:
        builder.update({
            "int4_block_size": q.block_size,
            "int4_is_symmetric": q.symmetric,
            "int4_accuracy_level": q.accuracy_level,
        })
        if q.algorithm != "default":
            builder["int4_algo_config"] = q.algorithm
        if not q.lm_head:
            builder["int4_nodes_to_exclude"] = [LM_HEAD]
    # Logits for the last position only: prefill then runs the LM head once, not once per prompt token.
    builder["extra_options"] = {"prune_lm_head": conversion.prune_lm_head}
    if precision.bits:
        # Embedding and LM head as separate tables: a tied fp32 embedding would otherwise survive (as the input of a
        # Transpose) next to its quantized LM-head copy. Deterministic across builder versions. ``shared_embeddings``
        # (the exact GGUF route, with rtn): one quantized table read by GatherBlockQuantized and the LM head.
        builder["extra_options"]["shared_embeddings"] = shared_embeddings
    rtn: dict[str, Any] = {"type": "OnnxBlockWiseRtnQuantization", "bits": precision.bits or 4,
                           "block_size": q.block_size, "is_symmetric": q.symmetric, "accuracy_level": q.accuracy_level}
    if precision.rtn == "all":
        exclude = ([] if q.embeddings else [EMBED_GATHER]) + ([] if q.lm_head else [LM_HEAD])
        passes[f"rtn{precision.bits}"] = {**rtn, **({"nodes_to_exclude": exclude} if exclude else {})}
    elif precision.rtn == "embeddings" and q.embeddings and not mixed:
        passes[f"embed{precision.bits}"] = {**rtn, "nodes_to_include": [EMBED_GATHER]}
    if search:
        builder["search"] = search
    return {
        "input_model": {"type": "HfModel", "model_path": str(model_dir)},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(cache_dir),
        "output_dir": str(output_dir),
        "log_severity_level": 1,
    }


def num_layers(model_dir: Path) -> int:
    """Decoder layers of the Hugging Face model (``config.json`` ``num_hidden_layers``, or its ``text_config``'s)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{model_dir}/config.json cannot be read ({exc}); quantization.eight_bit needs the "
                              "model's layer count.") from None
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ConversionError(f"{model_dir}/config.json has no num_hidden_layers; quantization.eight_bit needs the "
                              "model's layer count.")
    return layers


def _mixed_passes(q, layers: int) -> dict[str, Any]:
    """Mixed INT4 (``quantization.eight_bit``) after an FP32 builder pass: 8-bit symmetric RTN on the listed weight
    groups, 4-bit RTN (the recipe's block size and symmetry) on every other MatMul, then the embedding table."""
    common = {"type": "OnnxBlockWiseRtnQuantization", "accuracy_level": q.accuracy_level}
    kinds = [k for k in q.eight_bit if k != "lm_head" or q.lm_head]
    passes: dict[str, Any] = {"rtn8": {**common, "bits": 8, "block_size": q.eight_bit_block_size, "is_symmetric": True,
                                       "nodes_to_include": matmul_names(kinds, layers)}}
    passes["rtn4"] = {**common, "bits": 4, "block_size": q.block_size, "is_symmetric": q.symmetric,
                      "nodes_to_exclude": [EMBED_GATHER] + ([] if q.lm_head else [LM_HEAD])}
    if q.embeddings:
        passes["embed4"] = {**common, "bits": 4, "block_size": q.block_size, "is_symmetric": q.symmetric,
                            "nodes_to_include": [EMBED_GATHER]}
    return passes


def reconcile_genai_outputs(output_dir: Path) -> list[str]:
    """Point ``genai_config.json``'s decoder inputs/outputs at the graph's real names.

    Olive's block-wise RTN pass renames the output of every node it quantizes (``logits`` → ``logits_Q8`` when the
    LM head is quantized); ONNX Runtime GenAI then cannot find ``logits``. Returns the renames made."""
    import onnx

    cfg_path = Path(output_dir) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    decoder = cfg["model"]["decoder"]
    graph = onnx.load(str(Path(output_dir) / decoder.get("filename", "model.onnx")), load_external_data=False).graph
    names = {v.name for v in list(graph.output) + list(graph.input)}
    changes = []
    for section in ("inputs", "outputs"):
        for key, value in (decoder.get(section) or {}).items():
            if isinstance(value, str) and "%" not in value and value not in names:
                match = next((n for n in sorted(names) if re.fullmatch(re.escape(value) + r"_Q\d+", n)), None)
                if match:
                    decoder[section][key] = match
                    changes.append(f"{section}.{key}: {value} → {match}")
    if changes:
        cfg_path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
        log.info("genai_config.json updated to the graph's names: %s", "; ".join(changes))
    return changes


def explain_failure(log_text: str) -> str:
    """The most useful lines of a failed Olive run: the final exception, any ERROR lines, and a hint."""
    lines = [line.rstrip() for line in log_text.splitlines() if line.strip()]
    exception = next((line.strip() for line in reversed(lines)
                      if re.match(r"^\s*[\w.]*(Error|Exception|Interrupt)\b.*", line)), None)
    errors = [re.sub(r"^\[.*?\]\s*\[ERROR\]\s*\[.*?\]\s*", "", line) for line in lines if "[ERROR]" in line]
    cause = exception or (errors[-1] if errors else None) or (lines[-1] if lines else "no output at all")
    hint = next((advice for pattern, advice in _HINTS if re.search(pattern, log_text)), None)
    return cause + (f"\nLikely fix: {hint}." if hint else "")


def run_olive(config: dict[str, Any], workdir: Path, progress: Any = None) -> Path:
    """Run ``olive run --config`` in a subprocess; return the output folder or raise :class:`ConversionError`.

    Olive may exit 0 after a failed pass ("No output model produced"), so success is judged by the files."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "olive_config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log_path = workdir / "olive.log"
    env = worker_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    # olive, with the builder's expectations of transformers configs met (scripts/convert/builder_compat.py)
    cmd = [sys.executable, "-m", "scripts.convert.builder_compat", "run", "--config", str(config_path)]
    log.info("Running %s (log: %s)", " ".join(cmd), log_path)
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                preexec_fn=die_with_parent())
        checkpoint("convert:olive-running")
        while proc.poll() is None:
            if progress is not None:
                progress(f"Olive ({' → '.join(config['passes'])}) running… {time.perf_counter() - start:.0f} s")
            time.sleep(0.5)
    output_dir = Path(config["output_dir"])
    missing = [name for name in REQUIRED_OUTPUTS if not (output_dir / name).is_file()]
    if proc.returncode != 0 or missing:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        status = f"exit status {proc.returncode}" + (f", missing {', '.join(missing)}" if missing else "")
        raise ConversionError(f"Olive produced no usable model ({status}).\nCause: {explain_failure(text)}\n"
                              f"Full log: {log_path}")
    reconcile_genai_outputs(output_dir)
    log.info("Olive finished in %.1f s", time.perf_counter() - start)
    return output_dir
