"""W4A8 decode GEMV and prefill GEMM for x86 and aarch64: int4 weights (layout "d{L}", schedules/layouts.py) times int8
activations with integer dot-product instructions, the route llama.cpp's Q4_0 x Q8_0 takes.

Why: the W4A16 GEMV (w4_cpu.py) spends an AND, an int->float convert and an FMA per L weights
and tops out near a third of the read bandwidth on one core. Here x is rounded to int8 once per
call (per group: scale dx = max|x| / 127, the semantics of w4_kernels.w4_gemm_dot), and one
instruction multiplies 4 weight bytes by 4 activation bytes and sums them, in every lane:
  * "vnni": AVX-512 VNNI vpdpbusd (u8 x s8, accumulated in int32);
  * "avx2": vpmaddubsw (u8 x s8 -> pairs summed in int16; |q * xq| <= 15 * 127 so two never
    saturate) then vpmaddwd by ones (-> int32) and an add;
  * "sdot": aarch64 dotprod (Armv8.2+: Cortex-A76/A78, X1, Orin's A78AE) sdot (s8 x s8 -> int32),
    two 128-bit instructions per 8-lane word vector. The weight nibbles 0..15 are the same bytes
    as signed or unsigned, so the data and the algebra are the x86 kernels'.
Lanes hold rows: word (c, r) of a tile carries columns 8c..8c+7 of row r (byte i: column 8c+i
in the low nibble, 8c+4+i in the high one), so AND 0x0F and (>> 4) & 0x0F give two operands
whose activation side is one broadcast of 4 int8 values. Per group and tile, the int32 sums of L
rows convert to float once and take their (float16) scale with one vector FMA; the 4-bit zero
points of the tile's L rows come from L/8 words, one nibble per lane; the zero point is folded
out:  y[n] = sum_g s[n,g] (dx_g sum_k xq_k q[n,k] - z[n,g] dx_g sum_k xq_k).

The GEMM (prefill) is the same loop with GEMM_ROWS activation rows per unpacked weight word: the
AND/shift of a word is paid once and feeds 2 x GEMM_ROWS dot products into 8 independent
accumulators. Rows are padded to GEMM_ROWS with zero activations (never stored), and taken in
chunks whose int8 copy (chunk x K bytes) stays in L2 while every weight tile passes over it.

The kernels are written directly as loops over vectors (TVMScript without blocks): the dot
instructions have no scalar form for a schedule to vectorize.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .layouts import DotLayout
from .w4_cpu import _kernel_shape
from .w4_kernels import PACK, SCALE_DTYPE, ZEROS_PER_WORD, _check_dot, zeros_shape

DOT_ISAS = ("vnni", "avx2", "sdot")
CHAINS = 4  # independent int32 accumulators per tile (the dot instruction's latency is ~4 cycles)
GEMM_ROWS = 4  # activation rows per weight unpack in the GEMM (x 2 chains: 8 accumulators)
GEMM_CHUNK_BYTES = 128 << 10
_LOW_NIBBLES = 0x0F0F0F0F


def dot_isa(tvm_target: dict) -> str | None:
    """Which integer dot product an LLVM CPU target has: "vnni", "avx2" (x86), "sdot" (aarch64
    with +dotprod), or None (older CPUs, other architectures)."""
    if tvm_target.get("kind") != "llvm":
        return None
    triple, mattr = str(tvm_target.get("mtriple", "")), set(tvm_target.get("mattr", []))
    if triple.startswith("aarch64"):
        return "sdot" if "+dotprod" in mattr else None
    if not triple.startswith("x86_64"):
        return None
    if "+avx512vnni" in mattr and tvm_target.get("mcpu") == "x86-64-v4":
        return "vnni"
    if tvm_target.get("mcpu") in ("x86-64-v3", "x86-64-v4") or "+avx2" in mattr:
        return "avx2"
    return None


def _hmax8(v):
    return T.max(T.max(T.max(v[0], v[1]), T.max(v[2], v[3])), T.max(T.max(v[4], v[5]), T.max(v[6], v[7])))


def _hsum8(v):
    return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]


def w4a8_gemv(k: int, n: int, group: int, lanes: int, isa: str) -> tirx.PrimFunc:
    """Decode GEMV y[1, N] = fq(x)[1, K] @ w[N, K]^T, float32 in and out (see module doc)."""
    return _w4a8_matmul(k, n, group, lanes, isa, 1)


def w4a8_gemm(k: int, n: int, group: int, lanes: int, isa: str) -> tirx.PrimFunc:
    """Prefill GEMM y[M, N] = fq(x)[M, K] @ w[N, K]^T for a dynamic number of rows M: each tile's
    weights are unpacked once per GEMM_ROWS activation rows and feed that many dot products."""
    return _w4a8_matmul(k, n, group, lanes, isa, None)


def _w4a8_matmul(k: int, n: int, group: int, lanes: int, isa: str, rows: int | None) -> tirx.PrimFunc:
    """rows=1: the GEMV (x is one row; CHAINS accumulator chains); rows=None: the GEMM (rows padded
    to GEMM_ROWS with zero activations; two chains per row, low and high nibbles)."""
    _check_dot(k, n, group, lanes)
    if isa not in DOT_ISAS:
        raise ValueError(f"unknown dot-product ISA {isa!r}; known: {', '.join(DOT_ISAS)}")
    if isa in ("avx2", "sdot") and lanes != 8:
        raise ValueError(f"the {isa} kernels work on 8-lane words (256-bit on AVX2, two NEON registers): layout d8")
    ng, words, tiles, kw4 = k // group, group // PACK, n // lanes, k // 4
    vi32, vf32 = f"int32x{lanes}", f"float32x{lanes}"
    mr = 1 if rows == 1 else GEMM_ROWS
    per_row = CHAINS if rows == 1 else 2  # int32 accumulator chains per activation row
    m = 1 if rows == 1 else tirx.Var("m", "int64")
    mp = 1 if rows == 1 else (m + mr - 1) // mr * mr
    row_loop = T.serial if rows == 1 else T.parallel
    # rows per chunk: the chunk's int8 activations (chunk x K bytes) stay in L2 while every tile
    # of weights passes over them
    chunk = 1 if rows == 1 else max(mr, GEMM_CHUNK_BYTES // k // mr * mr)

    def dot(acc, q, xq):  # acc[r] += sum of 4 byte products of q[r] and xq[r] (sdot: xq is 4 lanes, for each half)
        a = T.reinterpret(f"int8x{4 * lanes}", q)
        if isa == "sdot":  # per 128-bit half: lanes 4h..4h+3, weight bytes 16h..16h+15
            b = T.reinterpret("int8x16", xq)
            halves = [T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", tirx.Shuffle([acc], list(range(4 * h, 4 * h + 4))),
                tirx.Shuffle([a], list(range(16 * h, 16 * h + 16))), b) for h in range(2)]
            return tirx.Shuffle(halves, list(range(8)))
        b = T.reinterpret(f"int8x{4 * lanes}", xq)
        if isa == "vnni":
            return T.call_llvm_pure_intrin(vi32, f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", acc, a, b)
        pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a, b)
        return acc + T.call_llvm_pure_intrin(vi32, "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), 16))

    def high_nibbles(word):
        if isa == "sdot":  # NEON shifts bytes: one instruction, no mask
            return T.reinterpret(f"uint32x{lanes}", T.shift_right(T.reinterpret(f"uint8x{4 * lanes}", word),
                                                                  T.broadcast(T.uint8(4), 4 * lanes)))
        return T.bitwise_and(T.shift_right(word, T.broadcast(T.uint32(4), lanes)),
                             T.broadcast(T.uint32(_LOW_NIBBLES), lanes))

    def activations(xq4, row, g, w, half):
        """The 4 int8 activations word (g, w, half) multiplies, broadcast to every lane; for sdot
        a lane of the 16-byte vector that holds words w - w % 2 .. w - w % 2 + 1 of the group, so
        LLVM picks the lane-indexed sdot and loads 16 activations at once."""
        at = row * kw4 + (g * words + w) * 2 + half
        if isa != "sdot":
            return T.broadcast(xq4[at], lanes)
        base = row * kw4 + (g * words + w - w % 2) * 2
        return tirx.Shuffle([xq4[T.ramp(base, 1, 4)]], [(w % 2) * 2 + half] * 4)

    def vec(buf, start):
        return buf[T.ramp(start, 1, lanes)]

    def row_vec(buf, row, start):
        return buf[row, T.ramp(start, 1, lanes)]

    def zero_vec(zeros, t, g):  # the tile's `lanes` zero points of group g: words g*L/8 .. , one nibble per lane
        per = lanes // ZEROS_PER_WORD
        lane = T.ramp(0, 1, lanes)
        words = T.broadcast(zeros[t, g * per], lanes)
        for i in range(1, per):
            words = T.Select(lane < T.broadcast(i * ZEROS_PER_WORD, lanes), words,
                             T.broadcast(zeros[t, g * per + i], lanes))
        shifts = T.Cast(f"uint32x{lanes}", (lane % T.broadcast(ZEROS_PER_WORD, lanes)) * T.broadcast(4, lanes))
        return T.Cast(vf32, T.bitwise_and(T.shift_right(words, shifts), T.broadcast(T.uint32(15), lanes)))

    def chain_sum(iacc, row):  # the sum of activation row `row`'s per_row accumulator chains
        total = vec(iacc, row * per_row * lanes)
        for c in range(1, per_row):
            total = total + vec(iacc, (row * per_row + c) * lanes)
        return total

    @T.prim_func(private=True, s_tir=False)
    def kernel(x: T.Buffer((m, k), "float32"), qweight: T.Buffer((tiles, k // PACK * lanes), "uint32"),
               scales: T.Buffer((tiles, ng * lanes), SCALE_DTYPE),
               zeros: T.Buffer(zeros_shape(tiles, ng * lanes), "uint32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        xq = T.decl_buffer((mp * k,), "int8", scope="global")
        xq4 = T.decl_buffer((mp * kw4,), "uint32", data=xq.data)  # 4 int8 values per word, for broadcasts
        dx = T.decl_buffer((mp * ng,), "float32", scope="global")
        xsum = T.decl_buffer((mp * ng,), "float32", scope="global")  # dx_g * sum_k xq_k
        for r in row_loop(mp):  # O(M K) once per call: round x to int8 per row and group
            for g in range(ng):
                amax = T.decl_buffer((8,), "float32", scope="global")
                isum = T.decl_buffer((8,), "int32", scope="global")
                amax[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                isum[T.ramp(0, 1, 8)] = T.broadcast(0, 8)
                if r < m:  # padding rows stay zero: their products are zero and never stored
                    for w in range(words):
                        amax[T.ramp(0, 1, 8)] = T.max(amax[T.ramp(0, 1, 8)],
                                                      T.fabs(x[r, T.ramp(g * group + w * 8, 1, 8)]))
                big: T.let[T.float32] = _hmax8(amax)
                inv: T.let[T.float32] = T.Select(big > T.float32(0), T.float32(127) / big, T.float32(0))
                dx[r * ng + g] = big / T.float32(127)
                for w in range(words):
                    v: T.let[T.int32x8] = T.Cast("int32x8", T.nearbyint(
                        x[T.min(r, m - 1), T.ramp(g * group + w * 8, 1, 8)] * T.broadcast(inv, 8)))
                    xq[T.ramp(r * k + g * group + w * 8, 1, 8)] = T.Cast("int8x8", v)
                    isum[T.ramp(0, 1, 8)] = isum[T.ramp(0, 1, 8)] + v
                xsum[r * ng + g] = dx[r * ng + g] * T.Cast("float32", _hsum8(isum))
        for rc in range((mp + chunk - 1) // chunk):  # row chunks whose int8 rows stay in L2
            for t in T.parallel(tiles):  # each thread: a contiguous range of tiles, one weight stream
                # "global"-scoped so they become stack arrays (LLVM keeps them in registers); a
                # "local" allocation here would be a heap workspace per tile.
                acc = T.decl_buffer((mr * lanes,), "float32", scope="global")
                iacc = T.decl_buffer((mr * per_row * lanes,), "int32", scope="global")
                for rbi in range(chunk // mr):
                    rb = T.meta_var(rc * (chunk // mr) + rbi)
                    if rb < mp // mr:
                        for i in T.unroll(mr):
                            acc[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for g in range(ng):
                            for c in T.unroll(mr * per_row):
                                iacc[T.ramp(c * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                            for w in T.unroll(words):
                                word = T.meta_var(row_vec(qweight, t, (g * words + w) * lanes))
                                low = T.meta_var(T.bitwise_and(word, T.broadcast(T.uint32(_LOW_NIBBLES), lanes)))
                                high = T.meta_var(high_nibbles(word))
                                for i in T.unroll(mr):
                                    c0 = T.meta_var((i * per_row + (2 * w) % per_row) * lanes)
                                    c1 = T.meta_var((i * per_row + (2 * w + 1) % per_row) * lanes)
                                    row = T.meta_var(rb * mr + i)
                                    iacc[T.ramp(c0, 1, lanes)] = dot(vec(iacc, c0), low, activations(xq4, row, g, w, 0))
                                    iacc[T.ramp(c1, 1, lanes)] = dot(vec(iacc, c1), high, activations(xq4, row, g, w, 1))
                            s = T.meta_var(T.Cast(vf32, row_vec(scales, t, g * lanes)))
                            z = T.meta_var(zero_vec(zeros, t, g))
                            for i in T.unroll(mr):
                                total = T.meta_var(chain_sum(iacc, i))
                                acc[T.ramp(i * lanes, 1, lanes)] = vec(acc, i * lanes) + s * (
                                    T.Cast(vf32, total) * T.broadcast(dx[(rb * mr + i) * ng + g], lanes)
                                    - z * T.broadcast(xsum[(rb * mr + i) * ng + g], lanes))
                        for i in T.unroll(mr):
                            if rb * mr + i < m:
                                y[rb * mr + i, T.ramp(t * lanes, 1, lanes)] = vec(acc, i * lanes)

    return kernel


def dot_scheduler(layout: DotLayout, isa: str):
    """The int4 kernel scheduler for quantize_linear with layout d{L}: the W4A8 GEMV for decode
    and the W4A8 GEMM for prefill, both on `isa`'s integer dot product."""

    def schedule(func: tirx.PrimFunc, group: int, rows: int | None) -> tirx.PrimFunc:
        k, n = _kernel_shape(func)
        dtype = func.params[0].dtype
        if dtype != "float32":
            raise ValueError(f"W4A8 kernels take float32 activations, not {dtype}; compile with --dtype float32")
        if rows == 1:
            return w4a8_gemv(k, n, group, layout.lanes, isa)
        return w4a8_gemm(k, n, group, layout.lanes, isa)

    return schedule
