"""The CPU KV-cache kernels (passes/cpu_attention.py) against numpy: GQA softmax attention with a
log2-domain LSE (optionally soft-capped, as Gemma 2's), and rotate-half RoPE."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from awqc.compiler.targets import get_target
from awqc.passes.cpu_attention import decode_paged_cpu, prefill_paged_cpu, prefill_ragged_cpu, rope_cpu

H_KV, H_Q, D, PAGE = 3, 9, 64, 16
SM_SCALE = D ** -0.5


def build(func: tvm.tirx.PrimFunc):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=get_target("host").target())["main"]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool,
              softcap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """q [Lq, H_Q, D], k/v [Lk, H_KV, D] -> output [Lq, H_Q, D], lse (log2) [Lq, H_Q]; the queries
    are the last Lq positions of the Lk keys; scores capped to softcap * tanh(score / softcap)."""
    lq, lk = q.shape[0], k.shape[0]
    kk = np.repeat(k.astype(np.float64), H_Q // H_KV, axis=1)
    vv = np.repeat(v.astype(np.float64), H_Q // H_KV, axis=1)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), kk) * SM_SCALE
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if causal:
        s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), vv)
    lse = (m[..., 0] + np.log(p.sum(-1))) / np.log(2)
    return out, lse.T


def paged(rng: np.random.Generator, lens: list[int]) -> tuple[np.ndarray, ...]:
    """A paged cache holding sequences of `lens` tokens, its pages in random order: pages
    [n, 2, H_KV, PAGE, D], page table, page indptr, last page lengths."""
    n_pages = [(n + PAGE - 1) // PAGE for n in lens]
    pages = rng.standard_normal((sum(n_pages) + 2, 2, H_KV, PAGE, D)).astype(np.float32)
    table = rng.permutation(len(pages))[:sum(n_pages)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lens, n_pages)], np.int32)
    return pages, table, indptr, last


def cached_kv(pages: np.ndarray, table: np.ndarray, indptr: np.ndarray, i: int, n: int) -> tuple[np.ndarray, ...]:
    """Sequence i's n keys and values, [n, H_KV, D] each, read from the pages."""
    seq = pages[table[indptr[i]:indptr[i + 1]]]  # [pages, 2, H_KV, PAGE, D]
    return tuple(seq[:, x].transpose(0, 2, 1, 3).reshape(-1, H_KV, D)[:n] for x in (0, 1))


@pytest.mark.parametrize("lens,softcap", [([1], None), ([16], None), ([17], None), ([160], None),
                                          ([5, 40, 1], None), ([5, 40, 1], 0.5), ([160], 2.0)])
def test_decode_matches_numpy(lens: list[int], softcap: float | None) -> None:
    rng = np.random.default_rng(len(lens) * 1000 + sum(lens))
    b = len(lens)
    pages, table, indptr, last = paged(rng, lens)
    q = rng.standard_normal((b, H_Q, D)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((b, H_Q, D), np.float32))
    lse = tvm.runtime.tensor(np.zeros((b, H_Q), np.float32))
    zeros = np.zeros(b, np.int32)
    build(decode_paged_cpu(H_KV, H_Q, D, PAGE, softcap=softcap))(
        *[tvm.runtime.tensor(a) for a in (q, pages, indptr, table, last, zeros, zeros)], out, lse,
        0, 1.0, 10000.0, SM_SCALE)
    for i, n in enumerate(lens):
        k, v = cached_kv(pages, table, indptr, i, n)
        ref_out, ref_lse = attention(q[i:i + 1], k, v, causal=False, softcap=softcap)
        np.testing.assert_allclose(out.numpy()[i], ref_out[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[i], ref_lse[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens,kv_lens,softcap", [([1], [1], None), ([40], [40], None), ([7], [30], None),
                                                    ([3, 33], [3, 50], None), ([3, 33], [3, 50], 0.5)])
def test_prefill_matches_numpy(q_lens: list[int], kv_lens: list[int], softcap: float | None) -> None:
    rng = np.random.default_rng(sum(q_lens) + 7 * sum(kv_lens))
    q = rng.standard_normal((sum(q_lens), H_Q, D)).astype(np.float32)
    k = rng.standard_normal((sum(kv_lens), H_KV, D)).astype(np.float32)
    v = rng.standard_normal((sum(kv_lens), H_KV, D)).astype(np.float32)
    q_ptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_ptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    build(prefill_ragged_cpu(H_KV, H_Q, D, softcap=softcap))(
        *[tvm.runtime.tensor(a) for a in (q, q_ptr, k, v, kv_ptr, np.zeros(len(q), np.int32), np.zeros(len(q_lens), np.int32))],
        out, lse, 1, 0, 1.0, 10000.0, SM_SCALE)
    for i in range(len(q_lens)):
        qs, ks = slice(q_ptr[i], q_ptr[i + 1]), slice(kv_ptr[i], kv_ptr[i + 1])
        ref_out, ref_lse = attention(q[qs], k[ks], v[ks], causal=True, softcap=softcap)
        np.testing.assert_allclose(out.numpy()[qs], ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[qs], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens,kv_lens,causal,softcap", [
    ([5], [40], 0, None),  # a later prefill chunk over the cache before it (how the KV cache calls it)
    ([1, 9, 4], [17, 33, 2], 0, 0.5),  # several sequences, soft-capped
    ([9, 4], [33, 20], 1, None),  # causal: the queries are the last tokens of the cached ones
])
def test_paged_prefill_matches_numpy(q_lens: list[int], kv_lens: list[int], causal: int,
                                     softcap: float | None) -> None:
    """The full-attention layers' paged prefill kernel, in place of TVM's batch_prefill_paged_kv_cpu."""
    rng = np.random.default_rng(sum(q_lens) + 11 * sum(kv_lens) + causal)
    pages, table, indptr, last = paged(rng, kv_lens)
    q = rng.standard_normal((sum(q_lens), H_Q, D)).astype(np.float32)
    q_ptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    zeros_b, zeros_q = np.zeros(len(q_lens), np.int32), np.zeros(len(q), np.int32)
    build(prefill_paged_cpu(H_KV, H_Q, D, PAGE, softcap=softcap))(
        *[tvm.runtime.tensor(a) for a in (q, q_ptr, pages, indptr, table, last, zeros_b, zeros_q)], out, lse,
        causal, 0, 1.0, 10000.0, SM_SCALE)
    for i, n in enumerate(kv_lens):
        qs = slice(q_ptr[i], q_ptr[i + 1])
        k, v = cached_kv(pages, table, indptr, i, n)
        ref_out, ref_lse = attention(q[qs], k, v, causal=bool(causal), softcap=softcap)
        np.testing.assert_allclose(out.numpy()[qs], ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[qs], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_rope_matches_numpy(scale: float) -> None:
    theta, seq = 10000.0, 5
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((seq, H_Q + 2 * H_KV, D)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 511], np.int32)
    outs = [tvm.runtime.tensor(np.zeros((seq, h, D), np.float32)) for h in (H_Q, H_KV, H_KV)]
    kernel = build(rope_cpu(theta, scale, D, H_Q, H_KV, "float32", {}, D))
    inv_freq = theta ** -(np.arange(D // 2) * 2 / D)
    angle = (pos[:, None] * scale) * np.concatenate([inv_freq, inv_freq])[None, :]  # [seq, D]
    x = qkv.astype(np.float64)
    rotated = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)
    ref = x * np.cos(angle)[:, None, :] + rotated * np.sin(angle)[:, None, :]
    kernel(tvm.runtime.tensor(qkv), tvm.runtime.tensor(pos), *outs, 1)
    np.testing.assert_allclose(outs[0].numpy(), ref[:, :H_Q], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs[1].numpy(), ref[:, H_Q:H_Q + H_KV], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(outs[2].numpy(), qkv[:, H_Q + H_KV:])
    kernel(tvm.runtime.tensor(qkv), tvm.runtime.tensor(pos), *outs, 0)  # apply_rope = 0: a plain split
    np.testing.assert_array_equal(outs[0].numpy(), qkv[:, :H_Q])
    np.testing.assert_array_equal(outs[1].numpy(), qkv[:, H_Q:H_Q + H_KV])
