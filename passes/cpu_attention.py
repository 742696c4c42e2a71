"""A parallel, vectorized CPU kernel for the paged KV cache's ragged prefill attention, and the
module pass that puts it in place of TVM's.

TVM 0.27's CPU prefill kernel (`_attention_prefill_ragged_cpu`, registered in the module as
`batch_prefill_ragged_kv`) is one serial scalar loop nest that also evaluates the masked half of
the causal score matrix, and the RoPE kernel (`fused_rope`) is serial too: on SmolLM2-135M the
attention call took ~2.7 s of a 5.4 s 512-token forward pass (2 cores), so calibration
(128 × 512 tokens) and perplexity evaluation spent half their time in it.

This kernel computes the same function (same signature, outputs and log2-domain LSE) as a
flash-attention loop on the CPU: tasks (kv head, block of `qb` query positions) run in parallel;
each loads a tile of `kt` keys transposed once and scores all g·qb query rows of the GQA group
against it with vector FMAs across the keys, then updates an online softmax (exp2 by a
polynomial, vectorized) and accumulates p · v with vector FMAs across the head dim. Keys past a
row's causal limit are skipped. Measured on the 2-core host (512 tokens, 9 query / 3 KV heads,
head dim 64, one layer): 144 ms → 9-12 ms; with `fused_rope` run in parallel over tokens the
whole attention call of a SmolLM2 forward went from ~2.7 s to ~0.4-0.7 s.

Only rotary_mode 0 is supported (RoPE applied before attention, the cache's NORMAL mode that awqc
uses); the kernel refuses rotary_mode 1 with an assertion rather than compute without RoPE.
"""
from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

RAGGED_PREFILL = "batch_prefill_ragged_kv"
FUSED_ROPE = "fused_rope"
_LOG2E = math.log2(math.e)
_MASKED = -5e4  # the value TVM's kernels give masked scores (exp2 of it is 0)
# 2^f on [-1/2, 1/2]: Chebyshev interpolant of degree 5, relative error 2.4e-7 (~2 float32 ulps).
_EXP2_POLY = (1.0000001192092896, 0.6931471824645996, 0.2402210682630539, 0.055503569543361664,
              0.009676031768321991, 0.0013390863314270973)


def _exp2(x):
    """2^x for x <= 0 from vector-friendly operations. exp2f is a scalar libm call per element and
    took ~70% of the kernel; this is 2^round(x) (built in the float's exponent bits) times a
    polynomial in the remainder. x <= -127 gives 0."""
    xc = T.max(x, T.float32(-127.0))
    n = T.floor(xc + T.float32(0.5))
    f = xc - n
    poly = T.float32(_EXP2_POLY[-1])
    for c in reversed(_EXP2_POLY[:-1]):
        poly = poly * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return poly * scale


def prefill_ragged_cpu(h_kv: int, h_q: int, d: int, dtype: str = "float32", qb: int = 16, kt: int = 64):
    """The kernel for h_q query heads sharing h_kv key/value heads of dimension d."""
    g = h_q // h_kv
    rows = qb * g

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",  # noqa: F841 (signature)
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        assert rotary_mode == 0, "awqc's CPU prefill attention expects RoPE applied before attention"
        for b in T.serial(batch_size):
            for task in T.parallel(h_kv * ((q_indptr[b + 1] - q_indptr[b] + qb - 1) // qb)):
                with T.sblock("attn"):
                    # Opaque block (no schedule will touch it): region inference would name the
                    # let-bound variables below outside their scope.
                    T.reads()
                    T.writes()
                    kt_buf = T.sblock_alloc_buffer((d, kt), "float32")
                    s = T.sblock_alloc_buffer((kt,), "float32")
                    acc = T.sblock_alloc_buffer((rows, d), "float32")
                    m = T.sblock_alloc_buffer((rows,), "float32")
                    l_sum = T.sblock_alloc_buffer((rows,), "float32")
                    tmp = T.sblock_alloc_buffer((2,), "float32")
                    q0: T.let[T.int32] = q_indptr[b]
                    qlen: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    k0: T.let[T.int32] = kv_indptr[b]
                    kvl: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    hk: T.let[T.int32] = task % h_kv
                    p0: T.let[T.int32] = task // h_kv * qb
                    # Keys the block needs: up to the causal limit of its last query.
                    kend: T.let[T.int32] = T.if_then_else(
                        causal > 0, T.min(kvl, kvl - qlen + T.min(p0 + qb, qlen)), kvl)
                    for r in T.serial(rows):
                        m[r] = T.float32(_MASKED)
                        l_sum[r] = T.float32(0)
                        for i in T.vectorized(d):
                            acc[r, i] = T.float32(0)
                    for t in T.serial((kend + kt - 1) // kt):
                        for j in T.serial(kt):
                            for i in T.serial(d):
                                kt_buf[i, j] = T.if_then_else(
                                    t * kt + j < kend, T.Cast("float32", k[k0 + t * kt + j, hk, i]), T.float32(0))
                        for r in T.serial(rows):
                            p: T.let[T.int32] = p0 + r // g
                            h: T.let[T.int32] = hk * g + r % g
                            lim: T.let[T.int32] = T.if_then_else(causal > 0, kvl - qlen + p + 1, kvl)
                            if p < qlen and t * kt < lim:
                                for j in T.vectorized(kt):
                                    s[j] = T.float32(0)
                                for i in T.serial(d):
                                    for j in T.vectorized(kt):
                                        s[j] = s[j] + T.Cast("float32", q[q0 + p, h, i]) * kt_buf[i, j]
                                for j in T.vectorized(kt):
                                    s[j] = T.if_then_else(t * kt + j < lim, s[j] * sm_scale * T.float32(_LOG2E),
                                                          T.float32(_MASKED))
                                tmp[0] = m[r]
                                for j in T.serial(kt):
                                    tmp[0] = T.max(tmp[0], s[j])
                                tmp[1] = _exp2(m[r] - tmp[0])  # rescales what was accumulated so far
                                l_sum[r] = l_sum[r] * tmp[1]
                                for i in T.vectorized(d):
                                    acc[r, i] = acc[r, i] * tmp[1]
                                m[r] = tmp[0]
                                for j in T.vectorized(kt):
                                    s[j] = _exp2(s[j] - tmp[0])  # masked keys: 0
                                for j in T.serial(kt):
                                    l_sum[r] = l_sum[r] + s[j]
                                for j in T.serial(T.min(kt, kend - t * kt)):
                                    for i in T.vectorized(d):
                                        acc[r, i] = acc[r, i] + s[j] * T.Cast("float32", v[k0 + t * kt + j, hk, i])
                    for r in T.serial(rows):
                        if p0 + r // g < qlen:
                            for i in T.vectorized(d):
                                output[q0 + p0 + r // g, hk * g + r % g, i] = T.Cast(
                                    dtype, T.if_then_else(l_sum[r] > 0, acc[r, i] / l_sum[r], T.float32(0)))
                            lse[q0 + p0 + r // g, hk * g + r % g] = T.if_then_else(
                                l_sum[r] > 0, m[r] + T.log2(l_sum[r]), T.float32(_MASKED))

    return batch_prefill_ragged_kv


def _shape_of(func: tvm.tirx.PrimFunc, index: int) -> list:
    return list(func.params[index].shape)  # TVM 0.27: a buffer parameter carries its shape


def use_cpu_prefill_attention(mod: tvm.IRModule, target: tvm.target.Target | None) -> tvm.IRModule:
    """Replace the KV cache's CPU ragged-prefill kernel (if the module has it) with the parallel one;
    only for CPU (llvm) targets, whose KV cache uses the CPU kernel."""
    gvs = [gv for gv in mod.get_global_vars() if gv.name_hint == RAGGED_PREFILL]
    if not gvs or target is None or target.kind.name != "llvm":
        return mod
    old = mod[gvs[0]]
    if not isinstance(old, tvm.tirx.PrimFunc) or len(old.params) != 14:
        return mod
    q_shape, k_shape = _shape_of(old, 0), _shape_of(old, 2)
    dtype = str(old.params[0].dtype)
    h_q, d, h_kv = int(q_shape[1]), int(q_shape[2]), int(k_shape[1])
    if h_q % h_kv or int(_shape_of(old, 3)[2]) != d:
        return mod
    new = prefill_ragged_cpu(h_kv, h_q, d, dtype)
    if old.attrs is not None and "global_symbol" in old.attrs:
        new = new.with_attr("global_symbol", old.attrs["global_symbol"])
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)  # passes must not mutate their input
    mod[gvs[0]] = new
    return mod


def parallel_rope(mod: tvm.IRModule, target: tvm.target.Target | None) -> tvm.IRModule:
    """Run the KV cache's RoPE kernel (q/k/v split + rotation, cos/sin per element) in parallel over
    tokens on CPU: it is a serial loop nest and took ~1 s of a 512-token SmolLM2 forward pass."""
    gvs = [gv for gv in mod.get_global_vars() if gv.name_hint == FUSED_ROPE]
    if not gvs or target is None or target.kind.name != "llvm":
        return mod
    func = mod[gvs[0]]
    if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and "tirx.is_scheduled" in func.attrs):
        return mod
    try:
        sch = tvm.s_tir.Schedule(func)
        loops = sch.get_loops(sch.get_sblock("llama_fused_rope"))
        sch.parallel(loops[0])
    except (tvm.s_tir.ScheduleError, RuntimeError, ValueError):  # another TVM's kernel: leave it as it is
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod[gvs[0]] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def fast_cpu_attention(mod: tvm.IRModule, target: tvm.target.Target | None) -> tvm.IRModule:
    """Both: the parallel prefill kernel and the parallel RoPE kernel (CPU targets only)."""
    return parallel_rope(use_cpu_prefill_attention(mod, target), target)


@tvm.transform.module_pass(opt_level=0, name="awqc.FastCPUAttention")
def FastCPUAttention(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """Module pass form of `fast_cpu_attention` for the current target (for compiler/pipeline.py,
    anywhere before LegalizeOps)."""
    return fast_cpu_attention(mod, tvm.target.Target.current(allow_none=True))
