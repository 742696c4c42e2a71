"""Tests for awqc.schedules.cpu: the float32 NT-matmul (linear layer) CPU schedules.

Each test builds a small relax module the way the compiler does (nn.Module -> export_tvm ->
FuseTransposeMatmul -> LegalizeOps -> FuseOps/FuseTIR), runs `schedule_cpu_module`, checks in
the TIR that the rules were applied (parallel + vectorized loops), compiles it and compares
against numpy.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from awqc.schedules.cpu import match_nt_matmul, schedule_cpu_module


def _host_target() -> tvm.target.Target:
    # Not Target.from_device: on the dev VM TVM detects znver4 but AVX-512 is hidden (SIGILL).
    # haswell = AVX2 + FMA, a subset of every x86 CPU these tests are expected to run on.
    if platform.machine() in ("x86_64", "AMD64"):
        return tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    return tvm.target.Target({"kind": "llvm", "num-cores": 2})


TARGET = _host_target()

FRONTEND_PASSES = [
    relax.transform.FuseTransposeMatmul(),  # must run before LegalizeOps: it makes the NT_matmul
    relax.transform.LegalizeOps(),
    relax.transform.AnnotateTIROpPattern(),
    relax.transform.FoldConstant(),
    relax.transform.FuseOps(),
    relax.transform.FuseTIR(),
    relax.transform.DeadCodeElimination(),
]


class _Layers(nn.Module):
    """y = lin2(lin1(x)) + x (bias on lin1, residual epilogue on lin2), logits = y @ E^T."""

    def __init__(self, k: int, n: int, vocab: int, bias: bool):
        self.lin1 = nn.Linear(k, n, bias=bias)
        self.lin2 = nn.Linear(n, k, bias=False)
        self.embed = nn.Parameter((vocab, k), "float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = self.lin2(self.lin1(x)) + x
        return op.matmul(y, op.permute_dims(self.embed))  # tied LM head

    def prefill(self, x: nn.Tensor) -> nn.Tensor:
        return self.forward(x)

    def decode(self, x: nn.Tensor) -> nn.Tensor:
        return self.forward(x)


def _build(k: int, n: int, vocab: int, bias: bool):
    mod, params = _Layers(k, n, vocab, bias).export_tvm(
        spec={
            "prefill": {"x": spec.Tensor([1, "seq_len", k], "float32")},
            "decode": {"x": spec.Tensor([1, 1, k], "float32")},
        }
    )
    mod = tvm.ir.transform.Sequential(FRONTEND_PASSES)(mod)
    return mod, [name for name, _ in params]


def _loop_kinds(func: tirx.PrimFunc) -> set:
    sch = s_tir.Schedule(func)
    root = sch.get_sblock(func.body.block.name_hint)
    return {sch.get(lp).kind for blk in sch.get_child_blocks(root) for lp in sch.get_loops(blk)}


def _reference(x: np.ndarray, p: dict[str, np.ndarray], bias: bool) -> np.ndarray:
    x64 = x.astype(np.float64)
    h = x64 @ p["lin1.weight"].T.astype(np.float64)
    if bias:
        h = h + p["lin1.bias"]
    y = h @ p["lin2.weight"].T.astype(np.float64) + x64
    return y @ p["embed"].T.astype(np.float64)


def _awqc_host_target() -> tvm.target.Target:
    """The target `awqc compile --target host` uses (AVX-512 where /proc/cpuinfo lists it)."""
    from awqc.compiler.targets import host_spec

    return host_spec().target()


@pytest.mark.parametrize(
    "k,n,vocab,bias,target",
    [
        (576, 960, 256, True, TARGET),  # SmolLM2 fused-qkv shape, bias epilogue
        (576, 100, 200, False, TARGET),  # N not a multiple of any row/tile block
        (100, 37, 53, True, TARGET),  # K not a multiple of 8: half-width (4-lane) vectors
        (102, 37, 53, False, TARGET),  # K not even a multiple of 4: predicated scalar K loop
        (576, 960, 256, True, None),  # the awqc host target (16 lanes on an AVX-512 host)
    ],
)
def test_linear_layers_scheduled_and_correct(k: int, n: int, vocab: int, bias: bool, target) -> None:
    target = target or _awqc_host_target()
    mod, names = _build(k, n, vocab, bias)
    nt_funcs = [gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    # 3 linears x (prefill, decode); every one of them must be recognized
    assert len(nt_funcs) == 6
    for gv in nt_funcs:
        assert match_nt_matmul(s_tir.Schedule(mod[gv])) is not None, gv.name_hint

    mod = schedule_cpu_module(mod, target)
    for gv in nt_funcs:
        func = mod[gv]
        assert func.attrs.get("tirx.is_scheduled"), gv.name_hint
        kinds = _loop_kinds(func)
        assert tirx.ForKind.PARALLEL in kinds, gv.name_hint
        if k % 4 == 0:  # the predicated K tail (K % 4 != 0) is allowed to end up scalar
            assert tirx.ForKind.VECTORIZED in kinds, gv.name_hint

    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    shapes = {"lin1.weight": (n, k), "lin1.bias": (n,), "lin2.weight": (k, n), "embed": (vocab, k)}
    p = {name: (rng.standard_normal(shapes[name]) * 0.1).astype("float32") for name in names}
    args = [tvm.runtime.tensor(p[name]) for name in names]
    for fn, seq in [("decode", 1), ("prefill", 1), ("prefill", 7), ("prefill", 64)]:
        x = rng.standard_normal((1, seq, k)).astype("float32")
        out = vm[fn](tvm.runtime.tensor(x), *args).numpy()
        ref = _reference(x, p, bias)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (fn, seq, rel)


def test_static_multi_row_gemm() -> None:
    """A static row count that is not a multiple of the tile height goes to the GEMM rule."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 5, 64], "float32"))
    w = relax.Var("w", relax.TensorType([48, 64], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    mod = tvm.ir.transform.Sequential(FRONTEND_PASSES)(bb.get())
    mod = schedule_cpu_module(mod, TARGET)
    prims = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(prims) == 1 and prims[0].attrs.get("tirx.is_scheduled")
    assert {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED} <= _loop_kinds(prims[0])

    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    rng = np.random.default_rng(1)
    xn = rng.standard_normal((1, 5, 64)).astype("float32")
    wn = rng.standard_normal((48, 64)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(xn), tvm.runtime.tensor(wn)).numpy()
    np.testing.assert_allclose(out, xn @ wn.T, rtol=1e-4, atol=1e-4)


def test_other_kernels_untouched() -> None:
    """rms_norm, softmax, elementwise ops, a plain (non-transposed) matmul and an fp16 NT matmul
    are not NT-matmul GEMV/GEMMs of this kind: they must come out unchanged."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4, 64], "float32"))
    g = relax.Var("g", relax.TensorType([64], "float32"))
    w_kn = relax.Var("w_kn", relax.TensorType([64, 32], "float32"))
    xh = relax.Var("xh", relax.TensorType([1, 4, 64], "float16"))
    wh = relax.Var("wh", relax.TensorType([32, 64], "float16"))
    with bb.function("main", [x, g, w_kn, xh, wh]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.rms_norm(x, g, axes=[-1]))
            s = bb.emit(relax.op.nn.softmax(h, axis=-1))
            y = bb.emit(relax.op.matmul(s, w_kn))  # W stored [K, N]: not this pattern
            z = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh)))  # fp16
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    mod = tvm.ir.transform.Sequential(FRONTEND_PASSES)(bb.get())
    before = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert len(before) >= 4
    after = schedule_cpu_module(mod, TARGET)
    for gv, f in after.functions_items():
        if isinstance(f, tirx.PrimFunc):
            assert "tirx.is_scheduled" not in f.attrs, gv.name_hint
            tvm.ir.assert_structural_equal(f, before[gv.name_hint])
