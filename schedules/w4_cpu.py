"""CPU schedules (x86 AVX2/AVX-512, ARM NEON) for the dequant-fused int4 kernels of w4_kernels.py.

GEMV (decode): K is split as (group, word, lane) with the 8 nibbles of a word as SIMD lanes
(rfactor), so a vector of words is shifted, masked, converted and FMA'd in registers; `rows`
output rows are interleaved to give independent FMA chains; the outer row blocks run in parallel.
GEMM (prefill): the same inner structure per row of activations, rows of the output in parallel.
"""
from __future__ import annotations

import dataclasses

from tvm import s_tir, tirx


@dataclasses.dataclass(frozen=True)
class W4CpuKnobs:
    """Tunable parameters; records per target live in schedules/records/."""
    rows: int = 4  # output rows interleaved in registers
    chunk: int = 16  # output rows per parallel task
    unroll_words: bool = True


def schedule_w4_gemv(func: tirx.PrimFunc, group: int, knobs: W4CpuKnobs = W4CpuKnobs()) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("w4_matmul")
    _, j, r = sch.get_loops(mm)
    g, w, lane = sch.split(r, [None, group // 8, 8])
    rf = sch.rfactor(lane, 0)
    _, j_rf, g_rf, w_rf, lane_rf = sch.get_loops(rf)
    jo, jb, jr = sch.split(j_rf, [None, knobs.chunk // knobs.rows, knobs.rows])
    sch.reorder(jo, jb, g_rf, w_rf, jr, lane_rf)
    sch.parallel(jo)
    sch.reverse_compute_at(mm, jb)
    sch.reverse_compute_at(sch.get_sblock("w4_store"), jb)
    sch.vectorize(lane_rf)
    sch.unroll(jr)
    if knobs.unroll_words:
        sch.unroll(w_rf)
    sch.decompose_reduction(rf, g_rf)
    return sch.mod["main"]


def schedule_w4_gemm(func: tirx.PrimFunc, group: int, knobs: W4CpuKnobs = W4CpuKnobs()) -> tirx.PrimFunc:
    """Rows of activations innermost-but-one: a block of output columns (weights in L1) is
    reused by every activation row before moving on."""
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("w4_matmul")
    i, j, r = sch.get_loops(mm)
    g, w, lane = sch.split(r, [None, group // 8, 8])
    rf = sch.rfactor(lane, 0)
    i_rf, j_rf, g_rf, w_rf, lane_rf = sch.get_loops(rf)
    jo, jb, jr = sch.split(j_rf, [None, knobs.chunk // knobs.rows, knobs.rows])
    sch.reorder(jo, i_rf, jb, g_rf, w_rf, jr, lane_rf)
    sch.parallel(jo)
    sch.reverse_compute_at(mm, jb)
    sch.reverse_compute_at(sch.get_sblock("w4_store"), jb)
    sch.vectorize(lane_rf)
    sch.unroll(jr)
    if knobs.unroll_words:
        sch.unroll(w_rf)
    sch.decompose_reduction(rf, g_rf)
    return sch.mod["main"]


def schedule_w4(func: tirx.PrimFunc, group: int, rows: int | None, knobs: W4CpuKnobs = W4CpuKnobs()) -> tirx.PrimFunc:
    """The CPU schedule for a w4_matmul kernel built with `rows` (1: GEMV, None: GEMM)."""
    if rows == 1:
        return schedule_w4_gemv(func, group, knobs)
    return schedule_w4_gemm(func, group, knobs)
