"""Packing layouts of int4 weights: how q [N, K], scales and zeros [N, K/G] are stored, and which
kernel reads them. The artifact's manifest names the layout (`quantization.layout`), so a
runtime never guesses; runtime/artifact.py and the C++ runner list the names they accept.

Every layout stores the scales as float16 and the zero points as 4-bit integers, 8 to a uint32
word (as AutoAWQ ships them): laid out [T, C] like the scales (below), zero c of row t is nibble
c % 8 of word [t, c // 8], the last word zero-padded, so zeros are [T, ceil(C / 8)]. A zero is
read once per group, so its shift and mask cost nothing next to the group's weights. At group
128 a weight costs 4 + 16/128 + 4/128 = 4.16 bits; at g64, 4.31.

"k8" (every target; the CUDA kernels read it): qweight [N, K/8] uint32, nibble j of word w is
    column 8w + j; scales [N, K/G].

"i{L}r{R}" (CPU SIMD, L = SIMD lanes of 32 bits, R = rows per tile), e.g. "i8r8" for AVX2 /
    AVX-512 (8 x 32-bit lanes per 256-bit load):
    * within each block of 8L columns, word l holds columns l, L + l, ..., 7L + l (nibble j is
      column L*j + l), so one vector load of L words followed by an AND with a constant
      (or a shift by an immediate) gives L consecutive k in L lanes, ready to convert;
    * R rows form a tile whose blocks are stored together (block b of rows r = 0..R-1, then
      block b + 1, ...), so a thread computing R rows at once reads one sequential stream;
    * scales [N/R, K/G * R] (zeros likewise before packing): per group, the tile's R values side
      by side.
    Needs K % 8L == 0, G % L == 0 and N % R == 0; a model with any linear that does not fit is
    packed "k8" instead (`choose_layout`).

"d{L}" (x86 W4A8, integer dot products; L = 8 or 16 rows per tile, one per 32-bit lane):
    word (c, r) of tile t holds columns 8c..8c+7 of row tL + r, byte i of it column 8c + i in
    the low nibble and 8c + 4 + i in the high one, so AND 0x0F (or >> 4 then AND) of L words
    gives 4 consecutive int4 values per lane, the operand of a 4-way byte dot product
    (schedules/w4a8_cpu.py); qweight [N/L, K/8 * L], scales [N/L, K/G * L] as in "i{L}r{L}". Needs G % 8 == 0 and N % L == 0. Only the W4A8 schemes (w4a8g*) use it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np
from tvm import tirx

from .w4_kernels import (PACK, ZEROS_PER_WORD, pack_k8, unpack_k8, w4_gemm_dot, w4_gemm_interleaved,
                         w4_gemv_interleaved, w4_matmul, zeros_shape)

LANES = (4, 8, 16)  # NEON / SSE 128-bit, AVX2 256-bit, AVX-512 512-bit
TILE_ROWS = (1, 2, 4, 8, 16)
DOT_LANES = (8, 16)  # 256- and 512-bit vectors of int32

Packed = tuple[np.ndarray, np.ndarray, np.ndarray]  # qweight, scales, zeros
DTYPES = ("uint32", "float16", "uint32")  # of (qweight, scales, zeros) in every layout


def pack_zeros(zeros: np.ndarray) -> np.ndarray:
    """Zero points [T, C] (integers in [0, 15]) → uint32 [T, ceil(C/8)]: zero c is nibble c % 8 of
    word c // 8."""
    z = np.asarray(zeros)
    if z.size and (not np.array_equal(z, np.round(z)) or z.min() < 0 or z.max() > 15):
        raise ValueError("int4 zero points must be integers in [0, 15]")
    t, c = z.shape
    padded = np.zeros((t, zeros_shape(t, c)[1] * ZEROS_PER_WORD), np.uint32)
    padded[:, :c] = z.astype(np.uint32)
    nib = padded.reshape(t, -1, ZEROS_PER_WORD)
    words = np.zeros(nib.shape[:2], np.uint32)
    for j in range(ZEROS_PER_WORD):
        words |= nib[:, :, j] << np.uint32(4 * j)
    return words


def unpack_zeros(words: np.ndarray, columns: int) -> np.ndarray:
    """Inverse of pack_zeros: float32 [T, columns]."""
    nib = (words[:, :, None] >> (np.arange(ZEROS_PER_WORD, dtype=np.uint32) * 4)) & np.uint32(15)
    return nib.reshape(words.shape[0], -1)[:, :columns].astype(np.float32)


def pack_scales(scales: np.ndarray) -> np.ndarray:
    """Scales as float16; the quantizer already rounds them to float16 values (quantizer.py), so
    this loses nothing, and a scale float16 cannot hold is refused rather than stored as inf."""
    s = np.asarray(scales)
    with np.errstate(over="ignore"):
        half = s.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise ValueError("an int4 group scale is outside float16's range; the weights are too large to quantize")
    return half


def _finish(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
    return qweight, pack_scales(scales), pack_zeros(zeros)


def _unfinish(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
    return qweight, scales.astype(np.float32), unpack_zeros(zeros, scales.shape[1])


@dataclasses.dataclass(frozen=True)
class K8Layout:
    name: str = "k8"

    def supports(self, k: int, n: int, group: int) -> bool:
        return k % PACK == 0 and k % group == 0

    def shapes(self, n: int, k: int, group: int) -> list[tuple[int, int]]:
        """Shapes of (qweight, scales, zeros) for a weight [N, K]."""
        return [(n, k // PACK), (n, k // group), zeros_shape(n, k // group)]

    def pack(self, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        return _finish(pack_k8(q), scales, zeros)

    def unpack(self, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        return _unfinish(unpack_k8(qweight), scales, zeros)

    def kernel(self, k: int, n: int, group: int, dtype: str, rows: int | None) -> tirx.PrimFunc:
        return w4_matmul(k, n, group, dtype, rows)


@dataclasses.dataclass(frozen=True)
class InterleavedLayout:
    lanes: int = 8
    tile_rows: int = 8

    def __post_init__(self) -> None:
        if self.lanes not in LANES or self.tile_rows not in TILE_ROWS:
            raise ValueError(f"layout i{self.lanes}r{self.tile_rows}: lanes must be one of {LANES} and "
                             f"rows one of {TILE_ROWS}")

    @property
    def name(self) -> str:
        return f"i{self.lanes}r{self.tile_rows}"

    @property
    def block(self) -> int:
        """Columns per block: 8 nibbles x `lanes` words."""
        return PACK * self.lanes

    def supports(self, k: int, n: int, group: int) -> bool:
        return k % self.block == 0 and k % group == 0 and group % self.lanes == 0 and n % self.tile_rows == 0

    def shapes(self, n: int, k: int, group: int) -> list[tuple[int, int]]:
        r = self.tile_rows
        return [(n // r, k // PACK * r), (n // r, k // group * r), zeros_shape(n // r, k // group * r)]

    def pack(self, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        n, k = q.shape
        if not self.supports(k, n, k // scales.shape[1]):
            raise ValueError(f"layout {self.name} cannot hold a [{n}, {k}] weight with group {k // scales.shape[1]}")
        nib = q.astype(np.uint32).reshape(n, k // self.block, PACK, self.lanes)  # [n, b, j, l]
        words = np.zeros((n, k // self.block, self.lanes), np.uint32)
        for j in range(PACK):
            words |= nib[:, :, j, :] << np.uint32(4 * j)
        return _finish(self._tile(words.reshape(n, -1), self.lanes), self._tile(scales, 1), self._tile(zeros, 1))

    def unpack(self, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        qweight, scales, zeros = _unfinish(qweight, scales, zeros)
        words = self._untile(qweight, self.lanes)
        n, kw = words.shape
        blocks = words.reshape(n, kw // self.lanes, 1, self.lanes)
        nib = (blocks >> (np.arange(PACK, dtype=np.uint32) * 4)[None, None, :, None]) & np.uint32(15)
        return nib.reshape(n, kw * PACK).astype(np.uint8), self._untile(scales, 1), self._untile(zeros, 1)

    def kernel(self, k: int, n: int, group: int, dtype: str, rows: int | None) -> tirx.PrimFunc:
        if rows == 1:
            return w4_gemv_interleaved(k, n, group, dtype, self.lanes, self.tile_rows)
        return w4_gemm_interleaved(k, n, group, dtype, self.lanes, self.tile_rows, rows)

    def _tile(self, a: np.ndarray, unit: int) -> np.ndarray:
        return _tile(a, self.tile_rows, unit)

    def _untile(self, a: np.ndarray, unit: int) -> np.ndarray:
        return _untile(a, self.tile_rows, unit)


@dataclasses.dataclass(frozen=True)
class DotLayout:
    lanes: int = 8

    def __post_init__(self) -> None:
        if self.lanes not in DOT_LANES:
            raise ValueError(f"layout d{self.lanes}: lanes must be one of {DOT_LANES}")

    @property
    def name(self) -> str:
        return f"d{self.lanes}"

    def supports(self, k: int, n: int, group: int) -> bool:
        return k % group == 0 and group % PACK == 0 and n % self.lanes == 0

    def shapes(self, n: int, k: int, group: int) -> list[tuple[int, int]]:
        lanes = self.lanes
        return [(n // lanes, k // PACK * lanes), (n // lanes, k // group * lanes),
                zeros_shape(n // lanes, k // group * lanes)]

    def pack(self, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        n, k = q.shape
        if not self.supports(k, n, k // scales.shape[1]):
            raise ValueError(f"layout {self.name} cannot hold a [{n}, {k}] weight with group {k // scales.shape[1]}")
        nib = q.astype(np.uint32).reshape(n, k // PACK, 2, 4)  # [n, c, high?, byte]
        words = np.zeros((n, k // PACK), np.uint32)
        for half in range(2):
            for byte in range(4):
                words |= nib[:, :, half, byte] << np.uint32(8 * byte + 4 * half)
        return _finish(self._tile(words), self._tile(scales), self._tile(zeros))

    def unpack(self, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Packed:
        qweight, scales, zeros = _unfinish(qweight, scales, zeros)
        words = self._untile(qweight)
        shifts = (8 * np.arange(4, dtype=np.uint32)[None, :] + 4 * np.arange(2, dtype=np.uint32)[:, None]).ravel()
        nib = (words[:, :, None] >> shifts[None, None, :]) & np.uint32(15)
        return nib.reshape(words.shape[0], -1).astype(np.uint8), self._untile(scales), self._untile(zeros)

    def kernel(self, k: int, n: int, group: int, dtype: str, rows: int | None) -> tirx.PrimFunc:
        """The compute definition (GEMM over `rows`, 1 for decode); schedules/w4a8_cpu.py has the
        GEMV that replaces it for decode."""
        return w4_gemm_dot(k, n, group, dtype, self.lanes, rows)

    def _tile(self, a: np.ndarray) -> np.ndarray:
        return _tile(a, self.lanes, 1)

    def _untile(self, a: np.ndarray) -> np.ndarray:
        return _untile(a, self.lanes, 1)


def _tile(a: np.ndarray, rows: int, unit: int) -> np.ndarray:
    """[N, C] → [N/R, C*R]: runs of `unit` columns, the R rows of a tile side by side (the tiling
    of both "i{L}r{R}" and "d{L}")."""
    n, c = a.shape
    t = a.reshape(n // rows, rows, c // unit, unit).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(n // rows, c * rows))


def _untile(a: np.ndarray, rows: int, unit: int) -> np.ndarray:
    nt, cr = a.shape
    t = a.reshape(nt, cr // (rows * unit), rows, unit).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(nt * rows, cr // rows))


Layout = K8Layout | InterleavedLayout | DotLayout
K8 = K8Layout()


def layout_names() -> list[str]:
    """Every layout name this version of awqc can write (runtime/artifact.py lists the same)."""
    return ([K8.name] + [InterleavedLayout(lanes, r).name for lanes in LANES for r in TILE_ROWS]
            + [DotLayout(lanes).name for lanes in DOT_LANES])


def get_layout(name: str) -> Layout:
    if name == K8.name:
        return K8
    m = re.fullmatch(r"d(\d+)", name)
    if m is not None:
        return DotLayout(int(m.group(1)))
    m = re.fullmatch(r"i(\d+)r(\d+)", name)
    if m is None:
        raise ValueError(f"unknown int4 layout {name!r}; known: {', '.join(layout_names())}")
    return InterleavedLayout(int(m.group(1)), int(m.group(2)))


def choose_layout(preferred: Layout, shapes: Iterable[tuple[int, int]], group: int) -> Layout:
    """`preferred` if it holds every weight shape (N, K) of the model, else k8 (one layout per
    artifact keeps the manifest and the runtimes simple)."""
    shapes = list(shapes)
    if all(preferred.supports(k, n, group) for n, k in shapes):
        return preferred
    return K8
