"""Dequant-fused 4-bit linear kernels (W4A16: int4 weights, float activations) and the packing
layout they read.

Layout "k8": qweight [N, K/8] uint32, nibble j (bits 4j..4j+3) of word w holds column k = 8w + j;
scales and zeros [N, K/G] in the activation dtype; w[n, k] = (q - zero) * scale.

The dequantization is written inside the reduction, so no float copy of a weight matrix exists
at any point; the per-target schedules only split, vectorize and parallelize these loops.
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

LAYOUT = "k8"
PACK = 8  # int4 values per uint32 word


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
    def kernel(x: T.Buffer((m, k), dtype), qweight: T.Buffer((n, kw), "uint32"), scales: T.Buffer((n, ng), dtype),
               zeros: T.Buffer((n, ng), dtype), y: T.Buffer((m, n), dtype)):
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
                    - T.Cast("float32", zeros[vj, vr // group])) * T.Cast("float32", scales[vj, vr // group])
        for i, j in T.grid(m, n):
            with T.sblock("w4_store"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.Cast(dtype, acc[vi, vj])

    return kernel
