"""Load a converted model with ONNX Runtime GenAI and generate a few tokens: a model that cannot generate is
never installed. Runs in its own process (``python -m scripts.genai_smoke``) so the pipeline never loads the
GenAI native library next to Foundry Local's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .errors import ConversionError


def generate(model_dir: str, prompt: str, max_new_tokens: int) -> dict:
    """Greedy generation for one user message through the folder's own chat template."""
    from .backends import GenAIBackend

    backend = GenAIBackend(Path(model_dir))
    load_seconds = backend.load()
    trace = backend.generate([{"role": "user", "content": prompt}], max_new_tokens)
    return {"load_seconds": load_seconds, "tokens": trace.new_tokens, "text": trace.text}


def smoke_test(model_dir: Path, prompt: str, max_new_tokens: int = 8, timeout: float = 600) -> dict:
    """Run :func:`generate` in a subprocess; raise :class:`ConversionError` if it cannot load or generate."""
    cmd = [sys.executable, "-m", "scripts.genai_smoke", str(model_dir), prompt, str(max_new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ConversionError(f"The converted model in {model_dir} does not generate with ONNX Runtime GenAI, so it "
                              f"will not be installed:\n{tail}\nTry another precision or quantization setting.")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["tokens"] == 0:
        raise ConversionError(f"The converted model in {model_dir} loaded but produced no token; not installing it.")
    return result


if __name__ == "__main__":
    print(json.dumps(generate(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
