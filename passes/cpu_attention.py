"""CPU kernels for the paged KV cache in place of TVM 0.27's serial scalar ones: ragged prefill
attention, paged prefill and decode attention (full and sliding-window layers), and the q/k/v
split + RoPE. The attention kernels also soft-cap their scores where a model does (Gemma 2),
which TVM's take no parameter for.

TVM's CPU prefill kernel (`batch_prefill_ragged_kv`) is one serial scalar loop nest that also
evaluates the masked half of the causal score matrix, its decode kernel (`batch_decode_paged_kv_cpu`)
is scalar and rescales the softmax per token, and its RoPE kernel (`fused_rope`) calls cos and sin
per element. On SmolLM2-135M the attention call took ~2.7 s of a 5.4 s 512-token forward pass
(2 cores), and 88 µs of each layer's decode step.

The attention kernels compute the same functions (same signatures, outputs and log2-domain LSE)
as flash-attention loops: tasks (kv head, block of query positions) run in parallel; each loads a
tile of keys transposed once and scores all query rows of the GQA group against it with vector
FMAs across the keys, then updates an online softmax once per tile (exp2 by a polynomial,
vectorized) and accumulates p · v with vector FMAs across the head dim. Keys past a row's causal
limit are skipped. Measured on the 2-core host, one layer (9 query / 3 KV heads, head dim 64):
prefill of 512 tokens 144 ms → 9-12 ms; decode at 160 cached tokens 135 µs → 27 µs; RoPE of one
token 9 µs → 1.2 µs.

Only rotary_mode 0 is supported (RoPE applied before attention, the cache's NORMAL mode that awqc
uses); the kernels refuse rotary_mode 1 with an assertion rather than compute without RoPE.
"""
from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from awqc.schedules.vector_math import LOG2E, exp2, tanh

RAGGED_PREFILL = "batch_prefill_ragged_kv"
DECODE_PAGED = "batch_decode_paged_kv_cpu"
PREFILL_PAGED = "batch_prefill_paged_kv_cpu"
PREFILL_PAGED_WINDOW = "batch_prefill_paged_kv_cpu_sliding_window"
DECODE_PAGED_WINDOW = "batch_decode_paged_kv_cpu_sliding_window"
FUSED_ROPE = "fused_rope"
_RED = 16  # lanes of the softmax's vector max and sum (one AVX-512 register)
_MASKED = -5e4  # the value TVM's kernels give masked scores (exp2 of it is 0)


def _add(a, b):
    return a + b


@T.macro
def _tree_reduce(red, s, base, n: int, op):
    """red[0] = op over s[base .. base + n) (n a multiple of _RED): _RED-wide vectors combined, then a
    halving tree. A scalar loop over s is one dependency chain of n max or add latencies, which
    took longer than the tile's FMAs."""
    for j in T.vectorized(_RED):
        red[j] = s[base + j]
    for c in T.unroll(1, n // _RED):
        for j in T.vectorized(_RED):
            red[j] = op(red[j], s[base + c * _RED + j])
    for j in T.vectorized(8):  # _RED = 16 halved to 1
        red[j] = op(red[j], red[j + 8])
    for j in T.vectorized(4):
        red[j] = op(red[j], red[j + 4])
    for j in T.vectorized(2):
        red[j] = op(red[j], red[j + 2])
    red[0] = op(red[0], red[1])


def _logit(x, softcap: float | None):
    """An attention score (q · k times the model's scale) in the log2 domain the kernels' softmax
    runs in, soft-capped first to softcap * tanh(x / softcap) when softcap is set (Gemma 2), with
    vector_math's tanh, which vectorizes as the softmax does instead of calling libm per score."""
    if softcap is None:
        return x * T.float32(LOG2E)
    return tanh(x * T.float32(1.0 / softcap)) * T.float32(softcap * LOG2E)


def prefill_ragged_cpu(h_kv: int, h_q: int, d: int, dtype: str = "float32", softcap: float | None = None,
                       qb: int = 16, kt: int = 64):
    """The kernel for h_q query heads sharing h_kv key/value heads of dimension d; `softcap`: see
    `_logit`."""
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
                    s = T.sblock_alloc_buffer((g * kt,), "float32")
                    acc = T.sblock_alloc_buffer((rows, d), "float32")
                    m = T.sblock_alloc_buffer((rows,), "float32")
                    l_sum = T.sblock_alloc_buffer((rows,), "float32")
                    tmp = T.sblock_alloc_buffer((2,), "float32")
                    red = T.sblock_alloc_buffer((_RED,), "float32")
                    q0: T.let[T.int32] = q_indptr[b]
                    qlen: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    k0: T.let[T.int32] = kv_indptr[b]
                    kvl: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    hk: T.let[T.int32] = task % h_kv
                    # Blocks of queries in the order first, last, second, second-to-last, ...: a
                    # causal block's work grows with its position, and the thread pool hands each
                    # thread a contiguous range of tasks, so in order the last thread got most of it.
                    idx: T.let[T.int32] = task // h_kv
                    p0: T.let[T.int32] = T.if_then_else(
                        idx % 2 == 0, idx // 2, (qlen + qb - 1) // qb - 1 - idx // 2) * qb
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
                        for pl in T.serial(qb):
                            # the g query heads of one position share each key and value load
                            p: T.let[T.int32] = p0 + pl
                            lim: T.let[T.int32] = T.if_then_else(causal > 0, kvl - qlen + p + 1, kvl)
                            if p < qlen and t * kt < lim:
                                for hg in T.unroll(g):
                                    for j in T.vectorized(kt):
                                        s[hg * kt + j] = T.float32(0)
                                for i in T.serial(d):
                                    for hg in T.unroll(g):
                                        for j in T.vectorized(kt):
                                            s[hg * kt + j] = s[hg * kt + j] + T.Cast(
                                                "float32", q[q0 + p, hk * g + hg, i]) * kt_buf[i, j]
                                for hg in T.serial(g):
                                    r: T.let[T.int32] = pl * g + hg
                                    for j in T.vectorized(kt):
                                        s[hg * kt + j] = T.if_then_else(
                                            t * kt + j < lim, _logit(s[hg * kt + j] * sm_scale, softcap),
                                            T.float32(_MASKED))
                                    _tree_reduce(red, s, hg * kt, kt, T.max)
                                    tmp[0] = T.max(m[r], red[0])
                                    tmp[1] = exp2(m[r] - tmp[0])  # rescales what was accumulated so far
                                    l_sum[r] = l_sum[r] * tmp[1]
                                    for i in T.vectorized(d):
                                        acc[r, i] = acc[r, i] * tmp[1]
                                    m[r] = tmp[0]
                                    for j in T.vectorized(kt):
                                        s[hg * kt + j] = exp2(s[hg * kt + j] - tmp[0])  # masked keys: 0
                                    _tree_reduce(red, s, hg * kt, kt, _add)
                                    l_sum[r] = l_sum[r] + red[0]
                                for j in T.serial(T.min(kt, kend - t * kt)):
                                    for hg in T.unroll(g):
                                        for i in T.vectorized(d):
                                            acc[pl * g + hg, i] = acc[pl * g + hg, i] + s[hg * kt + j] * T.Cast(
                                                "float32", v[k0 + t * kt + j, hk, i])
                    for r in T.serial(rows):
                        if p0 + r // g < qlen:
                            for i in T.vectorized(d):
                                output[q0 + p0 + r // g, hk * g + r % g, i] = T.Cast(
                                    dtype, T.if_then_else(l_sum[r] > 0, acc[r, i] / l_sum[r], T.float32(0)))
                            lse[q0 + p0 + r // g, hk * g + r % g] = T.if_then_else(
                                l_sum[r] > 0, m[r] + T.log2(l_sum[r]), T.float32(_MASKED))

    return batch_prefill_ragged_kv


def decode_paged_cpu(h_kv: int, h_q: int, d: int, page_size: int, dtype: str = "float32",
                     softcap: float | None = None):
    """The decode kernel (one query token per sequence, keys and values in the paged cache) for h_q
    query heads sharing h_kv key/value heads of dimension d, pages of `page_size` tokens.

    Same signature and outputs as TVM's `batch_decode_paged_kv_cpu` (non-sliding-window). Tasks
    (sequence, kv head) run in parallel; each walks the sequence's pages, transposes a page's keys
    once, scores the g query heads of the group against its tokens with vector FMAs across the
    tokens, then updates an online softmax once per page and accumulates p · v with vector FMAs
    across the head dim. TVM's kernel is scalar, serial, and rescales per token."""
    g = h_q // h_kv

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841 (signature)
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (batch_size,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")

        assert rotary_mode == 0, "awqc's CPU decode attention expects RoPE applied before attention"
        for task in T.parallel(batch_size * h_kv):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                kt_buf = T.sblock_alloc_buffer((d, page_size), "float32")
                s = T.sblock_alloc_buffer((g, page_size), "float32")
                acc = T.sblock_alloc_buffer((g, d), "float32")
                m = T.sblock_alloc_buffer((g,), "float32")
                l_sum = T.sblock_alloc_buffer((g,), "float32")
                tmp = T.sblock_alloc_buffer((2,), "float32")
                b: T.let[T.int32] = task // h_kv
                hk: T.let[T.int32] = task % h_kv
                p_begin: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
                for r in T.serial(g):
                    m[r] = T.float32(_MASKED)
                    l_sum[r] = T.float32(0)
                    for i in T.vectorized(d):
                        acc[r, i] = T.float32(0)
                for pi in T.serial(n_pages):
                    page: T.let[T.int32] = page_values[p_begin + pi]
                    n_tok: T.let[T.int32] = T.if_then_else(pi == n_pages - 1, last_page_len[b], page_size)
                    for j in T.serial(page_size):
                        for i in T.serial(d):
                            kt_buf[i, j] = T.Cast("float32", pages[page, 0, hk, j, i])
                    for r in T.serial(g):
                        for j in T.vectorized(page_size):
                            s[r, j] = T.float32(0)
                        for i in T.serial(d):
                            for j in T.vectorized(page_size):
                                s[r, j] = s[r, j] + T.Cast("float32", q[b, hk * g + r, i]) * kt_buf[i, j]
                        for j in T.vectorized(page_size):
                            s[r, j] = T.if_then_else(j < n_tok, _logit(s[r, j] * sm_scale, softcap),
                                                     T.float32(_MASKED))
                        tmp[0] = m[r]
                        for j in T.serial(page_size):
                            tmp[0] = T.max(tmp[0], s[r, j])
                        tmp[1] = exp2(m[r] - tmp[0])  # rescales what was accumulated so far
                        l_sum[r] = l_sum[r] * tmp[1]
                        for i in T.vectorized(d):
                            acc[r, i] = acc[r, i] * tmp[1]
                        m[r] = tmp[0]
                        for j in T.vectorized(page_size):
                            s[r, j] = T.if_then_else(j < n_tok, exp2(s[r, j] - tmp[0]), T.float32(0))
                        for j in T.serial(page_size):
                            l_sum[r] = l_sum[r] + s[r, j]
                        for j in T.serial(n_tok):
                            for i in T.vectorized(d):
                                acc[r, i] = acc[r, i] + s[r, j] * T.Cast("float32", pages[page, 1, hk, j, i])
                for r in T.serial(g):
                    for i in T.vectorized(d):
                        output[b, hk * g + r, i] = T.Cast(
                            dtype, T.if_then_else(l_sum[r] > 0, acc[r, i] / l_sum[r], T.float32(0)))
                    lse[b, hk * g + r] = T.if_then_else(l_sum[r] > 0, m[r] + T.log2(l_sum[r]), T.float32(_MASKED))

    return batch_decode_paged_kv


def _paged_attend(g: int, d: int, page_size: int, dtype: str, softcap: float | None):
    """The attention of one token's g query heads (kv head hk of sequence b) over the sequence's
    pages in the cache, as `decode_paged_cpu` computes it: scores against a transposed page with
    vector FMAs, an online softmax once per page. The sequence's keys are numbered from `offset`
    slots into its first page (a sliding window's start) to `last_len` slots into its last; keys
    key_lo <= number < key_hi are visible."""

    @T.macro
    def attend(q, t, b, hk, key_lo, key_hi, offset, last_len, pages, page_indptr, page_values, output, lse,
               sm_scale):
        with T.sblock("attn"):
            T.reads()
            T.writes()
            kt_buf = T.sblock_alloc_buffer((d, page_size), "float32")
            s = T.sblock_alloc_buffer((g, page_size), "float32")
            acc = T.sblock_alloc_buffer((g, d), "float32")
            m = T.sblock_alloc_buffer((g,), "float32")
            l_sum = T.sblock_alloc_buffer((g,), "float32")
            tmp = T.sblock_alloc_buffer((2,), "float32")
            p_begin: T.let[T.int32] = page_indptr[b]
            n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
            for r in T.serial(g):
                m[r] = T.float32(_MASKED)
                l_sum[r] = T.float32(0)
                for i in T.vectorized(d):
                    acc[r, i] = T.float32(0)
            for pi in T.serial(n_pages):
                page: T.let[T.int32] = page_values[p_begin + pi]
                lo: T.let[T.int32] = T.if_then_else(pi == 0, offset, 0)
                hi: T.let[T.int32] = T.if_then_else(pi == n_pages - 1, last_len, page_size)
                first: T.let[T.int32] = pi * page_size - offset  # the number of slot 0's key
                for j in T.serial(page_size):
                    for i in T.serial(d):
                        kt_buf[i, j] = T.Cast("float32", pages[page, 0, hk, j, i])
                for r in T.serial(g):
                    for j in T.vectorized(page_size):
                        s[r, j] = T.float32(0)
                    for i in T.serial(d):
                        for j in T.vectorized(page_size):
                            s[r, j] = s[r, j] + T.Cast("float32", q[t, hk * g + r, i]) * kt_buf[i, j]
                    for j in T.vectorized(page_size):
                        s[r, j] = T.if_then_else(
                            (j >= lo) & (j < hi) & (first + j >= key_lo) & (first + j < key_hi),
                            _logit(s[r, j] * sm_scale, softcap), T.float32(_MASKED))
                    tmp[0] = m[r]
                    for j in T.serial(page_size):
                        tmp[0] = T.max(tmp[0], s[r, j])
                    tmp[1] = exp2(m[r] - tmp[0])
                    l_sum[r] = l_sum[r] * tmp[1]
                    for i in T.vectorized(d):
                        acc[r, i] = acc[r, i] * tmp[1]
                    m[r] = tmp[0]
                    for j in T.vectorized(page_size):
                        s[r, j] = T.if_then_else(s[r, j] > T.float32(_MASKED), exp2(s[r, j] - tmp[0]), T.float32(0))
                    for j in T.serial(page_size):
                        l_sum[r] = l_sum[r] + s[r, j]
                    for j in T.serial(hi - lo):  # slots outside [lo, hi) may hold no value yet
                        for i in T.vectorized(d):
                            acc[r, i] = acc[r, i] + s[r, lo + j] * T.Cast("float32", pages[page, 1, hk, lo + j, i])
            for r in T.serial(g):
                for i in T.vectorized(d):
                    output[t, hk * g + r, i] = T.Cast(
                        dtype, T.if_then_else(l_sum[r] > 0, acc[r, i] / l_sum[r], T.float32(0)))
                lse[t, hk * g + r] = T.if_then_else(l_sum[r] > 0, m[r] + T.log2(l_sum[r]), T.float32(_MASKED))

    return attend


def prefill_paged_cpu(h_kv: int, h_q: int, d: int, page_size: int, dtype: str = "float32",
                      softcap: float | None = None):
    """The part of a prefill chunk's attention that reads the cache (the chunk's own keys are the
    ragged kernel's), for full-attention layers: same signature and outputs as TVM's
    `batch_prefill_paged_kv_cpu`, whose loops are serial and scalar and take no soft-cap. Tasks
    (token, kv head) run in parallel, each `_paged_attend` over the sequence's pages; `causal`
    masks as TVM's kernel does (the chunk's last token sees every key)."""
    g = h_q // h_kv
    attend = _paged_attend(g, d, page_size, dtype, softcap)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841 (signature)
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        assert rotary_mode == 0, "awqc's CPU prefill attention expects RoPE applied before attention"
        for task in T.parallel(total_len * h_kv):
            with T.sblock("seq"):
                T.reads()
                T.writes()
                seq = T.sblock_alloc_buffer((1,), "int32")
                seq[0] = 0
                for i in T.serial(batch_size):  # the sequence whose tokens include this one
                    if q_indptr[i + 1] <= task // h_kv:
                        seq[0] = i + 1
                kv_len: T.let[T.int32] = (page_indptr[seq[0] + 1] - page_indptr[seq[0]] - 1) * page_size \
                    + last_page_len[seq[0]]
                qo_len: T.let[T.int32] = q_indptr[seq[0] + 1] - q_indptr[seq[0]]
                attend(q, task // h_kv, seq[0], task % h_kv, 0,
                       T.if_then_else(causal > 0, kv_len - qo_len + task // h_kv - q_indptr[seq[0]] + 1, kv_len),
                       0, last_page_len[seq[0]], pages, page_indptr, page_values, output, lse, sm_scale)

    return batch_prefill_paged_kv


def paged_window_cpu(h_kv: int, h_q: int, d: int, page_size: int, window: int, decode: bool,
                     dtype: str = "float32", softcap: float | None = None):
    """Sliding-window attention of new tokens over the paged cache, for the KV cache's
    "mha_sliding" layers: `decode` gives the kernel of TVM's `batch_decode_paged_kv_cpu_sliding_window`
    signature, else that of `batch_prefill_paged_kv_cpu_sliding_window` (the part of a prefill
    chunk's attention that reads the cache).

    The cache hands these kernels only the pages of the last `window` positions, starting
    `length_info[1]` tokens into the first page at position `k_rope_pos_offset`. A key is visible to
    a query when query position - window < key position <= query position, checked on absolute
    positions (TVM's CPU prefill kernel reads an uninitialized running maximum when a query's first
    key is masked, which with window-sized chunks gave NaN). Tasks (token, kv head) run in parallel,
    each `_paged_attend`. Attention sinks (`length_info[2]`) are not used by awqc."""
    g = h_q // h_kv
    attend = _paged_attend(g, d, page_size, dtype, softcap)

    @T.macro
    def attend_window(q, t, b, hk, qpos, pages, page_indptr, page_values, length_info, k_rope_pos_offset,
                      output, lse, sm_scale):
        # key number i sits at position k_rope_pos_offset[b] + i
        attend(q, t, b, hk, qpos - window + 1 - k_rope_pos_offset[b], qpos + 1 - k_rope_pos_offset[b],
               length_info[1, b], length_info[0, b], pages, page_indptr, page_values, output, lse, sm_scale)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_sliding_window(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (3, batch_size), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (batch_size,), "int32",
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")

        assert rotary_mode == 0, "awqc's CPU sliding-window attention expects RoPE applied before attention"
        for task in T.parallel(batch_size * h_kv):
            attend_window(q, task // h_kv, task // h_kv, task % h_kv, q_rope_position[task // h_kv], pages,
                          page_indptr, page_values, length_info, k_rope_pos_offset, output, lse, sm_scale)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_sliding_window(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (3, batch_size), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        assert rotary_mode == 0, "awqc's CPU sliding-window attention expects RoPE applied before attention"
        for task in T.parallel(total_len * h_kv):
            with T.sblock("seq"):
                T.reads()
                T.writes()
                seq = T.sblock_alloc_buffer((1,), "int32")
                seq[0] = 0
                for i in T.serial(batch_size):  # the sequence whose tokens include this one
                    if q_indptr[i + 1] <= task // h_kv:
                        seq[0] = i + 1
                attend_window(q, task // h_kv, seq[0], task % h_kv, q_rope_position[task // h_kv], pages,
                              page_indptr, page_values, length_info, k_rope_pos_offset, output, lse, sm_scale)

    return batch_decode_paged_kv_sliding_window if decode else batch_prefill_paged_kv_sliding_window


def rope_cpu(theta: float, scale: float, head_dim: int, h_q: int, h_kv: int, dtype: str,
             rope_scaling: dict, rotary_dim: int):
    """The KV cache's q/k/v split + RoPE kernel (same signature as TVM's `fused_rope`), with the
    cos/sin of each (token, dim) computed once and shared by all q and k heads: TVM's kernel calls
    cos and sin per element, 12× more libm calls on SmolLM2, ~30 µs per layer of a decode step.
    The frequencies come from TVM's own `switch_rope_freq_func`, so every RoPE scaling the KV
    cache supports gives the same angles. Parallel over tokens."""
    from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

    fused = h_q + 2 * h_kv
    half = rotary_dim // 2
    freq = switch_rope_freq_func(rope_scaling)

    def cos_sin(pos, d):
        c, sn, var_map = freq(pos * T.float32(scale), d, rotary_dim, theta, "float32")
        for var, value in var_map.items():
            c, sn = tvm.tirx.Let(var, value, c), tvm.tirx.Let(var, value, sn)
        return c, sn

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads()
                T.writes()
                cs = T.sblock_alloc_buffer((2, rotary_dim), "float32")
                rot = T.sblock_alloc_buffer((fused, head_dim), "float32")
                for d in T.serial(rotary_dim):
                    cs[0, d] = cos_sin(position_map[s], d)[0]
                    cs[1, d] = cos_sin(position_map[s], d)[1]
                for h, d in T.grid(h_q + h_kv, head_dim):
                    rot[h, d] = T.Cast("float32", qkv[s, h, d])
                if apply_rope > 0:
                    for h in T.serial(h_q + h_kv):
                        for d in T.vectorized(half):
                            rot[h, d] = cs[0, d] * T.Cast("float32", qkv[s, h, d]) \
                                - cs[1, d] * T.Cast("float32", qkv[s, h, d + half])
                        for d in T.vectorized(half):
                            rot[h, d + half] = cs[0, d + half] * T.Cast("float32", qkv[s, h, d + half]) \
                                + cs[1, d + half] * T.Cast("float32", qkv[s, h, d])
                for h, d in T.grid(h_q, head_dim):
                    q[s, h, d] = T.Cast(dtype, rot[h, d])
                for h, d in T.grid(h_kv, head_dim):
                    k[s, h, d] = T.Cast(dtype, rot[h_q + h, d])
                    v[s, h, d] = qkv[s, h_q + h_kv + h, d]

    return fused_rope


def _shape_of(func: tvm.tirx.PrimFunc, index: int) -> list:
    return list(func.params[index].shape)  # TVM 0.27: a buffer parameter carries its shape


def _kernel(mod: tvm.IRModule, name: str, n_params: int) -> tvm.ir.GlobalVar | None:
    """The KV cache's PrimFunc `name`, if the module has it with the `n_params` parameters TVM 0.27
    gives it (another TVM's kernel is left alone)."""
    gv = next((gv for gv in mod.get_global_vars() if gv.name_hint == name), None)
    if gv is None or not isinstance(mod[gv], tvm.tirx.PrimFunc) or len(mod[gv].params) != n_params:
        return None
    return gv


def _swap(mod: tvm.IRModule, gv: tvm.ir.GlobalVar, new: tvm.tirx.PrimFunc) -> tvm.IRModule:
    old = mod[gv]
    if old.attrs is not None and "global_symbol" in old.attrs:
        new = new.with_attr("global_symbol", old.attrs["global_symbol"])
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)  # passes must not mutate their input
    mod[gv] = new
    return mod


def use_cpu_attention_kernels(mod: tvm.IRModule, softcap: float | None = None) -> tvm.IRModule:
    """Replace the KV cache's CPU kernels of full-attention layers (where the module has them: a
    CPU KV cache) with the parallel ones: ragged prefill, paged prefill and paged decode, their
    scores soft-capped at `softcap` when it is set (Gemma 2)."""
    gv = _kernel(mod, RAGGED_PREFILL, 14)
    if gv is not None:  # q [tokens, h_q, d], k [tokens, h_kv, d]
        old = mod[gv]
        (_, h_q, d), (_, h_kv, d_kv) = _shape_of(old, 0), _shape_of(old, 2)
        if int(h_q) % int(h_kv) == 0 and int(d_kv) == int(d):
            mod = _swap(mod, gv, prefill_ragged_cpu(int(h_kv), int(h_q), int(d), str(old.params[0].dtype), softcap))
    for name, n_params, make in ((PREFILL_PAGED, 15, prefill_paged_cpu), (DECODE_PAGED, 13, decode_paged_cpu)):
        gv = _kernel(mod, name, n_params)
        if gv is not None:  # q [tokens, h_q, d], pages [pages, 2, h_kv, page_size, d]
            old = mod[gv]
            (_, h_q, d), (_, _, h_kv, page, d_kv) = _shape_of(old, 0), _shape_of(old, 2 if n_params == 15 else 1)
            if int(h_q) % int(h_kv) == 0 and int(d_kv) == int(d):
                mod = _swap(mod, gv, make(int(h_kv), int(h_q), int(d), int(page), str(old.params[0].dtype), softcap))
    return mod


def use_cpu_sliding_window(mod: tvm.IRModule, window: int, softcap: float | None = None) -> tvm.IRModule:
    """Replace the KV cache's CPU kernels for "mha_sliding" layers (where the module has them) with
    `paged_window_cpu` for a window of `window` positions."""
    for name, n_params, decode in ((PREFILL_PAGED_WINDOW, 15, False), (DECODE_PAGED_WINDOW, 13, True)):
        gv = _kernel(mod, name, n_params)
        if gv is not None:  # q [tokens, h_q, d], pages [pages, 2, h_kv, page_size, d]
            old = mod[gv]
            (_, h_q, d), (_, _, h_kv, page, _) = _shape_of(old, 0), _shape_of(old, 1 if decode else 2)
            mod = _swap(mod, gv, paged_window_cpu(int(h_kv), int(h_q), int(d), int(page), window, decode,
                                                  str(old.params[0].dtype), softcap))
    return mod


def use_cpu_rope(mod: tvm.IRModule, theta: float, scale: float, rope_scaling: dict) -> tvm.IRModule:
    """Replace the KV cache's q/k/v split + RoPE kernel (TVM's `fused_rope`, if the module has it)
    with `rope_cpu`; the shapes come from the old kernel, the RoPE parameters from the model, as
    the KV cache was given them."""
    gv = _kernel(mod, FUSED_ROPE, 6)
    if gv is None:
        return mod
    old = mod[gv]  # qkv [tokens, h_q + 2 h_kv, d], q [tokens, h_q, d], k [tokens, h_kv, d]
    fused, head_dim = (int(x) for x in _shape_of(old, 0)[1:])
    h_q, h_kv = int(_shape_of(old, 2)[1]), int(_shape_of(old, 3)[1])
    if fused != h_q + 2 * h_kv:
        return mod
    return _swap(mod, gv, rope_cpu(theta, scale, head_dim, h_q, h_kv, str(old.params[0].dtype),
                                   rope_scaling, head_dim))
