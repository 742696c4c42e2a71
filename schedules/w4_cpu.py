"""CPU schedules (x86 AVX2/AVX-512, ARM NEON) for the dequant-fused int4 kernels of w4_kernels.py.

Interleaved layouts ("i{L}r{R}", schedules/layouts.py) — the fast path:
  GEMV (decode) is bound by reading the packed weights (DRAM for every matrix larger than the
  LLC). Each thread walks a contiguous range of R-row tiles, and a tile's words are contiguous,
  so a thread reads one sequential stream. Per group and row, `L` lanes accumulate x * q with
  one AND + convert + FMA per L weights (w4_kernels.w4_gemv_interleaved), R rows giving R
  independent FMA chains; the group's scale and zero point are applied once per group to the
  lane vector, and the horizontal sum once per row.
  GEMM (prefill) is compute bound: a block of `block_rows` weight rows is dequantized once per
  call into a float buffer that stays in L2, then an (mr x nr) register-tile micro-kernel runs
  over it for every tile of activation rows.
Layout "k8" (fallback for shapes an interleaved layout cannot hold): the earlier rfactor
  schedules, `schedule_w4_gemv` / `schedule_w4_gemm`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import tvm
from tvm import s_tir, tirx

from .layouts import K8, Layout

_get_sblock_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


@dataclasses.dataclass(frozen=True)
class GemvKnobs:
    """Per-shape knobs of the interleaved GEMV (the layout fixes lanes and rows per tile)."""
    unroll_steps: bool = True  # unroll the G/L steps of a group (straight-line FMA chains)


@dataclasses.dataclass(frozen=True)
class GemmKnobs:
    """Per-shape knobs of the interleaved GEMM."""
    mr: int = 4  # activation rows per register tile
    nr: int = 3  # weight rows per register tile (mr*nr vector accumulators)
    block_rows: int = 24  # weight rows dequantized per block (the parallel unit; kept in L2)
    lanes: int = 8  # float32 lanes of the micro-kernel's vectors


def _loops_by_iter(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                   below: int = 0) -> dict[str, s_tir.schedule.LoopRV]:
    """{block iter var name: loop} for the loops (from depth `below`) that bind one iter each,
    so a schedule can name loops by meaning whatever loops compute_at created or dropped."""
    realize = _get_sblock_realize(sch, block)
    out = {}
    for loop in sch.get_loops(block)[below:]:
        var = sch.get(loop).loop_var
        for iv, value in zip(realize.block.iter_vars, realize.iter_values):
            if isinstance(value, tirx.Var) and value.same_as(var):
                out[iv.var.name] = loop
    return out


_VECTOR = 16  # elements per vector of a loop over K: one AVX-512 register, two AVX2, four NEON


def _vectorize_inner(sch: s_tir.Schedule, loop: Any) -> None:
    """Vectorize a loop in vectors of _VECTOR elements. Vectorizing a whole loop over K hands LLVM
    one K-wide vector (8192 floats for a 7B down projection), whose legalization alone took 2.5 GB
    and 5 s of compile time per kernel; short vectors compile in milliseconds to the same code."""
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm) and int(extent) > _VECTOR and int(extent) % _VECTOR == 0:
        loop = sch.split(loop, [None, _VECTOR])[1]
    sch.vectorize(loop)


def schedule_gemv_interleaved(func: tirx.PrimFunc, lanes: int, tile_rows: int, group: int,
                              knobs: GemvKnobs = GemvKnobs()) -> tirx.PrimFunc:
    """Loop nest (per thread: a contiguous range of tiles):
        xsum[g, :], xpre[:] once per call (vectorized)
        for tile in parallel:
            acc[R, L] = 0
            for g:  dot[R, L] = 0
                    for u (unrolled): for r (unrolled): dot[r, :] += xpre[g, u, :] * nibble(word[tile, g, u, r, :])
                    for r: acc[r, :] += s[r, g] * (dot[r, :] - z[r, g] * xsum[g, :])
            y[tile rows] = sum over lanes of acc
    With the steps unrolled, each step's nibble index (hence its mask) is a constant. A group
    smaller than a block (G < 8L, e.g. 32 with 8 lanes) starts at nibble 0 or 4, so the
    8L/G groups of a block are unrolled too.
    """
    sch = s_tir.Schedule(func)
    dot, scale = sch.get_sblock("w4_dot"), sch.get_sblock("w4_scale")
    j, g, _l = sch.get_loops(scale)
    tile, r = sch.split(j, [None, tile_rows])
    sch.reorder(tile, g, r, _l)
    sch.parallel(tile)
    g_outer = g  # the scale's reduction starts above it
    groups_per_block = max(1, 8 * lanes // group)
    if groups_per_block > 1 and knobs.unroll_steps:
        g_outer, g = sch.split(g, [None, groups_per_block])
        sch.unroll(g)
    depth = next(i for i, lp in enumerate(sch.get_loops(scale)) if sch.get(lp).same_as(sch.get(g))) + 1
    sch.compute_at(dot, g)  # dot's own loops start at `depth`
    loops = _loops_by_iter(sch, dot, below=depth)
    sch.reorder(*[loops[v] for v in ("vu", "vj", "vl") if v in loops])  # vj is gone when R == 1
    for name in ("w4_lanes", "w4_store"):
        sch.reverse_compute_at(sch.get_sblock(name), tile)
    loops = _loops_by_iter(sch, dot, below=depth)
    sch.vectorize(loops["vl"])
    if "vj" in loops:
        sch.unroll(loops["vj"])
    if knobs.unroll_steps:
        sch.unroll(loops["vu"])
    scale_loops = _loops_by_iter(sch, scale, below=depth)
    sch.vectorize(scale_loops["vl"])
    if "vj" in scale_loops:
        sch.unroll(scale_loops["vj"])
    sch.decompose_reduction(dot, loops["vu"])
    sch.decompose_reduction(scale, g_outer)
    for name in ("w4_xsum", "w4_xpre"):  # once per call, O(K)
        _vectorize_inner(sch, sch.get_loops(sch.get_sblock(name))[-1])
    return sch.mod["main"]


def schedule_gemm_interleaved(func: tirx.PrimFunc, knobs: GemmKnobs = GemmKnobs()) -> tirx.PrimFunc:
    """Loop nest:
        xf_pad[M', K] = float(x), rows padded to a multiple of mr if needed (parallel over rows)
        for wblock in parallel (block_rows weight rows):
            w[block_rows, K] = (q - z) * s                     (vectorized; stays in L2)
            for mtile (mr activation rows): for ntile (nr weight rows):
                acc[mr, nr, lanes] = 0
                for ko: acc[mi, ni, :] += xf_pad[mi, ko, :] * w[ni, ko, :]   (mr*nr vector FMAs)
                y[mtile, ntile] = sum over lanes of acc
    The dynamic row count is padded (pad_einsum), so the register tile has a constant size; a
    predicate on it would put the tile in a heap workspace (see schedules/cpu.py).
    """
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("w4_matmul")
    n = int(sch.get(sch.get_loops(mm)[1]).extent)
    k = int(sch.get(sch.get_loops(mm)[2]).extent)
    lanes = knobs.lanes if k % knobs.lanes == 0 else next(v for v in (8, 4, 1) if k % v == 0)
    nr = next(c for c in (knobs.nr, 4, 3, 2, 1) if n % c == 0)
    block_rows = max(nr, knobs.block_rows // nr * nr)
    while n % block_rows:
        block_rows -= nr
    m = sch.get(sch.get_loops(mm)[0]).extent
    prologue = "w4_xf"
    if not (isinstance(m, tirx.IntImm) and int(m) % knobs.mr == 0):
        sch.pad_einsum(mm, [knobs.mr, 1, 1])
        sch.compute_inline(sch.get_sblock("w4_xf"))  # xf_pad = float(x) or 0 past the last row
        sch.compute_inline(sch.get_sblock("acc_pad"))  # the store reads the padded result directly
        prologue = "xf_pad"
    x_rows, x_k = sch.get_loops(sch.get_sblock(prologue))
    sch.parallel(x_rows)
    _vectorize_inner(sch, x_k)

    i, j, kk = sch.get_loops(mm)
    _ko, kl = sch.split(kk, [None, lanes])
    rf = sch.rfactor(kl, 2)  # acc_rf[m, n, lanes]: lanes innermost, so accumulators are contiguous
    i, j, ko, kl = sch.get_loops(rf)
    mo, mi = sch.split(i, [None, knobs.mr])
    wb, nb, ni = sch.split(j, [None, block_rows // nr, nr])
    sch.reorder(wb, mo, nb, ko, mi, ni, kl)
    sch.parallel(wb)
    sch.reverse_compute_at(mm, nb)
    sch.reverse_compute_at(sch.get_sblock("w4_store"), nb)
    sch.compute_at(sch.get_sblock("w4_dequant"), wb)
    deq = _loops_by_iter(sch, sch.get_sblock("w4_dequant"), below=1)
    sch.vectorize(deq["vl"])
    sch.unroll(deq["vu"])  # constant nibble index: shifts by an immediate
    if lanes > 1:
        sch.vectorize(kl)
    sch.unroll(mi)
    sch.unroll(ni)
    sch.decompose_reduction(rf, ko)
    return sch.mod["main"]


def cpu_scheduler(layout: Layout, gemv: Callable[[int, int], GemvKnobs] | None = None,
                  gemm: Callable[[int, int], GemmKnobs] | None = None):
    """The int4 kernel scheduler for quantize_linear: (kernel, group, rows) -> scheduled kernel.
    `gemv` / `gemm` give the knobs for a (K, N) shape (tuning records; defaults otherwise)."""
    if layout == K8:
        return schedule_w4
    gemv = gemv or (lambda k, n: GemvKnobs())
    gemm = gemm or (lambda k, n: GemmKnobs())

    def schedule(func: tirx.PrimFunc, group: int, rows: int | None) -> tirx.PrimFunc:
        k, n = _kernel_shape(func)
        if rows == 1:
            return schedule_gemv_interleaved(func, layout.lanes, layout.tile_rows, group, gemv(k, n))
        return schedule_gemm_interleaved(func, gemm(k, n))

    return schedule


def _kernel_shape(func: tirx.PrimFunc) -> tuple[int, int]:
    """(K, N) of a w4 kernel: x is [m, K], y is [m, N]."""
    x, y = func.params[0], func.params[-1]  # TVM 0.27: buffer parameters carry their shape
    return int(x.shape[1]), int(y.shape[1])


# --- layout k8 -----------------------------------------------------------------------------------
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
