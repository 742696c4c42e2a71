"""Error-compensated rounding (passes/gptq.py): a hand-checked example, a float64 numpy
reimplementation of the unblocked algorithm (Optimal Brain Surgeon's inverse-Hessian updates, not
the Cholesky form), and its effect on the output error and on an AWQ artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from awqc.passes.gptq import DAMP, act_order, gptq_quantize, gptq_round, inverse_cholesky
from awqc.passes.quantizer import QuantScheme, dequantize, group_params, quantize


def test_two_weights_by_hand() -> None:
    # H = [[1, .5], [.5, 1]], w = [0.4, 0.4] on the integer grid (scale 1, zero 0).
    # Column 0 rounds to 0 (error 0.4); the optimal correction of column 1 is
    # -0.4 * Hinv01 / Hinv00 = -0.4 * (-2/3) / (4/3) = +0.2, so w1 = 0.6 rounds to 1 (RTN: 0).
    # Output error e^T H e: RTN e = (.4, .4) -> 0.48; GPTQ e = (.4, -.6) -> 0.28.
    h = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    u = inverse_cholesky(h, damp=0.0)
    np.testing.assert_allclose(u.numpy(), [[np.sqrt(4 / 3), -np.sqrt(1 / 3)], [0, 1]], rtol=1e-12)
    w = torch.tensor([[0.4, 0.4]], dtype=torch.float64)
    # one group covers both columns (column j reads group j // 32 = 0): scale 1, zero 0
    q = gptq_round(w, u, torch.ones(1, 1), torch.zeros(1, 1), QuantScheme(group_size=32))
    assert q.tolist() == [[0, 1]]


def test_act_order_by_hand() -> None:
    # H = [[1, .5], [.5, 4]]: column 1 carries more energy, so it is rounded first.
    # H^-1 = [[4, -.5], [-.5, 1]] / 3.75. In order (1, 0): w1 = 0.4 rounds to 0 (error 0.4),
    # w0 += -0.4 * Hinv10 / Hinv11 = +0.2, so 0.6 rounds to 1: e = (-0.6, 0.4), e^T H e = 0.76.
    # In order (0, 1): w0 rounds to 0, w1 += 0.4 * 0.5 / 4 = 0.05, 0.45 rounds to 0: e^T H e = 0.96.
    h = torch.tensor([[1.0, 0.5], [0.5, 4.0]], dtype=torch.float64)
    order = act_order(h)
    assert order.tolist() == [1, 0]
    w, one, zero = torch.tensor([[0.4, 0.4]], dtype=torch.float64), torch.ones(1, 1), torch.zeros(1, 1)
    scheme = QuantScheme(group_size=32)
    assert gptq_round(w, inverse_cholesky(h[order][:, order], damp=0.0), one, zero, scheme, order).tolist() == [[1, 0]]
    assert gptq_round(w, inverse_cholesky(h, damp=0.0), one, zero, scheme).tolist() == [[0, 0]]
    assert act_order(torch.eye(3)).tolist() == [0, 1, 2]  # ties keep their index order


def obs_reference(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int,
                  qmax: int, damp: float) -> np.ndarray:
    """Round one column at a time, the one with the largest H_kk among those left first; after
    each, correct the rest with the inverse Hessian of the columns not yet rounded, and remove
    the rounded column from it (float64, no blocks, no permutation)."""
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    q = np.zeros(w.shape, np.uint8)
    left = list(range(w.shape[1]))
    while left:
        j = max(left, key=lambda c: (h[c, c], -c))
        left.remove(j)
        s, z = scale[:, j // group], zero[:, j // group]
        q[:, j] = np.clip(np.round(w[:, j] / s + z), 0, qmax)
        err = w[:, j] - (q[:, j] - z) * s
        w[:, left] -= np.outer(err / hinv[j, j], hinv[j, left])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


def correlated_inputs(k: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mix * rng.uniform(0.2, 3.0, k)  # uneven channel magnitudes
    x[:, 5] = 0  # an input that is always zero
    return x


@pytest.mark.parametrize("k,group", [(192, 64), (320, 32)])  # 320: blocks of 128 do not divide K
def test_matches_float64_reference(k: int, group: int) -> None:
    n = 24
    x = correlated_inputs(k, 512, seed=k)
    h = x.T @ x / len(x)
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((n, k)) * 0.05)
    scheme = QuantScheme(group_size=group)
    q, scale, zero = gptq_quantize(w, torch.from_numpy(h), scheme)
    ref = obs_reference(w.numpy(), h, scale.numpy(), zero.numpy(), group, scheme.qmax, DAMP)
    assert (q.numpy() == ref).mean() > 0.999  # an exact tie may fall either way in another float order
    s_ref, z_ref = group_params(w, scheme)
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref)  # the grid is RTN's (AWQ's), unchanged


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    e = w - wq
    return float(np.einsum("nk,kl,nl->", e, h, e))


def test_lowers_the_output_error_and_keeps_the_grid() -> None:
    n, k, group = 64, 256, 64
    x = correlated_inputs(k, 2048, seed=3)
    h = x.T @ x / len(x)
    w = torch.from_numpy(np.random.default_rng(2).standard_normal((n, k)).astype(np.float32) * 0.05)
    scheme = QuantScheme(group_size=group)
    clip = torch.full((n, k // group), 0.9)
    q, scale, zero = gptq_quantize(w, torch.from_numpy(h).float(), scheme, clip)
    q_rtn, s_rtn, z_rtn = quantize(w, scheme, clip)
    assert torch.equal(scale, s_rtn) and torch.equal(zero, z_rtn)
    err_gptq = output_error(w.numpy(), dequantize(q, scale, zero, group).numpy(), h)
    err_rtn = output_error(w.numpy(), dequantize(q_rtn, s_rtn, z_rtn, group).numpy(), h)
    assert err_gptq < 0.7 * err_rtn


def test_column_scale_transforms_the_gram() -> None:
    """A weight whose columns were multiplied by c sees inputs divided by c: rounding it with
    col_scale=c equals rounding it against the Gram of x / c."""
    n, k, group = 16, 128, 64
    x = correlated_inputs(k, 1024, seed=4)
    c = np.random.default_rng(5).uniform(0.5, 2.0, k)
    w = torch.from_numpy(np.random.default_rng(6).standard_normal((n, k)) * 0.05 * c)
    scheme = QuantScheme(group_size=group)
    h = x.T @ x / len(x)
    xs = x / c
    q1, _, _ = gptq_quantize(w, torch.from_numpy(h), scheme, col_scale=torch.from_numpy(c))
    q2, _, _ = gptq_quantize(w, torch.from_numpy(xs.T @ xs / len(xs)), scheme)
    assert (q1 == q2).float().mean() > 0.999
