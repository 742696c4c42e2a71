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
DAMP = 0.01
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
               block: int = BLOCK) -> torch.Tensor:
    """Levels q [N, K] (uint8) of w [N, K] on the fixed grid (scale, zero) [N, K/G], rounded
    column by column with error feedback through U = inverse_cholesky(H)."""
    n, k = w.shape
    g = scheme.group_size
    work = w.to(torch.float64).clone()
    u = u.to(torch.float64)
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    q = torch.empty(n, k, dtype=torch.uint8)
    for b in range(0, k, block):
        e = min(b + block, k)
        err = torch.empty(n, e - b, dtype=torch.float64)
        for j in range(b, e):
            col = work[:, j]
            level = torch.round(col / s[:, j // g] + z[:, j // g]).clamp_(0, scheme.qmax)
            q[:, j] = level.to(torch.uint8)
            err[:, j - b] = (col - (level - z[:, j // g]) * s[:, j // g]) / u[j, j]
            work[:, j:e] -= err[:, j - b, None] * u[j, j:e]
        work[:, e:] -= err @ u[b:e, e:]
    return q


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None,
                  col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of the (AWQ-scaled) weight w [N, K]: the grid of passes/quantizer.py with
    `clip`, the levels by gptq_round on the Gram of w's inputs (divided by `col_scale` when the
    weight's columns were multiplied by it)."""
    h = gram.to(torch.float64)
    if col_scale is not None:
        inv = 1.0 / col_scale.to(torch.float64)
        h = h * inv[:, None] * inv[None, :]
    u = inverse_cholesky(h)
    scale, zero = group_params(w, scheme, clip)
    rows = max(1, _CHUNK_ELEMENTS // w.shape[1])
    q = torch.cat([gptq_round(w[r:r + rows], u, scale[r:r + rows], zero[r:r + rows], scheme)
                   for r in range(0, w.shape[0], rows)])
    return q, scale, zero
