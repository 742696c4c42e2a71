"""float32 exp2, sigmoid and tanh from operations that vectorize on every CPU target.

LLVM has no vector form of expf: TVM's `exp`, `sigmoid` and `tanh` become one scalar libm call per
element, which took ~70% of the attention kernels and nearly all of SiLU x gate. These are
2^round(x), built in the float's exponent bits, times a polynomial in the remainder.
"""
from __future__ import annotations

import math

import tvm_ffi
from tvm import ir, tirx
from tvm.script import tirx as T

LOG2E = math.log2(math.e)
# 2^f on [-1/2, 1/2]: Chebyshev interpolant of degree 5, relative error 2.4e-7 (~2 float32 ulps).
_EXP2_POLY = (1.0000001192092896, 0.6931471824645996, 0.2402210682630539, 0.055503569543361664,
              0.009676031768321991, 0.0013390863314270973)


def exp2(x):
    """2^x for x <= 0 (float32); x <= -127 gives 0."""
    xc = T.max(x, T.float32(-127.0))
    n = T.floor(xc + T.float32(0.5))
    f = xc - n
    poly = T.float32(_EXP2_POLY[-1])
    for c in reversed(_EXP2_POLY[:-1]):
        poly = poly * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return poly * scale


def sigmoid(x):
    """1 / (1 + e^-x) through t = e^-|x| <= 1: 1 / (1 + t) for x >= 0, t / (1 + t) below."""
    t = exp2(T.abs(x) * T.float32(-LOG2E))
    pos = T.float32(1) / (T.float32(1) + t)
    return T.Select(x >= T.float32(0), pos, t * pos)


def tanh(x):
    """(1 - t) / (1 + t) with t = e^(-2|x|), the sign of x restored."""
    t = exp2(T.abs(x) * T.float32(-2.0 * LOG2E))
    mag = (T.float32(1) - t) / (T.float32(1) + t)
    return T.Select(x < T.float32(0), -mag, mag)


_REPLACE = {"tirx.sigmoid": sigmoid, "tirx.tanh": tanh}


def vector_friendly(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with its float32 sigmoid and tanh calls replaced by the forms above."""

    def call(value, mutator):
        if isinstance(value.op, ir.Op) and value.op.name in _REPLACE and str(value.ty) == "float32":
            return _REPLACE[value.op.name](mutator.mutate(value.args[0]))
        return mutator.default_mutate(value)

    return tvm_ffi.structural_mutate(func, [(ir.expr.Call, call)])
