"""8-bit block codes computed by ONNX Runtime's 4-bit ``MatMulNBits`` kernel, exactly (the "nibble form").

ONNX Runtime 1.31's CPU ``MatMulNBits`` has no FP32 kernel for 8-bit weights. Measured on one token (2 threads): the
576 × 49,152 SmolLM2 LM head (Q8_0) took 170.7 ms at ``accuracy_level`` 1 and 3.4 ms at level 4, while 4-bit
576 × 1,536 took 72 vs 35 µs. Level 4 quantizes the activations to int8: on SmolLM2 Q4_1 it cost 1.8 points of top-1
(98.24 %, mean KLD 0.00102) against the dequantized FP32 model.

The nibble form keeps the bytes and uses the fast 4-bit kernel with float activations (level 1). An 8-bit code
``c`` (one byte) is ``lo + 16·hi`` of its two nibbles, which is how ``MatMulNBits`` reads two 4-bit elements from that
byte. So one block of ``B`` 8-bit codes over ``x`` is a block of ``2B`` 4-bit codes with zero point 0 over the
interleaved input ``x' = [x₀, 16·x₀, x₁, 16·x₁, …]`` (``K' = 2K``). The 8-bit zero point ``z`` and a float offset ``m``
become one block offset term beside it, as for Q4_1 (:mod:`scripts.convert.gguf_exact`):

    x·Wᵀ = MatMulNBits₄(x'; codes, scale, zero point 0) + blocksums(x)·M,   M = m − scale·z   ([K/B, N])

This is exact for every GGUF type here. A block has a nonzero zero point (Q8_0 128, Q6_K 32, Q5_0 16) or an offset
(Q5_1, Q5_K), never both, and ``scale·z`` with ``z`` a power of two needs no rounding. The scales are a float16 times an
integer of at most 8 bits, so ``scale·c`` is exact in float32 for these codes, and ``scale·c + M`` equals the GGUF's
``scale·(c − z) + m`` bit for bit (:func:`read_nibbles` reads the graph back for
:func:`scripts.convert.graph_check.verify_exact`). The codes, the scales and their one copy are unchanged, so a tied
embedding's ``GatherBlockQuantized`` still reads the same bytes as 8-bit codes.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from scripts.convert.gguf_blocks import ExactBlocks, UnsupportedBlocks, matmul_nbits_arrays
from scripts.convert.lora_branch import GraphEdit

#: The input's multipliers per element: the low nibble reads x, the high nibble 16·x.
FACTORS = np.array([1.0, 16.0], np.float32)
TAG = "/nibble/"
#: The ``accuracy_level`` at which ``MatMulNBits`` quantizes its input to int8.
INT8_ACTIVATIONS = 4


def carried_as_nibbles(blocks: ExactBlocks, accuracy_level: int) -> bool:
    """Whether ``blocks`` are carried in the nibble form: 8-bit codes at any accuracy level but 4. At level 4 (int8
    activations) the 8-bit kernel is fast, and the nibble form would quantize each ``x`` with the int8 scale of its
    ``16·x``: measured on 24 × 512 GGUF blocks, relative error 1.6–12 % against 0.3–1.1 % for the 8-bit kernel."""
    return blocks.bits == 8 and accuracy_level != INT8_ACTIVATIONS


def nibble_offsets(blocks: ExactBlocks) -> np.ndarray:
    """float32 ``[N, K/B]``: ``offset − scale·zero point``, computed without rounding (else
    :class:`UnsupportedBlocks`)."""
    z = blocks.zero_points.astype(np.float32)
    m = blocks.offsets if blocks.offsets is not None else np.zeros_like(blocks.scales)
    both = (z != 0) & (m != 0)
    if both.any():
        raise UnsupportedBlocks(f"{int(both.sum())} blocks have both a zero point and an offset: no exact nibble form")
    product = blocks.scales * z
    if not np.array_equal(product.astype(np.float64), blocks.scales.astype(np.float64) * z.astype(np.float64)):
        raise UnsupportedBlocks("scale × zero point rounds in float32: no exact nibble form")
    return (m - product).astype(np.float32)


def nibble_arrays(blocks: ExactBlocks) -> dict:
    """The 4-bit ``MatMulNBits`` inputs and attributes for 8-bit ``blocks``: ``B`` (the 8-bit bytes as they are),
    ``scales``, ``zero_points`` (packed 4-bit zeros), ``offsets`` (M, ``[K/B, N]``) and ``attrs`` (``K``, ``bits``,
    ``block_size``)."""
    if blocks.bits != 8:
        raise UnsupportedBlocks(f"{blocks.bits}-bit codes: only 8-bit codes have a nibble form")
    n, k = blocks.shape
    arrays = matmul_nbits_arrays(blocks)
    blocks_per_row = k // blocks.block_size
    return {"B": arrays["B"], "scales": arrays["scales"],
            "zero_points": np.zeros((n, (blocks_per_row + 1) // 2), np.uint8),
            "offsets": np.ascontiguousarray(nibble_offsets(blocks).T),
            "attrs": {"K": 2 * k, "bits": 4, "block_size": 2 * blocks.block_size}}


def interleave(edit: GraphEdit, x: str, k: int, base: str, cache: dict) -> str:
    """``[x₀, 16·x₀, x₁, 16·x₁, …]`` of ``x`` ``[batch, positions, K]``: one per input, shared through ``cache``."""
    if x not in cache:
        u = edit.node("Unsqueeze", [x, edit.put(f"{base}.nibble_axes", np.array([-1], np.int64))],
                      f"{base}{TAG}Unsqueeze")
        pair = edit.node("Mul", [u, edit.put(f"{base}.nibble_factors", FACTORS)], f"{base}{TAG}Mul")
        cache[x] = edit.node("Reshape", [pair, edit.put(f"{base}.nibble_shape", np.array([0, 0, 2 * k], np.int64))],
                             f"{base}{TAG}Reshape")
    return cache[x]


def nibble_input(node, producers: dict, inits: dict) -> tuple[str, np.ndarray] | None:
    """For a ``MatMulNBits`` reading an :func:`interleave`: (the input it interleaves, the multipliers as stored);
    None for a node that reads its input as it is. :class:`UnsupportedBlocks` when the elements are not interleaved."""
    reshape = producers.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape" or TAG not in reshape.name:
        return None
    mul = producers.get(reshape.input[0])
    unsqueeze = producers.get(mul.input[0]) if mul is not None else None
    if unsqueeze is None or mul.input[1] not in inits or unsqueeze.input[1] not in inits:
        return None
    axes = numpy_helper.to_array(inits[unsqueeze.input[1]]).reshape(-1).tolist()
    if axes != [-1]:
        raise UnsupportedBlocks(f"{reshape.name}: the input is stacked on axis {axes}, not interleaved (axis -1)")
    return unsqueeze.input[0], numpy_helper.to_array(inits[mul.input[1]]).reshape(-1)


def read_nibbles(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, offsets: np.ndarray | None,
                 factors: np.ndarray, k2: int, block2: int) -> ExactBlocks:
    """The 8-bit blocks a nibble-form node computes with (inverse of :func:`nibble_arrays`): code = the byte, zero
    point 0 (a 4-bit zero point ``z₄`` reads back as ``17·z₄``: ``(lo − z₄) + 16·(hi − z₄)``), offset M.
    :class:`UnsupportedBlocks` when the input is not interleaved as ``[x, 16·x]`` (then no 8-bit code describes it)."""
    if factors.shape != FACTORS.shape or not np.array_equal(factors, FACTORS):
        raise UnsupportedBlocks(f"the input is interleaved with factors {factors.tolist()}, not {FACTORS.tolist()}")
    n, k, block = b.shape[0], k2 // 2, block2 // 2
    blocks_per_row = k // block
    if zero_points is None:
        zps = np.full((n, blocks_per_row), 8, np.uint8)  # MatMulNBits' 4-bit default
    else:
        z = zero_points.reshape(n, -1)
        zps = np.stack([z & np.uint8(0x0F), z >> np.uint8(4)], axis=-1).reshape(n, -1)[:, :blocks_per_row]
    return ExactBlocks(b.reshape(n, -1)[:, :k].astype(np.uint8), scales.reshape(n, blocks_per_row).astype(np.float32),
                       (zps.astype(np.uint16) * 17).astype(np.uint8),
                       None if offsets is None else np.ascontiguousarray(offsets.reshape(-1, n).T), 8, block)
