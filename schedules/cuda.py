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
  This is a SIMT GEMM: tensor-core MMA (mma.sync) is not used yet. Every line of this kernel
  runs in the emulation below; an MMA fragment layout would not, and no GPU was at hand.

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

from tvm import s_tir, tirx
from tvm.script import tirx as T

from .w4_kernels import PACK, ZEROS_PER_WORD, zero_at, zeros_shape

WORDS_PER_CHUNK = 4  # k8 words per 128-bit load
CHUNK = WORDS_PER_CHUNK * PACK  # 32 weights per 128-bit load
WARP = 32


@dataclasses.dataclass(frozen=True)
class W4CudaKnobs:
    """Tile sizes; records per target may override them (schedules/records/)."""
    gemv_rows: int = 4  # warps (output rows) per block
    gemm_bm: int = 32  # activation rows per block tile
    gemm_bn: int = 128  # output columns per block tile (one weight row per thread when loading)
    gemm_tm: int = 4  # rows per thread
    gemm_tn: int = 8  # columns per thread (strided by bn / tn so shared reads do not conflict)

    @property
    def gemm_threads(self) -> int:
        return (self.gemm_bm // self.gemm_tm) * (self.gemm_bn // self.gemm_tn)


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

HELPERS: dict[str, str] = {"awqc_w4_dot8": _DOT8, "awqc_w4_dequant8": _DEQUANT8, "awqc_pair8": _PAIR8}

# Just enough of cuda_fp16.h / the CUDA intrinsics for the helpers to compile as host C++.
HOST_SHIM = r"""
#include <cstdint>
#define __device__
#define __forceinline__
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
        acc = T.sblock_alloc_buffer((threads, tm, tn), "float32", scope=local)
        for by in by_loop(mb):
            for bx in bx_loop(nb):
                for tid in tx_loop(threads):
                    with T.sblock("acc_init"):
                        vt = T.axis.spatial(threads, tid)
                        T.reads()
                        T.writes(acc[vt, 0:tm, 0:tn])
                        for i, j in T.grid(tm, tn):
                            acc[vt, i, j] = T.float32(0)
                for kt in range(ktiles):
                    with T.sblock("ktile"):
                        vby = T.axis.spatial(mb, by)
                        vbx = T.axis.spatial(nb, bx)
                        vk = T.axis.opaque(ktiles, kt)
                        T.reads(x[vby * bm:vby * bm + bm, vk * CHUNK:vk * CHUNK + CHUNK],
                                qweight[vbx * bn:vbx * bn + bn, vk * WORDS_PER_CHUNK:vk * WORDS_PER_CHUNK + 4],
                                scales[vbx * bn:vbx * bn + bn, vk // tiles_per_group],
                                zeros[vbx * bn:vbx * bn + bn, vk // tiles_per_group // ZEROS_PER_WORD],
                                acc[0:threads, 0:tm, 0:tn])
                        T.writes(acc[0:threads, 0:tm, 0:tn])
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
                            with T.sblock("compute"):
                                vt = T.axis.spatial(threads, tid)
                                T.reads(xs[vt // tcols * tm:vt // tcols * tm + tm, 0:CHUNK],
                                        ws[vt % tcols:vt % tcols + (tn - 1) * tcols + 1, 0:CHUNK],
                                        acc[vt, 0:tm, 0:tn])
                                T.writes(acc[vt, 0:tm, 0:tn])
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
                                                acc[vt, i, j] = acc[vt, i, j] + af[i] * bf[j]
                        if not emulate:  # the next tile's loads overwrite xs and ws
                            T.evaluate(T.tvm_storage_sync("shared"))
                for tid in tx_loop(threads):
                    for i, j in T.grid(tm, tn):
                        with T.sblock("store"):
                            vby = T.axis.spatial(mb, by)
                            vbx = T.axis.spatial(nb, bx)
                            vt, vi, vj = T.axis.remap("SSS", [tid, i, j])
                            T.where(by * bm + tid // tcols * tm + i < m and bx * bn + tid % tcols + j * tcols < n)
                            y[vby * bm + vt // tcols * tm + vi, vbx * bn + vt % tcols + vj * tcols] = T.Cast(
                                "float16", acc[vt, vi, vj])

    return kernel


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
