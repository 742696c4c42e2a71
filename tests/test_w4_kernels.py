"""The int4 kernels, scheduled for the host CPU, against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from awqc.compiler.targets import get_target
from awqc.schedules.w4_cpu import schedule_w4
from awqc.schedules.layouts import K8
from awqc.schedules.w4_kernels import w4_matmul


def reference(x: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray, group: int) -> np.ndarray:
    w = (q.astype(np.float64) - np.repeat(z, group, 1)) * np.repeat(s, group, 1)
    return x.astype(np.float64) @ w.T


@pytest.mark.parametrize("k,n,group,rows", [(576, 100, 64, 1), (128, 48, 32, 1), (256, 96, 128, 1),
                                            (576, 100, 64, None), (128, 40, 32, None)])
def test_scheduled_kernel_matches_numpy(k: int, n: int, group: int, rows: int | None) -> None:
    func = schedule_w4(w4_matmul(k, n, group, "float32", rows), group, rows)
    script = func.script()
    assert "T.parallel" in script and "T.vectorized" in script
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host").target())
    rng = np.random.default_rng(k + n)
    m = rows or 13
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s = (rng.random((n, k // group)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    z = rng.integers(0, 16, (n, k // group)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib(*[tvm.runtime.tensor(a) for a in (x, *K8.pack(q, s, z))], out)
    ref = reference(x, q, s, z, group)
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-5
