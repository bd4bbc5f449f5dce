"""The memory-bandwidth bound of decoding: every new token reads (nearly) every weight once, so
``tokens/s <= bandwidth / bytes of weights read per token``.

- :func:`measure_bandwidth` times a numpy sum over a buffer much larger than the CPU caches (single
  thread, read only), with warm-up and repeats; the median is the figure, the spread is reported.
- :func:`onnx_bytes_per_token` / :func:`safetensors_bytes_per_token` count the weight bytes one decode
  step reads: every initializer a MatMul-like node consumes is read whole; a table only ever gathered
  (the embedding, unless it is shared with the LM head) contributes one row.

For a model whose weights fit in the CPU caches (the tiny demo model is ~1 MB) the bound is far above
what the runtime overhead allows, and the fraction says little: it is meaningful for real sizes.
"""
from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.proof.stats import summarise

log = logging.getLogger(__name__)

GATHER_OPS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}  # inputs that are row-indexed tables
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float  # median, 1e9 bytes/s
    spread: float
    repeats: int
    buffer_mb: int
    method: str = "numpy sum of a float64 buffer, one thread, read only"

    def to_json(self) -> dict:
        return asdict(self)


def measure_bandwidth(buffer_mb: int = 256, repeats: int = 7, warmup: int = 2) -> Bandwidth:
    """Median read bandwidth over ``repeats`` timed passes after ``warmup`` untimed ones."""
    import numpy as np

    data = np.ones(buffer_mb * 1024 * 1024 // 8, dtype=np.float64)
    rates = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        data.sum()
        dt = time.perf_counter() - t0
        if i >= warmup:
            rates.append(data.nbytes / dt / 1e9)
    s = summarise(rates)
    assert s is not None
    log.info("Memory read bandwidth: %.1f GB/s (spread %.0f %%)", s.median, 100 * s.spread)
    return Bandwidth(s.median, s.spread, repeats, buffer_mb)


def bound_tokens_per_s(bytes_per_token: int, gb_per_s: float) -> float:
    """Decode speed if reading the weights were the only cost."""
    if bytes_per_token <= 0 or gb_per_s <= 0:
        raise ValueError("bytes_per_token and bandwidth must be positive")
    return gb_per_s * 1e9 / bytes_per_token


def fraction_of_bound(decode_tps: float | None, bytes_per_token: int, gb_per_s: float) -> float | None:
    if not decode_tps:
        return None
    return decode_tps / bound_tokens_per_s(bytes_per_token, gb_per_s)


def _onnx_tensor_bytes(t) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    import onnx
    import numpy as np
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def onnx_bytes_per_token(model_path: Path) -> int:
    """Weight bytes one decode step reads in an ONNX model (external data is not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    sizes = {t.name: (_onnx_tensor_bytes(t), list(t.dims)) for t in g.initializer}
    gathered, other = set(), set()
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                (gathered if i in GATHER_OPS.get(node.op_type, ()) else other).add(name)
    total = 0
    for name, (size, dims) in sizes.items():
        if name in gathered and name not in other:
            total += size // dims[0] if dims and dims[0] else size
        else:
            total += size
    return total


def safetensors_bytes_per_token(model_dir: Path) -> int:
    """Weight bytes one decode step reads in a Hugging Face folder (from the safetensors headers)."""
    tensors: dict[str, tuple[int, list[int]]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            tensors[name] = (count * _SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 4), info["shape"])
    tied = not any(name.endswith("lm_head.weight") for name in tensors)
    total = 0
    for name, (size, shape) in tensors.items():
        is_embedding = name.endswith(("embed_tokens.weight", "wte.weight"))
        total += size // shape[0] if is_embedding and not tied and shape else size
    return total


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode step reads in a GGUF file: every tensor, except that the token embedding contributes
    one row unless it is also the output layer (no ``output.weight``: tied)."""
    from gguf import GGUFReader
    tensors = {t.name: (int(t.n_bytes), int(t.n_elements), [int(d) for d in t.shape]) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    total = 0
    for name, (size, _, shape) in tensors.items():
        rows = shape[-1] if name == "token_embd.weight" and not tied and shape else 1  # GGUF shapes: ne0 first
        total += size // rows
    return total


def bytes_per_token(model_dir: Path) -> int:
    """:func:`onnx_bytes_per_token` for an ONNX GenAI folder, :func:`gguf_bytes_per_token` for a ``.gguf`` file,
    else :func:`safetensors_bytes_per_token`."""
    model_dir = Path(model_dir)
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        return gguf_bytes_per_token(model_dir)
    cfg = model_dir / "genai_config.json"
    if cfg.is_file():
        name = json.loads(cfg.read_text(encoding="utf-8"))["model"]["decoder"].get("filename", "model.onnx")
        return onnx_bytes_per_token(model_dir / name)
    return safetensors_bytes_per_token(model_dir)
