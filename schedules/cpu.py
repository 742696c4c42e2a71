"""Hand TIR schedules for float32 linear layers ("NT matmuls") on CPU (x86 AVX2/AVX-512, ARM NEON).

The relax pipeline (FuseTransposeMatmul before LegalizeOps, then FuseOps/FuseTIR) turns every
`nn.Linear` and the tied LM head `matmul(x, permute_dims(embed))` into a PrimFunc of this form:

    NT[*lead, n] = sum_k A[*lead, k] * W[n, k]      (float32, W is the [N, K] weight)
    [optional elementwise epilogue blocks reading NT: + bias[n], + residual[*lead, n], ...]

`lead` is (b, s): all-static 1 for decode (a GEMV) and contains the dynamic `seq_len` for
prefill (a GEMM). Two dlight-style ScheduleRules handle the two cases; `schedule_cpu_module`
(or `cpu_schedule_pass()` inside `with target:`) applies them right after FuseTIR and leaves
every other PrimFunc alone. The SIMD width comes from the target (AVX-512: 16 float32 lanes,
AVX2: 8, NEON/SSE: 4).

Why these schedules (measured on a 2-core AMD EPYC VM, ~20-24 GB/s single-thread DRAM read
bandwidth, with the other core often busy, so single numbers are noisy):

* GEMV (decode) is DRAM-bandwidth bound: the 540 MB of SmolLM2 fp32 weights are larger than
  L3, so every token streams all of them. What matters is one clean sequential stream per
  thread: each thread walks its contiguous range of weight rows, one row at a time. Several
  rows interleaved (register blocking) was measured ~2x *slower* (~10 vs ~20 GB/s) because the
  hardware prefetcher handles one long stream far better than 4 streams 2.3 KB apart. The FMA
  latency is hidden instead by `chains` independent vector accumulators along K (two-level
  rfactor: [chains x lanes] partial sums -> [lanes] -> scalar), which also keeps the
  horizontal reduction short (chains-1 vector adds + lanes-1 scalar adds per row).
* GEMM (prefill) is compute bound: a dot-product micro-kernel, an `mr x nr` tile of outputs
  with `mr*nr` vector accumulators running along K (both A and W rows are contiguous in K, so
  no packing of W is needed), parallel over tiles of W rows.
* Partial-sum buffers keep the default "global" scope on purpose: TVM only puts small
  constant-size allocations on the stack (then LLVM keeps them in registers) when their scope
  is "global"; a "local" buffer inside a parallel loop becomes a TVMBackendAllocWorkspace call
  per row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import ApplyDefaultSchedule, ScheduleRule
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad(...) builds in TVM 0.27
from tvm.target import Target

__all__ = [
    "NTMatmulGEMV",
    "NTMatmulGEMM",
    "cpu_schedule_pass",
    "cpu_schedule_rules",
    "match_nt_matmul",
    "schedule_cpu_module",
]

logger = logging.getLogger(__name__)

# (sch, block) -> SBlockRealize: gives the loop bindings of a block
_get_sblock_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


# --------------------------------------------------------------------------- analysis
@dataclass
class NTMatmulMatch:
    """What `match_nt_matmul` found in a PrimFunc (block/loop handles belong to `sch`)."""

    block: s_tir.schedule.SBlockRV  # the reduction block NT[*lead, n] += A[*lead, k] * W[n, k]
    lead_loops: list[s_tir.schedule.LoopRV]  # loops of the leading (batch, seq) axes
    n_loop: s_tir.schedule.LoopRV
    k_loop: s_tir.schedule.LoopRV
    epilogues: list[s_tir.schedule.SBlockRV]  # spatial blocks after the matmul, program order
    m_extent: int | None  # product of the leading extents; None if any is dynamic
    n_extent: int
    k_extent: int


def _is_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _indices_are(indices, variables) -> bool:
    return len(indices) == len(variables) and all(_is_var(i, v) for i, v in zip(indices, variables))


def _simple_nest(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list | None:
    """The loops of `block` if each block iter is bound to exactly its own loop, in order, with
    no predicate (the form LegalizeOps/FuseTIR emit); else None."""
    loops = sch.get_loops(block)
    realize = _get_sblock_realize(sch, block)
    values = list(realize.iter_values)
    if len(values) != len(loops) or not (
        isinstance(realize.predicate, tirx.IntImm) and int(realize.predicate) == 1
    ):
        return None
    if not all(_is_var(v, sch.get(lp).loop_var) for v, lp in zip(values, loops)):
        return None
    return loops


def match_nt_matmul(sch: s_tir.Schedule) -> NTMatmulMatch | None:
    """Recognize `NT[*lead, n] = sum_k A[*lead, k] * W[n, k]` (float32) plus spatial epilogues.

    The check is structural, on the TIR itself (never the function name):
      * the root block's children are simple loop nests (one loop per block iter, in order);
      * exactly one block has a reduction iter, and it comes first (no prologue such as a
        dequantization); every other block is purely spatial (bias add, residual add, ...);
      * the reduction block has one reduction iter k and its body is exactly
        `C[s...] = C[s...] + A[s_lead..., k] * W[s_last, k]` with `init: C[s...] = 0`, where the
        store indices are the spatial iters in order, W is 2-D [N, K], and all buffers are
        float32;
      * K and N are static (only the leading axes, i.e. the token count, may be dynamic).
    """
    func = sch.mod["main"]
    if not isinstance(func.body, s_tir.SBlockRealize):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock(func.body.block.name_hint))
    if not blocks:
        return None
    nests = [_simple_nest(sch, b) for b in blocks]
    if any(n is None for n in nests):
        return None
    stmts = [sch.get(b) for b in blocks]
    is_red = [any(iv.iter_type != tirx.IterVar.DataPar for iv in s.iter_vars) for s in stmts]
    if not is_red[0] or any(is_red[1:]):
        return None
    block, loops = stmts[0], nests[0]

    # iters: all spatial except exactly one reduction
    types = [iv.iter_type for iv in block.iter_vars]
    if types.count(tirx.IterVar.CommReduce) != 1 or len(types) < 2:
        return None
    if any(t not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for t in types):
        return None
    spatial = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    k_var = next(iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    n_var, lead_vars = spatial[-1], spatial[:-1]

    # body: C[spatial] = C[spatial] + A[lead, k] * W[n, k]
    store, init = block.body, block.init
    if not isinstance(store, tirx.BufferStore) or not isinstance(init, tirx.BufferStore):
        return None
    out = store.buffer
    if not _indices_are(store.indices, spatial) or not init.buffer.same_as(out):
        return None
    if not isinstance(init.value, tirx.FloatImm) or init.value.value != 0.0:
        return None
    add = store.value
    if not isinstance(add, tirx.Add) or not isinstance(add.a, TensorLoad):
        return None
    if not add.a.source.same_as(out) or not _indices_are(add.a.indices, spatial):
        return None
    mul = add.b
    if not isinstance(mul, tirx.Mul):
        return None
    loads = [mul.a, mul.b]
    if not all(isinstance(x, TensorLoad) for x in loads):
        return None
    weights = [x for x in loads if _indices_are(x.indices, [n_var, k_var])]
    acts = [x for x in loads if _indices_are(x.indices, [*lead_vars, k_var])]
    if len(weights) != 1 or len(acts) != 1 or weights[0] is acts[0]:
        return None
    if any(str(x.ty) != "float32" for x in (add.a, weights[0], acts[0])):
        return None

    extents = {iv.var: iv.dom.extent for iv in block.iter_vars}
    n_ext, k_ext = extents[n_var], extents[k_var]
    if not isinstance(n_ext, tirx.IntImm) or not isinstance(k_ext, tirx.IntImm):
        return None
    m_ext: int | None = 1
    for v in lead_vars:
        e = extents[v]
        m_ext = m_ext * int(e) if isinstance(e, tirx.IntImm) and m_ext is not None else None

    loop_of = {iv.var: lp for iv, lp in zip(block.iter_vars, loops)}
    return NTMatmulMatch(
        block=blocks[0],
        lead_loops=[loop_of[v] for v in lead_vars],
        n_loop=loop_of[n_var],
        k_loop=loop_of[k_var],
        epilogues=list(blocks[1:]),
        m_extent=m_ext,
        n_extent=int(n_ext),
        k_extent=int(k_ext),
    )


def f32_lanes(target: Target) -> int:
    """float32 lanes of one SIMD register for the target's CPU features."""
    features = tvm.target.codegen.target_has_features
    try:
        if features("avx512f", target):
            return 16
        if features("avx", target):
            return 8
    except Exception:  # pylint: disable=broad-except
        pass  # non-x86 triple: feature names above are unknown to LLVM
    return 4  # NEON / SSE: 128-bit


def _vector_lanes(k: int, lanes: int) -> int:
    """Full register width if it divides K, else the widest smaller width (>= 4) that does."""
    return next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and k % w == 0), lanes)


def _largest_divisor(total: int, candidates: tuple[int, ...]) -> int:
    return next((c for c in candidates if total % c == 0), candidates[-1])


# --------------------------------------------------------------------------- schedules
def schedule_nt_gemv(sch: s_tir.Schedule, m: NTMatmulMatch, lanes: int, max_chains: int = 4) -> None:
    """Decode GEMV: y[n] = sum_k x[k] * W[n, k], rows split across threads, one row at a time.

    Loop nest produced (per output row n, rows in parallel):
        acc[chains, lanes] = 0
        for ko: for c in unroll(chains): acc[c, :] += x[ko, c, :] * W[n, ko, c, :]   (vector FMA)
        part[lanes] = sum_c acc[c, :]                                                (vector add)
        y[n] = sum_l part[l];  epilogue(n)
    `chains` independent accumulators hide the FMA latency; it is the largest power of two
    <= max_chains with K % (chains * lanes) == 0. Each FMA also needs two loads (x and W), which
    caps it near one FMA per cycle, so 4 chains cover the 4-cycle FMA latency (8 measured no
    better, in cache or from DRAM). If K is not a multiple of the register width,
    half-width vectors (4 lanes) are used when they divide K; otherwise the K split is
    predicated: still correct, but LLVM then gets scalar code.
    """
    loops = [*m.lead_loops, m.n_loop]
    sch.reorder(*loops, m.k_loop)
    if len(loops) > 1:
        sch.fuse(*loops)

    lanes = _vector_lanes(m.k_extent, lanes)
    if m.k_extent % lanes == 0:
        chain_opts = tuple(c for c in (8, 4, 2, 1) if c <= max_chains)
        chains = _largest_divisor(m.k_extent // lanes, chain_opts)
    else:
        chains = 1
    if chains == 1:
        _ko, kl = sch.split(m.k_loop, [None, lanes])
        rf_acc = sch.rfactor(kl, 0)  # acc[lanes, n] (sum over ko)
        n_acc, ko, kl = sch.get_loops(rf_acc)
        rf_vec = None
    else:
        _ko, _kc, kl = sch.split(m.k_loop, [None, chains, lanes])
        rf_vec = sch.rfactor(kl, 0)  # part[lanes, n] (sum over ko, c)
        _n, _ko, kc_vec, _kl = sch.get_loops(rf_vec)
        rf_acc = sch.rfactor(kc_vec, 0)  # acc[chains, lanes, n] (sum over ko)
        n_acc, ko, kc, kl = sch.get_loops(rf_acc)
    sch.parallel(n_acc)
    # the per-row reductions and the epilogue run right after the row's FMA loop
    if rf_vec is not None:
        sch.reverse_compute_at(rf_vec, n_acc)
    sch.reverse_compute_at(m.block, n_acc)
    for ep in m.epilogues:
        sch.reverse_compute_at(ep, n_acc)

    sch.vectorize(kl)  # before decompose_reduction (it needs the compact-dataflow block)
    if rf_vec is not None:
        sch.unroll(kc)
        kc2, kl2 = sch.get_loops(rf_vec)[1:]  # [n_acc, c, lane]
        sch.vectorize(kl2)
        sch.unroll(kc2)
        sch.decompose_reduction(rf_vec, kc2)
    sch.decompose_reduction(rf_acc, ko)
    sch.unroll(sch.get_loops(m.block)[-1])  # lanes -> scalar: lanes-1 adds


def schedule_nt_gemm(sch: s_tir.Schedule, m: NTMatmulMatch, lanes: int, mr: int = 4, nr: int = 3) -> None:
    """Prefill GEMM: C[m, n] = sum_k A[m, k] * W[n, k] with a (usually dynamic) number of rows m.

    Dot-product micro-kernel: an (mr x nr) tile of outputs keeps mr*nr vector accumulators
    while streaming the mr rows of A and the nr rows of W along K (both contiguous in K, so W
    needs no packing): mr+nr loads per mr*nr FMAs. Loop order: parallel over blocks of nr
    weight rows (that W block stays in L1), then over the tiles of A rows (A, M*K*4 bytes,
    stays in L2), then K; the horizontal lane sums and the epilogue run per tile.

    Row tail: the rows are padded to a multiple of mr with `pad_einsum` (a zero-padded copy of
    A and a padded output, both O(M*(K+N)), cheap next to the O(M*N*K) matmul). A predicate
    on the dynamic row count instead would make the accumulator tile's size symbolic, and then
    TVM keeps it in a heap workspace with gathers/scatters: ~10x slower. N needs no padding:
    nr is picked to divide N (falling back to 2 or 1).
    """
    lanes = _vector_lanes(m.k_extent, lanes)
    if m.k_extent % lanes != 0:
        lanes = 1  # a predicated K tail would scalarize anyway; keep the loop nest simple
    nr = next(c for c in (nr, 4, 2, 1) if m.n_extent % c == 0)
    tail = list(m.epilogues)
    if m.m_extent is None or m.m_extent % mr != 0:
        # pad the innermost leading axis that is not a static 1 (the sequence axis)
        extents = [sch.get(lp).extent for lp in m.lead_loops]
        axis = max(i for i, e in enumerate(extents) if not (isinstance(e, tirx.IntImm) and int(e) == 1))
        padding = [1] * (len(extents) + 2)
        padding[axis] = mr
        sch.pad_einsum(m.block, padding)
        copy_out = sch.get_consumers(m.block)[0]  # NT[...] = NT_pad[...]
        producers = sch.get_producers(m.block)  # A_pad[...] = A[...] if in range else 0
        try:
            if not tail:
                raise s_tir.ScheduleError("copy-out writes the function output")
            sch.compute_inline(copy_out)  # the epilogue reads the padded result directly
        except s_tir.ScheduleError:
            tail.insert(0, copy_out)  # done per tile instead, right after the tile is computed
        for pad_in in producers:  # the padded A copy: once per call, rows in parallel
            pad_loops = sch.get_loops(pad_in)
            sch.parallel(sch.fuse(*pad_loops[:-1]))
            sch.vectorize(pad_loops[-1])

    lead = sch.get_loops(m.block)[:-2]
    k_loop = sch.get_loops(m.block)[-1]
    if len(lead) > 1:
        sch.fuse(*lead)
    _ko, kl = sch.split(k_loop, [None, lanes])
    # lanes as the innermost axis of the accumulator (acc[m, n, lanes]), so the vector
    # accumulators are contiguous; with lanes outermost every FMA would need a gather+scatter
    rf = sch.rfactor(kl, len(lead) + 1)
    m_rf, n_rf, ko, kl = sch.get_loops(rf)
    mo, mi = sch.split(m_rf, [None, mr])
    no, ni = sch.split(n_rf, [None, nr])
    sch.reorder(no, mo, ko, mi, ni, kl)
    sch.parallel(no)
    sch.reverse_compute_at(m.block, mo)
    for blk in tail:
        sch.reverse_compute_at(blk, mo)
    if lanes > 1:
        sch.vectorize(kl)
    sch.unroll(mi)
    sch.unroll(ni)
    sch.decompose_reduction(rf, ko)


# --------------------------------------------------------------------------- dlight rules
class _NTMatmulRule(ScheduleRule):
    """Common part: CPU (llvm) targets only, match, schedule, and on a schedule error give up
    (return None, so the function keeps default lowering) rather than break the build."""

    want_gemv: bool

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def _schedule(self, sch: s_tir.Schedule, m: NTMatmulMatch, target: Target) -> None:
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not isinstance(func.body, s_tir.SBlockRealize):  # not block-based TIR (hand kernels)
            return None
        sch = s_tir.Schedule(func)
        m = match_nt_matmul(sch)
        if m is None or (m.m_extent == 1) != self.want_gemv:
            return None
        try:
            self._schedule(sch, m, target)
        except s_tir.ScheduleError as err:
            # keep the log short: the error text embeds the whole IR
            first = str(err).strip().splitlines()[-1]
            logger.warning("%s: could not schedule an NT matmul, left as is: %s", type(self).__name__, first)
            return None
        return sch


class NTMatmulGEMV(_NTMatmulRule):
    """Decode: NT matmul whose leading (batch, seq) extents are all static 1."""

    want_gemv = True

    def _schedule(self, sch: s_tir.Schedule, m: NTMatmulMatch, target: Target) -> None:
        schedule_nt_gemv(sch, m, f32_lanes(target))


class NTMatmulGEMM(_NTMatmulRule):
    """Prefill: NT matmul with more than one row, or a dynamic number of rows."""

    want_gemv = False

    def _schedule(self, sch: s_tir.Schedule, m: NTMatmulMatch, target: Target) -> None:
        schedule_nt_gemm(sch, m, f32_lanes(target))


def cpu_schedule_rules() -> list[ScheduleRule]:
    """The rules, for combining with other dlight rules in one ApplyDefaultSchedule."""
    return [NTMatmulGEMV(), NTMatmulGEMM()]


def cpu_schedule_pass() -> tvm.transform.Pass:
    """The same as a pass for a relax pass list; it takes the target from `with target:` (or a
    PrimFunc's "target" attribute). Put it right after FuseTIR."""
    return ApplyDefaultSchedule(*cpu_schedule_rules())


def schedule_cpu_module(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Schedule every float32 NT-matmul PrimFunc in `mod` for the CPU `target`.

    Run after FuseOps/FuseTIR (and before the default relax/TIR lowering). Functions that do not
    match, or that already carry `tirx.is_scheduled`, are returned unchanged; scheduled ones get
    `tirx.is_scheduled = True`. A PrimFunc's own "target" attribute wins over `target`.
    """
    with target:
        return cpu_schedule_pass()(mod)
