"""Load a converted model with ONNX Runtime GenAI and generate a few tokens: a model that cannot generate is
never installed. Runs in its own process (``python -m scripts.genai_smoke``) so the pipeline never loads the
GenAI native library next to Foundry Local's."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .errors import ConversionError


def generate(model_dir: str, prompt: str, max_new_tokens: int) -> dict:
    import onnxruntime_genai as og

    start = time.perf_counter()
    model = og.Model(model_dir)
    tokenizer = og.Tokenizer(model)
    load_seconds = time.perf_counter() - start
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=min(len(ids) + max_new_tokens, 100000), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out: list[int] = []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return {"load_seconds": load_seconds, "tokens": len(out), "text": tokenizer.decode(out)}


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
