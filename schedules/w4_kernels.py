"""Dequant-fused 4-bit linear kernels (W4A16: int4 weights, float activations), one compute
definition per packing layout (schedules/layouts.py names the layouts and packs them).

Layout "k8": qweight [N, K/8] uint32, nibble j (bits 4j..4j+3) of word w holds column k = 8w + j;
scales [N, K/G] float16, zeros [N, K/G] as 4-bit integers 8 to a word; w[n, k] = (q - zero) * scale.
`w4_matmul` reads it with the dequantization inside the reduction.

Interleaved layouts "i{L}r{R}" (`w4_gemv_interleaved`, `w4_gemm_interleaved`): see layouts.py.
No float copy of a weight matrix exists at any point: the GEMV dequantizes in registers, the
GEMM a block of rows at a time (schedules put it under the block loop).
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

LAYOUT = "k8"
PACK = 8  # int4 values per uint32 word
ZEROS_PER_WORD = 8  # 4-bit zero points per uint32 word
SCALE_DTYPE = "float16"


def zeros_shape(rows: int, columns: int) -> tuple[int, int]:
    """Shape of [rows, columns] zero points packed 8 to a word (the last word zero-padded)."""
    return rows, -(-columns // ZEROS_PER_WORD)


def zero_at(zeros, *index):
    """Zero point [..., row, column] of packed zeros as float32: nibble column % 8 of word column // 8
    (leading indices: an expert's, of stacked experts)."""
    *rows, column = index
    return T.Cast("float32", T.bitwise_and(T.shift_right(
        zeros[(*rows, column // ZEROS_PER_WORD)], T.Cast("uint32", column % ZEROS_PER_WORD) * T.uint32(4)),
        T.uint32(15)))


def pack_k8(q: np.ndarray) -> np.ndarray:
    """q uint8 [N, K] in [0, 15] → uint32 [N, K/8] in layout k8."""
    n, k = q.shape
    words = q.astype(np.uint32).reshape(n, k // PACK, PACK)
    out = np.zeros((n, k // PACK), np.uint32)
    for j in range(PACK):
        out |= words[:, :, j] << np.uint32(4 * j)
    return out


def unpack_k8(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_k8."""
    n, kw = packed.shape
    nibbles = [(packed >> np.uint32(4 * j)) & np.uint32(15) for j in range(PACK)]
    return np.stack(nibbles, axis=-1).reshape(n, kw * PACK).astype(np.uint8)


def w4_matmul(k: int, n: int, group: int, dtype: str, rows: int | None) -> tirx.PrimFunc:
    """y[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k/G]) * scale[n, k/G], accumulated in float32.
    rows=1 gives the decode GEMV; rows=None a GEMM over a dynamic number of rows (prefill)."""
    if k % PACK or k % group:
        raise ValueError(f"K={k} must be a multiple of 8 and of the group size {group}")
    kw, ng = k // PACK, k // group
    m = rows if rows is not None else tirx.Var("m", "int64")

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((m, k), dtype), qweight: T.Buffer((n, kw), "uint32"),
               scales: T.Buffer((n, ng), SCALE_DTYPE), zeros: T.Buffer(zeros_shape(n, ng), "uint32"),
               y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True})
        # float32 accumulator whatever the activation dtype; schedules keep it in registers.
        acc = T.sblock_alloc_buffer((m, n), "float32")
        for i, j, r in T.grid(m, n, k):
            with T.sblock("w4_matmul"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    acc[vi, vj] = T.float32(0)
                acc[vi, vj] = acc[vi, vj] + T.Cast("float32", x[vi, vr]) * (
                    T.Cast("float32", T.bitwise_and(
                        T.shift_right(qweight[vj, vr // 8], T.Cast("uint32", vr % 8) * T.uint32(4)), T.uint32(15)))
                    - zero_at(zeros, vj, vr // group)) * T.Cast("float32", scales[vj, vr // group])
        for i, j in T.grid(m, n):
            with T.sblock("w4_store"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.Cast(dtype, acc[vi, vj])

    return kernel


# --- interleaved layouts ("i{L}r{R}", schedules/layouts.py) --------------------------------------
# Column k = 8L*b + L*j + l of a row is nibble j of word l of block b; R rows form a tile whose
# blocks are stored together: word index ((n // R) * K/(8L) + b) * R*L + (n % R) * L + l.
# In the kernels below k is written as g*G + L*u + l (group g, step u within the group, lane l).


def _il_word(qweight, n, k, lanes: int, rows: int):
    """The uint32 word holding column k of row n (qweight as [N/R, K/8 * R])."""
    return qweight[n // rows, ((k // (8 * lanes)) * rows + n % rows) * lanes + k % lanes]


def _il_nibble(k, lanes: int):
    """Which nibble of its word column k is."""
    return k % (8 * lanes) // lanes


def _il_scale_index(n, g, rows: int):
    """(row, column) of group g of row n in scales (and unpacked zeros) stored as [N/R, K/G * R]:
    a tile's R rows side by side per group, so a tile reads one contiguous run per group."""
    return n // rows, g * rows + n % rows


def _il_zero(zeros, n, g, rows: int):
    return zero_at(zeros, *_il_scale_index(n, g, rows))


def w4_gemv_interleaved(k: int, n: int, group: int, dtype: str, lanes: int, rows: int) -> tirx.PrimFunc:
    """Decode GEMV y[0, n] = sum_k x[k] (q[n, k] - z[n, g]) s[n, g] with the zero point factored
    out of the inner loop:  y[n] = sum_g s[n, g] * (sum_{k in g} x[k] q[n, k] - z[n, g] X[g]),
    where X[g] = sum_{k in g} x[k] is computed once per call and shared by every row.

    The inner product reads nibble j of a word without a shift: (word & 15 << 4j) is q * 16^j,
    and x was pre-multiplied by 16^-j (exact: a power of two) once per call, so one AND, one
    int->float convert and one FMA handle `lanes` weights. Nibble 7 would set the sign bit, so
    it is shifted down instead (and its x is not rescaled). Partial sums stay per lane
    (`lanes` wide) through the group scaling; the horizontal sum happens once per row.
    """
    _check_interleaved(k, n, group, lanes, rows)
    ng, steps = k // group, group // lanes

    def nibble_times_16j(word, j):  # float(q * 16^j); nibble 7 as q
        masked = T.bitwise_and(word, T.shift_left(T.uint32(15), T.Cast("uint32", j) * T.uint32(4)))
        return T.Cast("float32", T.Cast("int32", T.Select(j == 7, T.shift_right(word, T.uint32(28)), masked)))

    def inv_16j(j):  # 16^-j as float bits (exponent 127 - 4j); 1 for nibble 7
        return T.reinterpret("float32", T.Cast("uint32", T.Select(j == 7, 127, 127 - 4 * j)) << T.uint32(23))

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((1, k), dtype), qweight: T.Buffer((n // rows, k // PACK * rows), "uint32"),
               scales: T.Buffer((n // rows, ng * rows), SCALE_DTYPE),
               zeros: T.Buffer(zeros_shape(n // rows, ng * rows), "uint32"), y: T.Buffer((1, n), dtype)):
        T.func_attr({"tirx.noalias": True})
        xsum = T.sblock_alloc_buffer((ng, lanes), "float32")  # X[g], kept per lane
        xpre = T.sblock_alloc_buffer((k,), "float32")  # x[k] * 16^-j(k)
        dot = T.sblock_alloc_buffer((n, ng, lanes), "float32")  # sum_u x q, per group and lane
        acc = T.sblock_alloc_buffer((n, lanes), "float32")  # sum_g s (dot - z X), per lane
        total = T.sblock_alloc_buffer((n,), "float32")
        for g, u, l in T.grid(ng, steps, lanes):
            with T.sblock("w4_xsum"):
                vg, vu, vl = T.axis.remap("SRS", [g, u, l])
                with T.init():
                    xsum[vg, vl] = T.float32(0)
                xsum[vg, vl] = xsum[vg, vl] + T.Cast("float32", x[0, vg * group + vu * lanes + vl])
        for kk in range(k):
            with T.sblock("w4_xpre"):
                vk = T.axis.spatial(k, kk)
                xpre[vk] = T.Cast("float32", x[0, vk]) * inv_16j(_il_nibble(vk, lanes))
        for j, g, u, l in T.grid(n, ng, steps, lanes):
            with T.sblock("w4_dot"):
                vj, vg, vu, vl = T.axis.remap("SSRS", [j, g, u, l])
                with T.init():
                    dot[vj, vg, vl] = T.float32(0)
                dot[vj, vg, vl] = dot[vj, vg, vl] + xpre[vg * group + vu * lanes + vl] * nibble_times_16j(
                    _il_word(qweight, vj, vg * group + vu * lanes + vl, lanes, rows),
                    _il_nibble(vg * group + vu * lanes, lanes))
        for j, g, l in T.grid(n, ng, lanes):
            with T.sblock("w4_scale"):
                vj, vg, vl = T.axis.remap("SRS", [j, g, l])
                with T.init():
                    acc[vj, vl] = T.float32(0)
                acc[vj, vl] = acc[vj, vl] + T.Cast("float32", scales[_il_scale_index(vj, vg, rows)]) * (
                    dot[vj, vg, vl] - _il_zero(zeros, vj, vg, rows) * xsum[vg, vl])
        for j, l in T.grid(n, lanes):
            with T.sblock("w4_lanes"):
                vj, vl = T.axis.remap("SR", [j, l])
                with T.init():
                    total[vj] = T.float32(0)
                total[vj] = total[vj] + acc[vj, vl]
        for j in range(n):
            with T.sblock("w4_store"):
                vj = T.axis.spatial(n, j)
                y[0, vj] = T.Cast(dtype, total[vj])

    return kernel


def w4_gemm_interleaved(k: int, n: int, group: int, dtype: str, lanes: int, rows: int,
                        m: int | None) -> tirx.PrimFunc:
    """Prefill GEMM y[m, n] = sum_k x[m, k] w[n, k] over `m` rows (None: dynamic), weights in
    layout i{lanes}r{rows}."""
    _check_interleaved(k, n, group, lanes, rows)

    def nibble(qweight, j, kk):  # q[j, kk]
        return T.bitwise_and(T.shift_right(_il_word(qweight, j, kk, lanes, rows), T.Cast(
            "uint32", _il_nibble(kk, lanes)) * T.uint32(4)), T.uint32(15))

    return _w4_gemm(k, n, group, dtype, m, (n // rows, k // PACK * rows), rows, lanes, nibble, act_quant=False)


def w4_gemm_dot(k: int, n: int, group: int, dtype: str, lanes: int, m: int | None) -> tirx.PrimFunc:
    """y = fq(x) @ w^T for weights in layout d{lanes} (schedules/layouts.py), where fq rounds x
    to int8 per row and group (scale max|x| / 127), the activation quantization the W4A8 GEMV
    (schedules/w4a8_cpu.py) does. This is the prefill kernel and the GEMV's reference semantics."""
    _check_dot(k, n, group, lanes)

    def nibble(qweight, j, kk):  # byte kk%4 of word (kk//8, row j), low nibble for kk%8 < 4
        word = qweight[j // lanes, kk // PACK * lanes + j % lanes]
        shift = T.Cast("uint32", kk % 4 * 8 + kk % 8 // 4 * 4)
        return T.bitwise_and(T.shift_right(word, shift), T.uint32(15))

    return _w4_gemm(k, n, group, dtype, m, (n // lanes, k // PACK * lanes), lanes, PACK, nibble, act_quant=True)


def _w4_gemm(k: int, n: int, group: int, dtype: str, m: int | None, qshape: tuple[int, int], rows: int,
             steps_of: int, nibble, act_quant: bool) -> tirx.PrimFunc:
    """The GEMM every CPU layout shares, given how to read q[j, k] (`nibble`); scales and zeros
    are [N/rows, K/G * rows] (a tile's rows side by side per group). Compute bound, so the
    dequantization w = (q - z) * s is its own block: the schedule runs it for a block of weight
    rows at a time, into a buffer that stays in cache and is reused by every activation row.
    Its column loop is split (group, step u, lane l) with `steps_of` lanes."""
    ng, steps, lanes = k // group, group // steps_of, steps_of
    mm = m if m is not None else tirx.Var("m", "int64")

    def xf_value(x, amax, vi, vk):
        if not act_quant:
            return T.Cast("float32", x[vi, vk])
        a = amax[vi, vk // group]
        return T.Select(a > T.float32(0), T.nearbyint(T.Cast("float32", x[vi, vk]) * (T.float32(127) / a))
                        * (a / T.float32(127)), T.float32(0))

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((mm, k), dtype), qweight: T.Buffer(qshape, "uint32"),
               scales: T.Buffer((n // rows, ng * rows), SCALE_DTYPE),
               zeros: T.Buffer(zeros_shape(n // rows, ng * rows), "uint32"), y: T.Buffer((mm, n), dtype)):
        T.func_attr({"tirx.noalias": True})
        amax = T.sblock_alloc_buffer((mm, ng), "float32")
        xf = T.sblock_alloc_buffer((mm, k), "float32")
        w = T.sblock_alloc_buffer((n, k), "float32")
        acc = T.sblock_alloc_buffer((mm, n), "float32")
        if act_quant:  # a parse-time condition: no amax block without activation quantization
            for i, g, kk in T.grid(mm, ng, group):
                with T.sblock("w4_xamax"):
                    vi, vg, vk = T.axis.remap("SSR", [i, g, kk])
                    with T.init():
                        amax[vi, vg] = T.float32(0)
                    amax[vi, vg] = T.max(amax[vi, vg], T.fabs(T.Cast("float32", x[vi, vg * group + vk])))
        for i, kk in T.grid(mm, k):
            with T.sblock("w4_xf"):
                vi, vk = T.axis.remap("SS", [i, kk])
                xf[vi, vk] = xf_value(x, amax, vi, vk)
        for j, g, u, l in T.grid(n, ng, steps, lanes):
            with T.sblock("w4_dequant"):
                vj, vg, vu, vl = T.axis.remap("SSSS", [j, g, u, l])
                w[vj, vg * group + vu * lanes + vl] = (
                    T.Cast("float32", nibble(qweight, vj, vg * group + vu * lanes + vl))
                    - _il_zero(zeros, vj, vg, rows)) * T.Cast(
                    "float32", scales[_il_scale_index(vj, vg, rows)])
        for i, j, kk in T.grid(mm, n, k):
            with T.sblock("w4_matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                with T.init():
                    acc[vi, vj] = T.float32(0)
                acc[vi, vj] = acc[vi, vj] + xf[vi, vk] * w[vj, vk]
        for i, j in T.grid(mm, n):
            with T.sblock("w4_store"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.Cast(dtype, acc[vi, vj])

    return kernel


def _check_dot(k: int, n: int, group: int, lanes: int) -> None:
    if k % group or group % PACK or n % lanes:
        raise ValueError(f"layout d{lanes} needs K a multiple of the group size {group}, the group a multiple "
                         f"of {PACK} and N a multiple of {lanes}; got K={k}, N={n}, group {group}")


def _check_interleaved(k: int, n: int, group: int, lanes: int, rows: int) -> None:
    if k % (PACK * lanes) or k % group or group % lanes or n % rows:
        raise ValueError(f"layout i{lanes}r{rows} needs K a multiple of {PACK * lanes} and of the group size "
                         f"{group}, the group a multiple of {lanes} and N a multiple of {rows}; "
                         f"got K={k}, N={n}, group {group}")


# --- mixture of experts ------------------------------------------------------------------------------
def w4_expert_matmul(k: int, n: int, group: int, experts: int, slots: int, dtype: str,
                     per_slot: bool) -> tirx.PrimFunc:
    """y[t, j, o] = sum_r x[t, r] * W_e[o, r] for e = chosen[t, j] (x[t, j, r] where `per_slot`),
    with every expert's int4 weight W_e in layout k8, stacked: qweight [E, N, K/8], scales and
    zeros [E, N, ...] as k8's. Only the chosen experts' rows are read. Scheduled as written: rows
    in parallel per (token, slot); per row, 8 lanes (one per nibble of a word) accumulate x * q
    and the group's sum of x, so the zero point costs one FMA per group, not per weight."""
    if k % PACK or group % PACK or k % group:
        raise ValueError(f"K={k} must be a multiple of 8 and of the group size {group}")
    kw, ng, words = k // PACK, k // group, group // PACK

    def load_x(x, t, j, col):
        return T.Cast("float32", x[t, j, col] if per_slot else x[t, col])

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, var_chosen: T.handle, qweight: T.Buffer((experts, n, kw), "uint32"),
               scales: T.Buffer((experts, n, ng), SCALE_DTYPE), zeros: T.Buffer((experts, *zeros_shape(n, ng)), "uint32"),
               var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        tokens = T.int64()
        x = T.match_buffer(var_x, (tokens, slots, k) if per_slot else (tokens, k), dtype)
        chosen = T.match_buffer(var_chosen, (tokens, slots), "int32")
        y = T.match_buffer(var_y, (tokens, slots, n), dtype)
        for t, j in T.grid(tokens, T.int64(slots)):
            for o in T.parallel(n):
                with T.sblock("expert_row"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((PACK,), "float32")
                    part = T.sblock_alloc_buffer((PACK,), "float32")
                    xsum = T.sblock_alloc_buffer((PACK,), "float32")
                    e: T.let[T.int32] = chosen[t, j]
                    for b in T.vectorized(PACK):
                        acc[b] = T.float32(0)
                    for g in T.serial(ng):
                        for b in T.vectorized(PACK):
                            part[b] = T.float32(0)
                            xsum[b] = T.float32(0)
                        for w in T.serial(words):
                            for b in T.vectorized(PACK):  # nibble b of the word: column g*G + 8w + b
                                part[b] = part[b] + load_x(x, t, j, g * group + w * PACK + b) * T.Cast(
                                    "float32", T.bitwise_and(T.shift_right(qweight[e, o, g * words + w],
                                                                           T.Cast("uint32", b) * T.uint32(4)),
                                                             T.uint32(15)))
                                xsum[b] = xsum[b] + load_x(x, t, j, g * group + w * PACK + b)
                        for b in T.vectorized(PACK):
                            acc[b] = acc[b] + T.Cast("float32", scales[e, o, g]) * (
                                part[b] - zero_at(zeros, e, o, g) * xsum[b])
                    y[t, j, o] = T.Cast(dtype, acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7])

    return kernel

