"""GGUF quantized blocks as ONNX Runtime's integer-block layouts, exactly (no I/O; numpy only).

Every supported GGUF type is read into one form, :class:`ExactBlocks`: per weight row ``n`` and block ``b`` of
``block_size`` consecutive input features, ``w = scale[n, b] · (code − zero_point[n, b]) + offset[n, b]`` with integer
codes of ``bits`` bits, integer zero points and an optional float ``offset``. Computed in float32 in that order this
gives the same float32 values as the ``gguf`` package's dequantizer (``gguf.quants.dequantize``), bit for bit:

| GGUF | bits | block | zero point | offset | form |
|------|------|-------|------------|--------|------|
| Q4_0 | 4 | 32 | 8 | – | ``d·(q − 8)`` |
| Q8_0 | 8 | 32 | 128 | – | ``d·q``, q int8 → code q + 128 |
| Q4_1 | 4 | 32 | 0 | m | ``d·q + m`` |
| Q5_0 / Q5_1 | 8 | 32 | 16 / 0 | – / m | 5-bit codes held at 8 bits |
| Q4_K | 4 | 32 | 0 | −dmin·mn | ``(d·sc)·q − dmin·mn`` (8 sub-blocks of 32 per 256) |
| Q5_K | 8 | 32 | 0 | −dmin·mn | as Q4_K, 5-bit codes |
| Q6_K | 8 | 16 | 32 | – | ``(d·sc)·(q − 32)`` (16 sub-blocks of 16 per 256) |

The offset has no integer zero point that reproduces it; ONNX Runtime's ``MatMulNBits`` keeps its fast integer kernel
when the offset is added outside it: ``x·Wᵀ = MatMulNBits(x; code, scale, zero point) + blocksums(x)·Mᵀ`` with
``blocksums(x)[b] = Σ_{k in block b} x_k`` and ``M = offset`` (see :mod:`scripts.convert.gguf_exact`).

Every layout here was checked against ONNX Runtime 1.31's CPU kernels: ``MatMulNBits`` and ``GatherBlockQuantized``
accept 4- and 8-bit codes with blocks of 16 and 32, and without a zero-point input assume ``2**(bits − 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from scripts.core.errors import ConversionError

QK_K = 256


class UnsupportedBlocks(ConversionError):
    """A GGUF storage type (or shape) with no exact integer-block form here."""


@dataclass(frozen=True)
class ExactBlocks:
    """A weight ``[N, K]`` (rows = output features) as integer codes in blocks along K."""

    codes: np.ndarray        # uint8 [N, K], each < 2**bits
    scales: np.ndarray       # float32 [N, K // block_size]
    zero_points: np.ndarray  # uint8 [N, K // block_size]
    offsets: np.ndarray | None  # float32 [N, K // block_size], or None (no offset)
    bits: int
    block_size: int
    source_type: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]``: ``scale·(code − zero point) + offset``, in that order (the GGUF dequantizer's)."""
        n, k = self.shape
        blocks = k // self.block_size
        q = self.codes.reshape(n, blocks, self.block_size).astype(np.float32)
        q = q - self.zero_points.reshape(n, blocks, 1).astype(np.float32)
        w = self.scales.reshape(n, blocks, 1) * q
        if self.offsets is not None:
            w = w + self.offsets.reshape(n, blocks, 1)
        return w.reshape(n, k).astype(np.float32, copy=False)

    def take_rows(self, order: np.ndarray) -> "ExactBlocks":
        """The rows in ``order`` (e.g. undoing llama.cpp's Q/K permutation); blocks run along K, so rows move whole."""
        return replace(self, codes=self.codes[order], scales=self.scales[order], zero_points=self.zero_points[order],
                       offsets=None if self.offsets is None else self.offsets[order])

    def with_block_size(self, block_size: int) -> "ExactBlocks":
        """Split every block into ``self.block_size // block_size`` blocks with the same scale, zero point and offset:
        the same values, a finer layout (exact)."""
        if block_size == self.block_size:
            return self
        if self.block_size % block_size:
            raise UnsupportedBlocks(f"block {self.block_size} cannot be split into blocks of {block_size}")
        r = self.block_size // block_size
        rep = lambda a: None if a is None else np.repeat(a, r, axis=1)  # noqa: E731
        return replace(self, scales=rep(self.scales), zero_points=rep(self.zero_points), offsets=rep(self.offsets),
                       block_size=block_size)

    def with_bits(self, bits: int) -> "ExactBlocks":
        """Held in ``bits`` ≥ its own bits: the same codes and zero points (exact)."""
        if bits < self.bits:
            raise UnsupportedBlocks(f"{self.bits}-bit codes do not fit {bits} bits")
        return replace(self, bits=bits)

    def with_offsets(self) -> "ExactBlocks":
        """With an explicit (zero) offset array: ``w + 0`` is ``w`` exactly (a ``-0.0`` weight becomes ``+0.0``)."""
        if self.offsets is not None:
            return self
        return replace(self, offsets=np.zeros_like(self.scales))


def concat_rows(parts: list[ExactBlocks]) -> ExactBlocks:
    """One weight of ``parts`` stacked along N (a packed q/k/v projection): held at the largest bits and the smallest
    block size among them, with offsets when any part has them (exact: see the ``with_*`` methods)."""
    bits = max(p.bits for p in parts)
    block = min(p.block_size for p in parts)
    offsets = any(p.offsets is not None for p in parts)
    norm = [p.with_bits(bits).with_block_size(block) for p in parts]
    if offsets:
        norm = [p.with_offsets() for p in norm]
    cat = lambda attr: np.concatenate([getattr(p, attr) for p in norm], axis=0)  # noqa: E731
    types = sorted({p.source_type for p in parts})
    return ExactBlocks(cat("codes"), cat("scales"), cat("zero_points"), cat("offsets") if offsets else None, bits,
                       block, "+".join(types))


# ----- GGUF block layouts → ExactBlocks ------------------------------------------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Low nibbles of ``group`` bytes, then their high nibbles (ggml's layout for 4-bit blocks)."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(0x0F)).reshape(n, -1)


def _full(n_blocks: int, value: int) -> np.ndarray:
    return np.full((n_blocks,), value, dtype=np.uint8)


def _q4_0(b):
    d, qs = _f16(b[:, :2])[:, 0], _nibbles(b[:, 2:], 16)
    return qs, d, _full(len(b), 8), None, 4, 32


def _q4_1(b):
    d, m, qs = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0], _nibbles(b[:, 4:], 16)
    return qs, d, _full(len(b), 0), m, 4, 32


def _q8_0(b):
    d = _f16(b[:, :2])[:, 0]
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d, _full(len(b), 128), None, 8, 32


def _q5_bits(qh_raw: np.ndarray, ql: np.ndarray) -> np.ndarray:
    qh = np.ascontiguousarray(qh_raw).view(np.uint32).reshape(-1, 1)
    high = ((qh >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & np.uint32(1)).astype(np.uint8)
    return ql | (high << np.uint8(4))


def _q5_0(b):
    d = _f16(b[:, :2])[:, 0]
    return _q5_bits(b[:, 2:6], _nibbles(b[:, 6:], 16)), d, _full(len(b), 16), None, 8, 32


def _q5_1(b):
    d, m = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0]
    return _q5_bits(b[:, 4:8], _nibbles(b[:, 8:], 16)), d, _full(len(b), 0), m, 8, 32


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block (ggml's ``get_scale_min_k4``)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc, mn


def _k_offsets(b):
    """(sub-block scales, sub-block offsets) of Q4_K/Q5_K super-blocks: d·sc and −dmin·mn, as ggml computes them."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return (d * sc.astype(np.float32)).reshape(-1), -(dmin * mn.astype(np.float32)).reshape(-1)


def _q4_k(b):
    scale, offset = _k_offsets(b)
    qs = _nibbles(b[:, 16:], 32).reshape(-1, 32)
    return qs, scale, _full(len(scale), 0), offset, 4, 32


def _q5_k(b):
    scale, offset = _k_offsets(b)
    n = b.shape[0]
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _nibbles(qs, 32).reshape(n, 8, 32)
    high = ((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1))
    q = (ql | (high << np.uint8(4))).reshape(-1, 32)
    return q, scale, _full(len(scale), 0), offset, 8, 32


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << np.uint8(4))).reshape(-1, 16)
    scale = (d * sc).reshape(-1)
    return q, scale, _full(len(scale), 32), None, 8, 16


#: GGUF storage type → (bytes per block, elements per block, reader).
READERS = {
    "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q8_0": (34, 32, _q8_0),
    "Q5_0": (22, 32, _q5_0), "Q5_1": (24, 32, _q5_1),
    "Q4_K": (144, QK_K, _q4_k), "Q5_K": (176, QK_K, _q5_k), "Q6_K": (210, QK_K, _q6_k),
}


def supported_types() -> tuple[str, ...]:
    return tuple(READERS)


def from_gguf(type_name: str, raw: np.ndarray, rows: int, cols: int) -> ExactBlocks:
    """``raw``: a GGUF tensor's bytes (``GGUFReader`` ``tensor.data``, uint8 ``[rows, bytes per row]``) of a weight with
    ``rows`` output features and ``cols`` input features → :class:`ExactBlocks`."""
    if type_name not in READERS:
        raise UnsupportedBlocks(f"GGUF type {type_name} has no exact integer-block form (supported: "
                                f"{', '.join(READERS)}). Set conversion.gguf to \"requantize\" to convert the "
                                "dequantized model instead.")
    size, per, reader = READERS[type_name]
    if cols % per:
        raise UnsupportedBlocks(f"{type_name}: {cols} input features is not a multiple of its block of {per}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows * cols // per, size)
    codes, scales, zps, offsets, bits, block = reader(blocks)
    nb = cols // block
    return ExactBlocks(codes.reshape(rows, cols).astype(np.uint8), scales.reshape(rows, nb).astype(np.float32),
                       zps.reshape(rows, nb), None if offsets is None else offsets.reshape(rows, nb).astype(np.float32),
                       bits, block, type_name)


# ----- ExactBlocks → ONNX Runtime initializers ----------------------------------------------------------------------

def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes along the last axis packed as ONNX Runtime reads them: 4-bit pairs low nibble first; 8-bit as is."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 4:
        return (codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))).astype(np.uint8)
    raise UnsupportedBlocks(f"{bits}-bit codes: only 4 and 8 are packed here")


def default_zero_point(bits: int) -> int:
    """The zero point ``MatMulNBits``/``GatherBlockQuantized`` assume without a zero-point input (uint codes)."""
    return 1 << (bits - 1)


def packed_zero_points(blocks: ExactBlocks) -> np.ndarray | None:
    """uint8 ``[N, ceil(blocks · bits / 8)]``, or None when every zero point is the operators' default."""
    if np.all(blocks.zero_points == default_zero_point(blocks.bits)):
        return None
    zp = blocks.zero_points
    if blocks.bits == 4:
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return _pack(zp, 4)
    return zp.astype(np.uint8)


def matmul_nbits_arrays(blocks: ExactBlocks) -> dict[str, np.ndarray | None]:
    """``MatMulNBits`` inputs: ``B`` uint8 ``[N, K/block, block·bits/8]``, ``scales`` float32 ``[N, K/block]``,
    ``zero_points`` (or None) and ``offsets`` float32 ``[K/block, N]`` (the offset matrix M, or None)."""
    n, k = blocks.shape
    nb = k // blocks.block_size
    b = _pack(blocks.codes.reshape(n, nb, blocks.block_size), blocks.bits)
    return {"B": b, "scales": blocks.scales.astype(np.float32), "zero_points": packed_zero_points(blocks),
            "offsets": None if blocks.offsets is None else np.ascontiguousarray(blocks.offsets.T, dtype=np.float32)}


def unpack_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, offsets: np.ndarray | None,
                        bits: int, block_size: int, k: int) -> ExactBlocks:
    """Inverse of :func:`matmul_nbits_arrays` (what a graph holds → its blocks), for verification."""
    n = b.shape[0]
    flat = b.reshape(n, -1)
    if bits == 4:
        codes = np.stack([flat & np.uint8(0x0F), flat >> np.uint8(4)], axis=-1).reshape(n, -1)
    else:
        codes = flat
    codes = codes[:, :k]
    nb = k // block_size
    if zero_points is None:
        zps = np.full((n, nb), default_zero_point(bits), np.uint8)
    elif bits == 4:
        z = zero_points.reshape(n, -1)
        zps = np.stack([z & np.uint8(0x0F), z >> np.uint8(4)], axis=-1).reshape(n, -1)[:, :nb]
    else:
        zps = zero_points.reshape(n, -1)[:, :nb]
    return ExactBlocks(codes.astype(np.uint8), scales.reshape(n, nb).astype(np.float32), zps.astype(np.uint8),
                       None if offsets is None else np.ascontiguousarray(offsets.reshape(nb, n).T), bits, block_size)


def row_order_unpermute(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (``convert_hf_to_gguf.py`` ``LlamaModel.permute``; ``n_head``
    is the head count of that projection): ``hf = gguf[order]``."""
    perm = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(perm)


def block_sum_matrix(k: int, block_size: int) -> np.ndarray:
    """E, float32 ``[K, K/block]`` of 0/1: ``x·E`` are the block sums of ``x``."""
    return np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
