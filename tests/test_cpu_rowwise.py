"""Tests for awqc.schedules.cpu_rowwise (norms and elementwise kernels) and
awqc.schedules.vector_math (exp2, sigmoid, tanh without libm), against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight import ApplyDefaultSchedule
from tvm.script import tirx as T

from awqc.schedules import vector_math
from awqc.schedules.cpu_rowwise import cpu_rowwise_rules
from test_schedules_cpu import FRONTEND_PASSES, TARGET


def _apply(fn, x: np.ndarray) -> np.ndarray:
    n = x.size

    @T.prim_func(s_tir=False)
    def kernel(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in T.serial(n // 16):
            for j in T.vectorized(16):  # as the kernels use them
                b[i * 16 + j] = fn(a[i * 16 + j])

    lib = tvm.compile(kernel, target=TARGET)
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


def _inputs() -> np.ndarray:
    x = np.concatenate([np.linspace(-100, 100, 4001), [0.0, 1e-6, -1e-6, 1e-3, -1e-3, 88.0, -88.0, 87.3, -87.3]])
    return np.resize(x, (x.size + 15) // 16 * 16).astype("float32")


def test_vector_math_matches_numpy() -> None:
    x = _inputs()
    x64 = x.astype(np.float64)
    neg = -np.abs(x)
    np.testing.assert_allclose(_apply(vector_math.exp2, neg), np.exp2(neg.astype(np.float64)), rtol=1e-6, atol=1e-37)
    # x * log2(e) is rounded to float32: e^-|x| is off by |x| * 2^-24 relative (libm's expf too)
    np.testing.assert_allclose(_apply(vector_math.sigmoid, x), 1 / (1 + np.exp(-x64)), rtol=8e-6, atol=1e-37)
    # tanh near 0 is (1 - t) / (1 + t) with t ~ 1: its error is absolute (~2e-7), not relative
    np.testing.assert_allclose(_apply(vector_math.tanh, x), np.tanh(x64), rtol=1e-6, atol=5e-7)


def test_vector_friendly_replaces_only_float32_calls() -> None:
    @T.prim_func(s_tir=False)
    def f(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32"), c: T.Buffer((16,), "float64")):
        for i in T.serial(16):
            b[i] = T.sigmoid(a[i]) + T.tanh(a[i])
            c[i] = T.sigmoid(T.Cast("float64", a[i]))

    ops = []
    tvm_ffi.structural_walk(vector_math.vector_friendly(f).body,
                            [(tvm.ir.expr.Call, lambda call: ops.append(call.op.name)
                              if isinstance(call.op, tvm.ir.Op) else None)])
    assert ops.count("tirx.sigmoid") == 1 and "tirx.tanh" not in ops  # the float64 one stays


def _module(rows):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, rows, 96], "float32"))
    r = relax.Var("r", relax.TensorType([1, rows, 96], "float32"))
    w = relax.Var("w", relax.TensorType([96], "float32"))
    bias = relax.Var("bias", relax.TensorType([96], "float32"))
    gate_up = relax.Var("gate_up", relax.TensorType([1, rows, 384], "float32"))
    with bb.function("main", [x, r, w, bias, gate_up]):
        with bb.dataflow():
            h = bb.emit(relax.op.add(x, r))
            norm = bb.emit(relax.op.nn.rms_norm(h, w, axes=[-1], epsilon=1e-5))
            layer = bb.emit(relax.op.nn.layer_norm(h, w, bias, axes=[-1], epsilon=1e-5))
            halves = bb.emit(relax.op.split(gate_up, 2, axis=-1))
            silu = bb.emit(relax.op.multiply(relax.op.nn.silu(relax.TupleGetItem(halves, 0)),
                                             relax.TupleGetItem(halves, 1)))
            gelu = bb.emit(relax.op.nn.gelu_tanh(gate_up))
            out = bb.emit_output(relax.Tuple([norm, layer, silu, gelu]))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x, r, w, bias, gate_up):
    h = (x + r).astype(np.float64)
    norm = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * w
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    layer = (h - mu) / np.sqrt(var + 1e-5) * w + bias
    a, b = gate_up[..., :192].astype(np.float64), gate_up[..., 192:]
    silu = a / (1 + np.exp(-a)) * b
    g = gate_up.astype(np.float64)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    return norm, layer, silu, gelu


def _trips(stmt) -> int:
    """How many times the innermost statements run (static loops only)."""
    if isinstance(stmt, tirx.For):
        return int(stmt.extent) * _trips(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return sum(_trips(s) for s in stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return _trips(stmt.block.body) + (_trips(stmt.block.init) if stmt.block.init is not None else 0)
    return _trips(stmt.body) if hasattr(stmt, "body") else 1


def _loop_kinds(func: tirx.PrimFunc) -> set:
    kinds = set()
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda loop: kinds.add(loop.kind))])
    return kinds


@pytest.mark.parametrize("rows", ["dynamic", 1])
def test_rowwise_kernels_match_numpy(rows) -> None:
    """Prefill (a dynamic row count: parallel rows, vector inner loops) and decode (one static
    row: vectorized, no thread-pool launch) versions of the residual add, RMS norm, layer norm,
    SiLU x gate and tanh GELU, every one scheduled, against numpy."""
    n = tirx.Var("n", "int64") if rows == "dynamic" else rows
    with TARGET:
        mod = ApplyDefaultSchedule(*cpu_rowwise_rules())(tvm.ir.transform.Sequential(FRONTEND_PASSES)(_module(n)))
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert len(prims) >= 4
    for name, f in prims.items():
        assert f.attrs.get("tirx.is_scheduled"), name
        kinds = _loop_kinds(f)
        assert tirx.ForKind.VECTORIZED in kinds, name
        assert (tirx.ForKind.PARALLEL in kinds) == (rows == "dynamic"), name
        if rows == 1:  # one pass over the row, not a stage recomputed per element (it was, once: 1 ms at 4096)
            size = sum(int(np.prod([int(d) for d in buf.shape])) for buf in f.params)
            assert _trips(f.body) <= 4 * size, name
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    rng = np.random.default_rng(0)
    for m in ([1, 5, 300] if rows == "dynamic" else [1]):
        args = [rng.standard_normal((1, m, 96)).astype("float32"), rng.standard_normal((1, m, 96)).astype("float32"),
                rng.standard_normal(96).astype("float32"), rng.standard_normal(96).astype("float32"),
                (3 * rng.standard_normal((1, m, 384))).astype("float32")]
        outs = vm["main"](*[tvm.runtime.tensor(a) for a in args])
        for out, ref in zip(outs, _reference(*args)):
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
