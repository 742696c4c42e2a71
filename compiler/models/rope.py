"""RoPE in the graph, at the KV cache's query positions, for families whose RoPE TVM's paged KV
cache cannot express: Gemma 3's per-layer bases, Phi-3's LongRoPE per-frequency factors. The
frequencies are constants computed as transformers computes them (float32)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op


def inverse_frequencies(head_dim: int, theta: float, factors: Sequence[float] | None = None,
                        position_scale: float = 1.0) -> np.ndarray:
    """[head_dim / 2] float32: position_scale / (factor_i * theta ** (2i / head_dim)), the rotation
    speed of each pair (transformers' inv_freq; LongRoPE's ext_factors as `factors`, linear scaling
    as position_scale = 1 / factor)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    ext = np.ones(head_dim // 2, np.float32) if factors is None else np.asarray(factors, np.float32)
    inv = np.float32(1.0) / (ext * np.float32(theta) ** exponent)
    return (inv * np.float32(position_scale)).astype(np.float32)


def rope(x: Tensor, positions: Tensor, inv_freq: np.ndarray, attention_factor: float = 1.0) -> Tensor:
    """x [b, s, heads, head_dim] rotated as transformers' rotate_half RoPE at the token positions
    [b * s]: the first 2 * len(inv_freq) dimensions of each head (all of them, or Phi-4-mini's
    partial rotation), first half against second half, the rest passed through; cos and sin in
    float32, times attention_factor (LongRoPE's)."""
    freqs = Tensor.from_const(np.asarray(inv_freq, np.float32))
    half = len(inv_freq)

    def compute(t: te.Tensor, pos: te.Tensor, inv: te.Tensor) -> te.Tensor:
        s = t.shape[1]

        def rotated(i, j, h, m):
            angle = tirx.Cast("float32", pos[i * s + j]) * inv[tirx.truncmod(m, half)]
            other = tirx.if_then_else(m < half, -t[i, j, h, tirx.min(m + half, 2 * half - 1)],
                                      t[i, j, h, tirx.max(m - half, 0)])
            cos, sin = (tirx.cos(angle) * attention_factor, tirx.sin(angle) * attention_factor)
            out = tirx.Cast(t.dtype, tirx.Cast("float32", t[i, j, h, m]) * cos + tirx.Cast("float32", other) * sin)
            return tirx.if_then_else(m < 2 * half, out, t[i, j, h, m])

        return te.compute(t.shape, rotated, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, positions, freqs])
