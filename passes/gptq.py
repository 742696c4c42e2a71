"""Error-compensated rounding (GPTQ's) of AWQ-scaled weights, from the Gram calibration collected.

AWQ fixes each group's scale s and zero point z (after the scale and clip searches); rounding
each weight to its nearest level on that grid is what RTN does. Rounding is a choice per weight,
and the output error of a linear on its calibration inputs x is

    E(Q) = mean_x ||(W - Q) x||^2 = sum_n (w_n - q_n)^T H (w_n - q_n),   H = mean_x x x^T,

the same Gram that the scale and clip searches use (inputs of an AWQ-scaled layer are
x diag(1/c), so H becomes diag(1/c) H diag(1/c) for the column factors c). GPTQ (Frantar et al.
2022, after Optimal Brain Surgeon) rounds the columns k = 0 .. K-1 in order and, after each,
moves the rounding error onto the columns not yet rounded so that E grows least:

    U = chol(H^-1)^T (upper),   e_k = (w_k - q_k) / U_kk,   w_j <- w_j - e_k U_kj  (j > k).

Columns go in order of decreasing H_kk (GPTQ's "act-order"): the inputs that carry the most energy
are rounded first, while the most columns remain to absorb their error. The grid is fixed before
rounding starts, so the order changes only which level each weight takes, never a group's scale
(GPTQ's "static groups"); the columns are permuted, rounded, and put back.

Rows are independent (H is shared), so all rows go together. Columns go in blocks of BLOCK: the
updates inside a block are applied one column at a time, the block's accumulated effect on later
columns as one matrix product (GPTQ's lazy batch update). H is damped by DAMP x mean(diag H) on
its diagonal, which keeps the Cholesky factor defined when some inputs are (near) linearly
dependent; inputs that are always zero (diag H = 0) get a unit diagonal, so their weights just
round to nearest. The grid (s, z) stays AWQ's, so the artifact's scales and zero points, and
every kernel, are unchanged: only which level each weight takes changes.
"""
from __future__ import annotations

import torch

from .quantizer import QuantScheme, group_params

BLOCK = 128
# GPTQ's paper damps by 0.01. On the default model (w4g64, Gram of 128 tokens x 128 samples, act-order)
# perplexity on python-docs / jargon was 13.920 / 52.739 at 0.01, 13.987 / 52.308 at 0.1 (library
# calibration), and 14.009 / 51.156 at 0.1, 13.927 / 51.026 at 0.3 (library + prose calibration):
# a Gram from a few thousand tokens per layer is a noisy Hessian, and more damping generalizes better.
DAMP = 0.3
_CHUNK_ELEMENTS = 1 << 24  # rows are rounded a chunk at a time above this many weights (LM heads)


def inverse_cholesky(gram: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + damp mean(diag H) I)^-1, in float64."""
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += damp * diag.mean()
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_round(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
               order: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """Levels q [N, K] (uint8) of w [N, K] on the fixed grid (scale, zero) [N, K/G], rounded
    column by column with error feedback through U = inverse_cholesky(H[order][:, order]), the
    columns taken in `order` (default 0 .. K-1)."""
    n, k = w.shape
    order = torch.arange(k) if order is None else order
    group = (order // scheme.group_size).tolist()  # the group of the j-th column rounded
    work = w[:, order].to(torch.float64)
    u = u.to(torch.float64)
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    q = torch.empty(n, k, dtype=torch.uint8)
    for b in range(0, k, block):
        e = min(b + block, k)
        err = torch.empty(n, e - b, dtype=torch.float64)
        for j in range(b, e):
            col, sj, zj = work[:, j], s[:, group[j]], z[:, group[j]]
            level = torch.round(col / sj + zj).clamp_(0, scheme.qmax)
            q[:, order[j]] = level.to(torch.uint8)
            err[:, j - b] = (col - (level - zj) * sj) / u[j, j]
            work[:, j:e] -= err[:, j - b, None] * u[j, j:e]
        work[:, e:] -= err @ u[b:e, e:]
    return q


def act_order(gram: torch.Tensor) -> torch.Tensor:
    """The columns by decreasing diagonal of the Gram (ties by index, so the order is reproducible)."""
    return torch.sort(torch.diagonal(gram), descending=True, stable=True).indices


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of the (AWQ-scaled) weight w [N, K]: the grid of passes/quantizer.py with
    `clip`, the levels by gptq_round on the Gram of w's inputs (divided by `col_scale` when the
    weight's columns were multiplied by it)."""
    h = gram.to(torch.float64)
    if col_scale is not None:
        inv = 1.0 / col_scale.to(torch.float64)
        h = h * inv[:, None] * inv[None, :]
    order = act_order(h)
    u = inverse_cholesky(h[order][:, order])
    scale, zero = group_params(w, scheme, clip)
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    q = torch.cat([gptq_round(w[r:r + rows], u, scale[r:r + rows], zero[r:r + rows], scheme, order)
                   for r in range(0, w.shape[0], rows)])
    return q, scale, zero
