"""CUDA kernels for the dequant-fused int4 linears (W4A16), reading layout "k8" of w4_kernels.py.

float16 activations (the CUDA fast path):

- GEMV (decode, one activation row): one warp per output row, `rows` warps per block. Each lane
  reads 32 weights of its row as one 128-bit load (uint32x4, four k8 words), the matching 32
  activations as four 128-bit loads, and the group's scale and zero point; lanes cover
  consecutive 16-byte chunks so a warp reads 512 contiguous bytes of the row. Partial sums are
  float32 and the warp reduces them with shuffles (TVM lowers the threadIdx.x reduction to
  shfl.sync).
- GEMM (prefill, any number of rows): a BM x BN output tile per block, K in tiles of 32 (one
  uint4 of weights per row, so a tile never straddles a quantization group). Per tile the block
  stages the activations and the *dequantized* weights (fp16) in shared memory, then each thread
  accumulates a TM x TN sub-tile in float32 registers with FMA (fma.rn.f32), reading shared
  memory with 128-bit loads. The shared arrays are padded so those reads are bank-conflict free.
  That is the SIMT GEMM. With `gemm_mma` (every sm_80+ target's record) the same staged tiles
  feed tensor cores instead: each of the block's 4 warps computes a 32 x 32 output tile as 2 x 4
  `mma.sync.m16n8k16` (f16 inputs, f32 accumulators) per 16 k, its fragments read from the
  padded shared tiles with 32-bit loads (bank-conflict free: a row is 20 words, so the 8 rows a
  fragment load touches fall in 8 distinct groups of 4 banks). Both operands are in the same
  pair-permuted k order, which a dot product does not see.

Fast int4 -> fp16 (the trick of FasterTransformer and TinyChat): OR a nibble into the low
mantissa bits of the fp16 constant 1024.0 (0x6400) and the half *is* 1024 + q, exactly (fp16 has
spacing 1 in [1024, 2048)). With the mask 0x000F000F one LOP3 converts two nibbles at once into a
half2; one HSUB2 removes the 1024, one HFMA2 applies (q - zero) * scale = q * s + (-zero * s).
In layout k8 the two nibbles of one LOP3 are k = j and k = j + 4 of a word, so the activations
are paired the same way with PRMT (__byte_perm); the GEMM stores both operands in that permuted
k order in shared memory, which leaves the dot product unchanged.

The device helpers are CUDA source attached to the kernels with TVM's `cuda_func_call`. The same
kernels can be built in *emulation* mode: thread loops become serial loops, shared memory becomes
ordinary memory and the helpers become extern C calls into a host build of the very same helper
source (HOST_SHIM supplies half2, __hfma2, __byte_perm and a bit-exact LOP3), so the whole
kernel — indexing, guards, staging, pairing, conversion — runs on a CPU against numpy.

float32 activations: simpler schedules of the generic w4_matmul kernel (warp-per-row GEMV with a
shuffle reduction, and a one-thread-per-output GEMM); the fast conversion is fp16-only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tvm import s_tir, tirx
from tvm.script import tirx as T

from .w4_kernels import PACK, ZEROS_PER_WORD, zero_at, zeros_shape

WORDS_PER_CHUNK = 4  # k8 words per 128-bit load
CHUNK = WORDS_PER_CHUNK * PACK  # 32 weights per 128-bit load
WARP = 32
MMA_WARP_TILE = 32  # a warp's output tile in the tensor-core GEMM: 2 x 4 mma tiles of 16 x 8
MMA_REGS = 2 * 4 * 4  # its float32 accumulators per lane: four per 16 x 8 tile


@dataclasses.dataclass(frozen=True)
class W4CudaKnobs:
    """Tile sizes; records per target may override them (schedules/records/)."""
    gemv_rows: int = 4  # warps (output rows) per block
    gemm_bm: int = 32  # activation rows per block tile
    gemm_bn: int = 128  # output columns per block tile (one weight row per thread when loading)
    gemm_tm: int = 4  # rows per thread
    gemm_tn: int = 8  # columns per thread (strided by bn / tn so shared reads do not conflict)
    # tensor cores (mma.sync m16n8k16, sm_80+) for the GEMM's inner product instead of FMA;
    # tm / tn then do not apply: each of the 4 warps owns a 32 x 32 tile of the 32 x 128 block
    gemm_mma: bool = False

    @property
    def gemm_threads(self) -> int:
        return (self.gemm_bm // self.gemm_tm) * (self.gemm_bn // self.gemm_tn)


CUDA_KNOBS_FORMAT = "awqc-cuda-knobs/1"
RECORDS_DIR = Path(__file__).resolve().parent / "records"


class CudaKnobsError(ValueError):
    """A CUDA knobs record that is damaged or names another target."""


def knobs_for(target: str, gpu_arch: str, records_dir: Path = RECORDS_DIR) -> W4CudaKnobs:
    """The kernel knobs of a CUDA/Jetson target from schedules/records/<target>.json (per arch:
    tensor cores from sm_80 on), or the defaults when there is no record."""
    path = records_dir / f"{target}.json"
    if not path.is_file():
        return W4CudaKnobs()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CudaKnobsError(f"{path} is not valid JSON ({err}); restore it from the repository") from None
    if data.get("format") != CUDA_KNOBS_FORMAT or data.get("target") != target or data.get("gpu_arch") != gpu_arch:
        raise CudaKnobsError(f"{path} is not the {CUDA_KNOBS_FORMAT} record of {target} ({gpu_arch}); "
                             "restore it from the repository")
    try:
        return W4CudaKnobs(**data["knobs"])
    except (KeyError, TypeError) as err:
        raise CudaKnobsError(f"{path} has bad knobs ({err}); restore it from the repository") from None


# ------------------------------------------------------------------------------------------------
# Device helpers. One source text, compiled by nvcc (through TVM's CUDA codegen) and, for the
# emulation, by the host C++ compiler after HOST_SHIM.
_COMMON = r"""
#ifndef AWQC_W4_COMMON
#define AWQC_W4_COMMON
// fp16 1024.0 in both halves; OR-ing a nibble into the mantissa gives 1024 + q exactly.
#define AWQC_MAGIC 0x64006400u
#define AWQC_NIBBLES 0x000F000Fu
__device__ __forceinline__ unsigned awqc_and_or(unsigned a, unsigned b, unsigned c) {
#ifdef __CUDA_ARCH__
  unsigned d;  // one LOP3: immLut 0xEA = (0xF0 & 0xCC) | 0xAA, i.e. (a & b) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  return awqc_host_lop3(a, b, c, 0xEA);
#endif
}
__device__ __forceinline__ half2 awqc_as_h2(unsigned u) { return *reinterpret_cast<half2*>(&u); }
__device__ __forceinline__ unsigned awqc_as_u32(half2 h) { return *reinterpret_cast<unsigned*>(&h); }
// Weights k = j and k = j + 4 of a k8 word: (q - zero) * scale as q * scale + (-zero * scale).
// q is exact after the subtraction, so only the final fma rounds (no 1024-sized cancellation).
__device__ __forceinline__ half2 awqc_dequant_pair(unsigned word, int j, half2 s2, half2 nzs2) {
  half2 q = __hsub2(awqc_as_h2(awqc_and_or(word >> (4 * j), AWQC_NIBBLES, AWQC_MAGIC)),
                    awqc_as_h2(AWQC_MAGIC));
  return __hfma2(q, s2, nzs2);
}
// Eight consecutive halves x0..x7 (as four words) reordered into the pairs (x_j, x_j+4).
__device__ __forceinline__ void awqc_pair_halves(unsigned x01, unsigned x23, unsigned x45, unsigned x67,
                                                 unsigned* p) {
  p[0] = __byte_perm(x01, x45, 0x5410);  // low halves:  (x0, x4)
  p[1] = __byte_perm(x01, x45, 0x7632);  // high halves: (x1, x5)
  p[2] = __byte_perm(x23, x67, 0x5410);  // (x2, x6)
  p[3] = __byte_perm(x23, x67, 0x7632);  // (x3, x7)
}
#endif
"""

_DOT8 = _COMMON + r"""
// sum_k x[k] * w[k] over the eight weights of one k8 word; fp16 products summed in half2
// (eight terms), returned as float32 for the float32 accumulator.
extern "C" __device__ __forceinline__ float awqc_w4_dot8(unsigned word, unsigned x01, unsigned x23,
                                                         unsigned x45, unsigned x67, unsigned s2,
                                                         unsigned nzs2) {
  unsigned xp[4];
  awqc_pair_halves(x01, x23, x45, x67, xp);
  half2 acc = __float2half2_rn(0.0f);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc = __hfma2(awqc_dequant_pair(word, j, awqc_as_h2(s2), awqc_as_h2(nzs2)), awqc_as_h2(xp[j]), acc);
  }
  float2 f = __half22float2(acc);
  return f.x + f.y;
}
"""

_DEQUANT8 = _COMMON + r"""
// The eight weights of one k8 word, dequantized to fp16 in pair order (w0,w4,w1,w5,...), stored
// with one 128-bit store to `out` (16-byte aligned).
extern "C" __device__ __forceinline__ void awqc_w4_dequant8(unsigned word, unsigned s2, unsigned nzs2,
                                                            void* out) {
  unsigned p[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = awqc_as_u32(awqc_dequant_pair(word, j, awqc_as_h2(s2), awqc_as_h2(nzs2)));
  *reinterpret_cast<uint4*>(out) = make_uint4(p[0], p[1], p[2], p[3]);
}
"""

_PAIR8 = _COMMON + r"""
// Eight activations reordered into the weights' pair order, one 128-bit store to `out`.
extern "C" __device__ __forceinline__ void awqc_pair8(unsigned x01, unsigned x23, unsigned x45,
                                                      unsigned x67, void* out) {
  unsigned p[4];
  awqc_pair_halves(x01, x23, x45, x67, p);
  *reinterpret_cast<uint4*>(out) = make_uint4(p[0], p[1], p[2], p[3]);
}
"""

_MMA = r"""
// One warp's 16 x 8 x 16 tensor-core product c += a . b^T from shared memory: a is 16 rows of
// activations, b is 8 rows of dequantized weights, both with k contiguous and row strides lda /
// ldb halves (the GEMM's padded tiles); c is this lane's four float32 accumulators, which
// mma.sync's layout assigns to rows lane/4 and lane/4 + 8, columns 2 (lane % 4) and that + 1.
// The fragments are loaded with 32-bit shared loads as PTX's m16n8k16 .row.col layout places
// them (a: rows g, g + 8 at k = 2t, 2t + 8; b: row g at k = 2t, 2t + 8; g = lane / 4, t = lane % 4).
// The host build computes the same four outputs of this lane directly: it checks the kernel's
// tiles, addresses and accumulator mapping, not the fragment layout, which only a GPU can run.
extern "C" __device__ __forceinline__ void awqc_mma_m16n8k16(const void* a, int lda, const void* b, int ldb,
                                                             float* c, int lane) {
  const half* A = static_cast<const half*>(a);
  const half* B = static_cast<const half*>(b);
  const int g = lane >> 2, t = lane & 3;
#ifdef __CUDA_ARCH__
  const unsigned a0 = *reinterpret_cast<const unsigned*>(A + g * lda + 2 * t);
  const unsigned a1 = *reinterpret_cast<const unsigned*>(A + (g + 8) * lda + 2 * t);
  const unsigned a2 = *reinterpret_cast<const unsigned*>(A + g * lda + 2 * t + 8);
  const unsigned a3 = *reinterpret_cast<const unsigned*>(A + (g + 8) * lda + 2 * t + 8);
  const unsigned b0 = *reinterpret_cast<const unsigned*>(B + g * ldb + 2 * t);
  const unsigned b1 = *reinterpret_cast<const unsigned*>(B + g * ldb + 2 * t + 8);
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += (float)A[row * lda + k] * (float)B[col * ldb + k];
    c[i] += sum;
  }
#endif
}
"""

HELPERS: dict[str, str] = {"awqc_w4_dot8": _DOT8, "awqc_w4_dequant8": _DEQUANT8, "awqc_pair8": _PAIR8,
                           "awqc_mma_m16n8k16": _MMA}

# Just enough of cuda_fp16.h / the CUDA intrinsics for the helpers to compile as host C++.
HOST_SHIM = r"""
#include <cstdint>
#define __device__
#define __forceinline__
typedef _Float16 half;
struct half2 { _Float16 x, y; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline half2 __float2half2_rn(float f) { return {(_Float16)f, (_Float16)f}; }
static inline float2 __half22float2(half2 h) { return {(float)h.x, (float)h.y}; }
static inline half2 __hsub2(half2 a, half2 b) { return {(_Float16)(a.x - b.x), (_Float16)(a.y - b.y)}; }
static inline half2 __hfma2(half2 a, half2 b, half2 c) {  // the product of two halves is exact in float
  return {(_Float16)((float)a.x * (float)b.x + (float)c.x), (_Float16)((float)a.y * (float)b.y + (float)c.y)};
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  uint64_t v = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
static inline unsigned awqc_host_lop3(unsigned a, unsigned b, unsigned c, unsigned lut) {
  unsigned r = 0;  // bit i of the result is bit (a_i b_i c_i) of the lookup table, as PTX defines it
  for (int i = 0; i < 32; ++i) {
    unsigned index = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1);
    r |= ((lut >> index) & 1u) << i;
  }
  return r;
}
"""


def host_helper_source() -> str:
    """All helpers as one host C++ translation unit (for the emulation's extern calls)."""
    seen, parts = set(), [HOST_SHIM]
    for src in HELPERS.values():
        if src not in seen:
            parts.append(src)
            seen.add(src)
    return "\n".join(parts)


def _helper(name: str, ret: str, *args: tirx.PrimExpr, emulate: bool) -> tirx.PrimExpr:
    """A call of a device helper: CUDA source attached to the kernel, or an extern C call."""
    if emulate:
        return tirx.call_extern(ret, name, *args)
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call(name, *args, source_code=HELPERS[name], return_type=ret)


def _half_bits2(h: tirx.PrimExpr) -> tirx.PrimExpr:
    """An fp16 scalar broadcast into both halves of a uint32 (the bit pattern of a half2)."""
    u = tirx.Cast("uint32", tirx.call_intrin("uint16", "tirx.reinterpret", h))
    return tirx.bitwise_or(u, tirx.shift_left(u, tirx.const(16, "uint32")))


def _u32(halves: tirx.PrimExpr) -> tirx.PrimExpr:
    """Two halves (a float16x2 load) as the uint32 the helpers take."""
    return tirx.call_intrin("uint32", "tirx.reinterpret", halves)


def _neg_zero_scale(zero: tirx.PrimExpr, scale: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("float16", -(tirx.Cast("float32", zero) * tirx.Cast("float32", scale)))


def _loops(emulate: bool):
    """Loop kinds for (blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y); serial when emulating."""
    if emulate:
        return T.serial, T.serial, T.serial, T.serial
    return tuple((lambda tag: (lambda n: T.thread_binding(n, thread=tag)))(tag)
                 for tag in ("blockIdx.x", "blockIdx.y", "threadIdx.x", "threadIdx.y"))


# ------------------------------------------------------------------------------------------------
# float16 GEMV (decode)
def w4_gemv_f16(k: int, n: int, group: int, rows: int = 4, emulate: bool = False) -> tirx.PrimFunc:
    """y[0, n] = sum_k x[0, k] * w[n, k], one warp per output row, `rows` rows per block."""
    _check_fast_path(k, group)
    kw, ng, chunks = k // PACK, k // group, k // CHUNK
    chunks_per_group = group // CHUNK
    steps = (chunks + WARP - 1) // WARP  # chunks a lane visits
    blocks = (n + rows - 1) // rows
    bx_loop, _, tx_loop, ty_loop = _loops(emulate)
    local = "local"

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((1, k), "float16"), qweight: T.Buffer((n, kw), "uint32"),
               scales: T.Buffer((n, ng), "float16"), zeros: T.Buffer(zeros_shape(n, ng), "uint32"),
               y: T.Buffer((1, n), "float16")):
        T.func_attr({"tirx.noalias": True})
        part = T.sblock_alloc_buffer((WARP, n), "float32", scope=local)  # one partial per lane
        acc = T.sblock_alloc_buffer((n,), "float32", scope=local)
        for bx in bx_loop(blocks):
            for ty in ty_loop(rows):
                for tx in tx_loop(WARP):
                    with T.sblock("part_init"):
                        vt = T.axis.spatial(WARP, tx)
                        vn = T.axis.spatial(n, bx * rows + ty)
                        T.where(bx * rows + ty < n)
                        part[vt, vn] = T.float32(0)
                    for step in range(steps):
                        with T.sblock("part_update"):
                            vt = T.axis.spatial(WARP, tx)
                            vn = T.axis.spatial(n, bx * rows + ty)
                            vc = T.axis.reduce(chunks, step * WARP + tx)
                            T.where(bx * rows + ty < n and step * WARP + tx < chunks)
                            T.reads(part[vt, vn], x[0, vc * CHUNK:vc * CHUNK + CHUNK],
                                    qweight[vn, vc * WORDS_PER_CHUNK:vc * WORDS_PER_CHUNK + WORDS_PER_CHUNK],
                                    scales[vn, vc // chunks_per_group],
                                    zeros[vn, vc // chunks_per_group // ZEROS_PER_WORD])
                            T.writes(part[vt, vn])
                            qv = T.sblock_alloc_buffer((WORDS_PER_CHUNK,), "uint32", scope=local)
                            xv = T.sblock_alloc_buffer((CHUNK,), "float16", scope=local)
                            # 128-bit loads: four weight words, then 4 x 8 activations
                            qv[T.ramp(0, 1, 4)] = qweight[vn, T.ramp(vc * WORDS_PER_CHUNK, 1, 4)]
                            for v in T.unroll(4):
                                xv[T.ramp(v * 8, 1, 8)] = x[0, T.ramp(vc * CHUNK + v * 8, 1, 8)]
                            s = scales[vn, vc // chunks_per_group]
                            z = zero_at(zeros, vn, vc // chunks_per_group)
                            for w in T.unroll(WORDS_PER_CHUNK):
                                part[vt, vn] = part[vt, vn] + _helper(
                                    "awqc_w4_dot8", "float32", qv[w],
                                    _u32(xv[T.ramp(w * 8, 1, 2)]), _u32(xv[T.ramp(w * 8 + 2, 1, 2)]),
                                    _u32(xv[T.ramp(w * 8 + 4, 1, 2)]), _u32(xv[T.ramp(w * 8 + 6, 1, 2)]),
                                    _half_bits2(s), _half_bits2(_neg_zero_scale(z, s)), emulate=emulate)
                for tx in tx_loop(WARP):
                    with T.sblock("warp_reduce"):
                        vt = T.axis.reduce(WARP, tx)
                        vn = T.axis.spatial(n, bx * rows + ty)
                        T.where(bx * rows + ty < n)
                        with T.init():
                            acc[vn] = T.float32(0)
                        acc[vn] = acc[vn] + part[vt, vn]
                with T.sblock("store"):
                    vn = T.axis.spatial(n, bx * rows + ty)
                    T.where(bx * rows + ty < n)
                    y[0, vn] = T.Cast("float16", acc[vn])

    return kernel


# ------------------------------------------------------------------------------------------------
# float16 GEMM (prefill)
def w4_gemm_f16(k: int, n: int, group: int, knobs: W4CudaKnobs = W4CudaKnobs(),
                emulate: bool = False) -> tirx.PrimFunc:
    """y[m, n] = sum_k x[m, k] * w[n, k] for a dynamic number of rows m, shared-memory tiled."""
    _check_fast_path(k, group)
    bm, bn, tm, tn = knobs.gemm_bm, knobs.gemm_bn, knobs.gemm_tm, knobs.gemm_tn
    threads = knobs.gemm_threads
    tcols = bn // tn  # threads along n; a thread's columns are tcols apart
    if threads != bn or bm * CHUNK // 8 != threads:
        raise ValueError(f"GEMM tile {knobs} must have one thread per weight row and per 8 activations")
    mma = knobs.gemm_mma
    if mma and (bm, bn, threads) != (MMA_WARP_TILE, 4 * MMA_WARP_TILE, 4 * WARP):
        raise ValueError(f"the tensor-core GEMM takes a {MMA_WARP_TILE} x {4 * MMA_WARP_TILE} block tile "
                         f"of 4 warps, not {knobs}")
    regs = MMA_REGS if mma else tm * tn  # float32 accumulators per thread
    kw, ng = k // PACK, k // group
    ktiles = k // CHUNK
    tiles_per_group = group // CHUNK
    pad = CHUNK + 8  # shared row stride in halves: 80 bytes, so 16-byte accesses of 8 rows hit all 32 banks
    m = tirx.Var("m", "int64")
    bx_loop, by_loop, tx_loop, _ = _loops(emulate)
    shared = "global" if emulate else "shared"
    local = "local"
    nb = (n + bn - 1) // bn
    mb = (m + bm - 1) // bm

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((m, k), "float16"), qweight: T.Buffer((n, kw), "uint32"),
               scales: T.Buffer((n, ng), "float16"), zeros: T.Buffer(zeros_shape(n, ng), "uint32"),
               y: T.Buffer((m, n), "float16")):
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((threads, regs), "float32", scope=local)
        for by in by_loop(mb):
            for bx in bx_loop(nb):
                for tid in tx_loop(threads):
                    with T.sblock("acc_init"):
                        vt = T.axis.spatial(threads, tid)
                        T.reads()
                        T.writes(acc[vt, 0:regs])
                        for r in range(regs):
                            acc[vt, r] = T.float32(0)
                for kt in range(ktiles):
                    with T.sblock("ktile"):
                        vby = T.axis.spatial(mb, by)
                        vbx = T.axis.spatial(nb, bx)
                        vk = T.axis.opaque(ktiles, kt)
                        T.reads(x[vby * bm:vby * bm + bm, vk * CHUNK:vk * CHUNK + CHUNK],
                                qweight[vbx * bn:vbx * bn + bn, vk * WORDS_PER_CHUNK:vk * WORDS_PER_CHUNK + 4],
                                scales[vbx * bn:vbx * bn + bn, vk // tiles_per_group],
                                zeros[vbx * bn:vbx * bn + bn, vk // tiles_per_group // ZEROS_PER_WORD],
                                acc[0:threads, 0:regs])
                        T.writes(acc[0:threads, 0:regs])
                        xs = T.sblock_alloc_buffer((bm, pad), "float16", scope=shared)
                        ws = T.sblock_alloc_buffer((bn, pad), "float16", scope=shared)
                        for tid in tx_loop(threads):
                            with T.sblock("load_x"):
                                # thread -> (row, 8 activations); rows past m are zero
                                vt = T.axis.spatial(threads, tid)
                                T.sblock_attr({"buffer_dim_align": [[0, 0, CHUNK, pad - CHUNK]]})
                                T.reads(x[vby * bm + vt // 4, vk * CHUNK + vt % 4 * 8:vk * CHUNK + vt % 4 * 8 + 8])
                                T.writes(xs[vt // 4, vt % 4 * 8:vt % 4 * 8 + 8])
                                xv = T.sblock_alloc_buffer((8,), "float16", scope=local)
                                if vby * bm + vt // 4 < m:
                                    xv[T.ramp(0, 1, 8)] = x[vby * bm + vt // 4, T.ramp(vk * CHUNK + vt % 4 * 8, 1, 8)]
                                else:
                                    xv[T.ramp(0, 1, 8)] = T.Broadcast(T.float16(0), 8)
                                T.evaluate(_helper(
                                    "awqc_pair8", "void", _u32(xv[T.ramp(0, 1, 2)]), _u32(xv[T.ramp(2, 1, 2)]),
                                    _u32(xv[T.ramp(4, 1, 2)]), _u32(xv[T.ramp(6, 1, 2)]),
                                    T.address_of(xs[vt // 4, vt % 4 * 8]), emulate=emulate))
                        for tid in tx_loop(threads):
                            with T.sblock("load_w"):
                                # thread -> one weight row: a 128-bit load, dequantized to 32 halves
                                vt = T.axis.spatial(threads, tid)
                                T.sblock_attr({"buffer_dim_align": [[0, 0, CHUNK, pad - CHUNK]]})
                                T.reads(qweight[vbx * bn + vt, vk * WORDS_PER_CHUNK:vk * WORDS_PER_CHUNK + 4],
                                        scales[vbx * bn + vt, vk // tiles_per_group],
                                        zeros[vbx * bn + vt, vk // tiles_per_group // ZEROS_PER_WORD])
                                T.writes(ws[vt, 0:CHUNK])
                                qv = T.sblock_alloc_buffer((WORDS_PER_CHUNK,), "uint32", scope=local)
                                if vbx * bn + vt < n:
                                    qv[T.ramp(0, 1, 4)] = qweight[vbx * bn + vt, T.ramp(vk * WORDS_PER_CHUNK, 1, 4)]
                                    s = scales[vbx * bn + vt, vk // tiles_per_group]
                                    z = zero_at(zeros, vbx * bn + vt, vk // tiles_per_group)
                                    for w in T.unroll(WORDS_PER_CHUNK):
                                        T.evaluate(_helper("awqc_w4_dequant8", "void", qv[w], _half_bits2(s),
                                                           _half_bits2(_neg_zero_scale(z, s)),
                                                           T.address_of(ws[vt, w * 8]), emulate=emulate))
                                else:
                                    for w in T.unroll(WORDS_PER_CHUNK):
                                        ws[vt, T.ramp(w * 8, 1, 8)] = T.Broadcast(T.float16(0), 8)
                        if not emulate:  # the helpers write shared memory through pointers, unseen by ThreadSync
                            T.evaluate(T.tvm_storage_sync("shared"))
                        for tid in tx_loop(threads):
                            if mma:
                                with T.sblock("compute_mma"):
                                    # warp tid // 32 owns columns 32 w .. 32 w + 31 of the block tile
                                    vt = T.axis.spatial(threads, tid)
                                    T.reads(xs[0:bm, 0:CHUNK], ws[vt // WARP * MMA_WARP_TILE:
                                                                  vt // WARP * MMA_WARP_TILE + MMA_WARP_TILE, 0:CHUNK],
                                            acc[vt, 0:regs])
                                    T.writes(acc[vt, 0:regs])
                                    for kk in range(CHUNK // 16):
                                        for mt in T.unroll(2):
                                            for nt in T.unroll(4):
                                                T.evaluate(_helper(
                                                    "awqc_mma_m16n8k16", "void", T.address_of(xs[mt * 16, kk * 16]),
                                                    pad, T.address_of(ws[vt // WARP * MMA_WARP_TILE + nt * 8, kk * 16]),
                                                    pad, T.address_of(acc[vt, (mt * 4 + nt) * 4]), vt % WARP,
                                                    emulate=emulate))
                            else:
                                with T.sblock("compute"):
                                    vt = T.axis.spatial(threads, tid)
                                    T.reads(xs[vt // tcols * tm:vt // tcols * tm + tm, 0:CHUNK],
                                            ws[vt % tcols:vt % tcols + (tn - 1) * tcols + 1, 0:CHUNK],
                                            acc[vt, 0:regs])
                                    T.writes(acc[vt, 0:regs])
                                    a = T.sblock_alloc_buffer((tm, 8), "float16", scope=local)
                                    b = T.sblock_alloc_buffer((tn, 8), "float16", scope=local)
                                    af = T.sblock_alloc_buffer((tm,), "float32", scope=local)
                                    bf = T.sblock_alloc_buffer((tn,), "float32", scope=local)
                                    for kk in range(CHUNK // 8):
                                        for i in T.unroll(tm):  # 128-bit shared loads
                                            a[i, T.ramp(0, 1, 8)] = xs[vt // tcols * tm + i, T.ramp(kk * 8, 1, 8)]
                                        for j in T.unroll(tn):
                                            b[j, T.ramp(0, 1, 8)] = ws[vt % tcols + j * tcols, T.ramp(kk * 8, 1, 8)]
                                        for e in T.unroll(8):  # convert each operand once, then tm x tn FMAs
                                            for i in T.unroll(tm):
                                                af[i] = T.Cast("float32", a[i, e])
                                            for j in T.unroll(tn):
                                                bf[j] = T.Cast("float32", b[j, e])
                                            for i in T.unroll(tm):
                                                for j in T.unroll(tn):
                                                    acc[vt, i * tn + j] = acc[vt, i * tn + j] + af[i] * bf[j]
                        if not emulate:  # the next tile's loads overwrite xs and ws
                            T.evaluate(T.tvm_storage_sync("shared"))
                for tid in tx_loop(threads):
                    if mma:
                        for r in range(regs):
                            with T.sblock("store_mma"):
                                # register r: mma tile (r // 16, r // 4 % 4), entry r % 4 of mma.sync's C layout
                                vby = T.axis.spatial(mb, by)
                                vbx = T.axis.spatial(nb, bx)
                                vt, vr = T.axis.remap("SS", [tid, r])
                                T.where(by * bm + _mma_row(tid, r) < m and bx * bn + _mma_col(tid, r) < n)
                                y[vby * bm + _mma_row(vt, vr), vbx * bn + _mma_col(vt, vr)] = T.Cast(
                                    "float16", acc[vt, vr])
                    else:
                        for i, j in T.grid(tm, tn):
                            with T.sblock("store"):
                                vby = T.axis.spatial(mb, by)
                                vbx = T.axis.spatial(nb, bx)
                                vt, vi, vj = T.axis.remap("SSS", [tid, i, j])
                                T.where(by * bm + tid // tcols * tm + i < m and bx * bn + tid % tcols + j * tcols < n)
                                y[vby * bm + vt // tcols * tm + vi, vbx * bn + vt % tcols + vj * tcols] = T.Cast(
                                    "float16", acc[vt, vi * tn + vj])

    return kernel


def _mma_row(thread: tirx.PrimExpr, reg: tirx.PrimExpr) -> tirx.PrimExpr:
    """Block-tile row of a tensor-core GEMM accumulator: mma tile row reg // 16, then mma.sync's
    C layout (lane / 4, + 8 for entries 2 and 3)."""
    return reg // 16 * 16 + thread % WARP // 4 + reg % 4 // 2 * 8


def _mma_col(thread: tirx.PrimExpr, reg: tirx.PrimExpr) -> tirx.PrimExpr:
    """Block-tile column: the warp's 32 columns, mma tile column reg // 4 % 4, then the C layout
    (2 (lane % 4), + 1 for odd entries)."""
    return thread // WARP * MMA_WARP_TILE + reg // 4 % 4 * 8 + thread % 4 * 2 + reg % 2


def _check_fast_path(k: int, group: int) -> None:
    if k % CHUNK or group % CHUNK:
        raise ValueError(f"the CUDA fp16 int4 kernels need K ({k}) and the group size ({group}) "
                         f"to be multiples of {CHUNK}")


# ------------------------------------------------------------------------------------------------
# float32 activations: schedules of the generic kernel
def schedule_w4_gemv_generic(func: tirx.PrimFunc, rows: int = 4) -> tirx.PrimFunc:
    """Warp per output row over the generic kernel; lanes own consecutive k8 words."""
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("w4_matmul")
    _, j, r = sch.get_loops(mm)
    ro, lane, word = sch.split(r, [None, WARP, PACK])
    rf = sch.rfactor(lane, 0)
    _, j_rf, ro_rf, lane_rf, word_rf = sch.get_loops(rf)
    sch.reorder(j_rf, lane_rf, ro_rf, word_rf)
    jo, ji = sch.split(j_rf, [None, rows])
    sch.bind(jo, "blockIdx.x")
    sch.bind(ji, "threadIdx.y")
    sch.bind(lane_rf, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, ro_rf)
    sch.unroll(word_rf)
    sch.reverse_compute_at(mm, ji)
    sch.bind(sch.get_loops(mm)[-1], "threadIdx.x")
    sch.set_scope(mm, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("w4_store"), ji)
    return sch.mod["main"]


def schedule_w4_gemm_generic(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """One thread per output element, the reduction in a register."""
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("w4_matmul")
    i, j, _ = sch.get_loops(mm)
    fused = sch.fuse(i, j)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(mm, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("w4_store"), tx)
    return sch.mod["main"]


# ------------------------------------------------------------------------------------------------
def _signature(func: tirx.PrimFunc) -> tuple[int, int, str]:
    """(K, N, activation dtype) of a w4_matmul kernel."""
    x, qweight = (p.ty for p in func.params[:2])  # parameters are typed by their buffers
    return int(x.shape[1]), int(qweight.shape[0]), str(x.dtype)


def schedule_w4_cuda(func: tirx.PrimFunc, group: int, rows: int | None,
                     knobs: W4CudaKnobs = W4CudaKnobs()) -> tirx.PrimFunc:
    """The CUDA kernel for a w4_matmul built with `rows` (1: decode GEMV, None: prefill GEMM).
    float16 activations get the hand-written kernels above (same signature and layout);
    float32 a schedule of the generic kernel."""
    k, n, dtype = _signature(func)
    if dtype == "float16":
        if rows == 1:
            return w4_gemv_f16(k, n, group, knobs.gemv_rows)
        if rows is None:
            return w4_gemm_f16(k, n, group, knobs)
    if rows == 1:
        return schedule_w4_gemv_generic(func, knobs.gemv_rows)
    return schedule_w4_gemm_generic(func)
