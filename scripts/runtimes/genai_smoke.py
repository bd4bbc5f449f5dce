"""Load a converted model with ONNX Runtime GenAI and generate a few tokens: a model that cannot generate is
never installed. Runs in a worker process (:mod:`scripts.core.workers`) so the pipeline never loads the GenAI native
library next to Foundry Local's."""
from __future__ import annotations

from pathlib import Path

from scripts.core.errors import ConversionError, SlmopsError
from scripts.runtimes.backends import GenAIBackend
from scripts.core.workers import run_in_worker


def generate(request: dict) -> dict:
    """Worker entry: greedy generation for one user message through the folder's own chat template."""
    backend = GenAIBackend(Path(request["model_dir"]))
    load_seconds = backend.load()
    trace = backend.generate([{"role": "user", "content": request["prompt"]}], request["max_new_tokens"])
    return {"load_seconds": load_seconds, "tokens": trace.new_tokens, "text": trace.text}


def smoke_test(model_dir: Path, prompt: str, max_new_tokens: int = 8, timeout: float = 600) -> dict:
    """Run :func:`generate` in a worker; raise :class:`ConversionError` if it cannot load or generate."""
    try:
        result = run_in_worker("scripts.runtimes.genai_smoke:generate",
                               {"model_dir": str(model_dir), "prompt": prompt, "max_new_tokens": max_new_tokens},
                               error=ConversionError, what=f"generating with {model_dir}", timeout=timeout)
    except SlmopsError as exc:
        raise ConversionError(f"The converted model in {model_dir} does not generate with ONNX Runtime GenAI, so it "
                              f"will not be installed:\n{exc}\nTry another precision or quantization setting.") from None
    if result["tokens"] == 0:
        raise ConversionError(f"The converted model in {model_dir} loaded but produced no token; not installing it.")
    return result
