"""AWQ clipping as a compiler pass: after scaling, search each quantization group's range.

For every quantized linear W [N, K] (already scaled) and each (row n, group g) the range of the
group is shrunk by a factor c from a grid (1.0, 0.95, ..., 0.55: llm-awq's `auto_clip_layer`,
20 steps with max_shrink 0.5) and the c with the smallest output error of that row's group is
kept. The error of row n, group g on inputs x is mean over tokens of (x_g · e_ng)² = e_ngᵀ G_gg e_ng
with G_gg the diagonal block of the input Gram, so it comes from calibration statistics; the inputs
of a scaled layer are x·diag(1/s), so their Gram is diag(1/s) G diag(1/s) (no second forward pass).

Rows that feed attention queries and keys are not clipped (the reference skips q_proj/k_proj: the
q·k product makes a per-row error a poor proxy); they are found in the graph
(`awq_scale.attention_qk_rows`), so fused q/k/v layers keep clipping on their value rows.

Differences from the reference: it measures on 512 tokens subsampled from the calibration set,
this uses the Gram's tokens (all of them, or `gram_tokens` per sample); it clamps weights to
[-c·max|w|, c·max|w|] before min/max quantization, this shrinks the quantizer's range [lo, hi] to
[c·lo, c·hi] (the `clip` argument of passes/quantizer.py, so the float weights stay unchanged and
the kernel sees the same values); the search picks per group among the same grid either way.
"""
from __future__ import annotations

import sys
from typing import Callable, Mapping

import numpy as np
import torch

from .awq_scale import CHUNK_ELEMENTS, SecondMoment, fake_quantize_, thread_map
from .quantizer import QuantScheme

MAX_SHRINK = 0.5
N_GRID = 20


def clip_grid(n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK) -> list[float]:
    return [1.0 - i / n_grid for i in range(int(max_shrink * n_grid))]


def group_errors(w: torch.Tensor, gram_blocks: torch.Tensor, scheme: QuantScheme, clip: float | torch.Tensor,
                 buf: torch.Tensor | None = None) -> torch.Tensor:
    """Output error of each (row, group) [N, K/G] when w [N, K] is quantized with `clip`."""
    n, k = w.shape
    ratio = clip if isinstance(clip, torch.Tensor) else torch.full((n, k // scheme.group_size), clip)
    buf = torch.empty_like(w) if buf is None else buf
    e = fake_quantize_(buf.copy_(w), scheme, ratio).sub_(w).view(n, k // scheme.group_size, scheme.group_size)
    e = e.transpose(0, 1)  # [K/G, N, G]: one batched matmul per group's block
    return (torch.bmm(e, gram_blocks) * e).sum(-1).T


def diagonal_blocks(moment: SecondMoment, group_size: int, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """G_gg for every group [K/G, G, G], of the input after scaling by 1/col_scale."""
    blocks = moment.diagonal_blocks(group_size)
    if col_scale is not None:
        inv = (1.0 / col_scale).reshape(-1, group_size)
        blocks = blocks * inv[:, :, None] * inv[:, None, :]
    return blocks.contiguous()


def search_layer_clip(w: torch.Tensor, moment: SecondMoment, scheme: QuantScheme, col_scale: torch.Tensor | None,
                      frozen_rows: np.ndarray | None = None, grid: list[float] | None = None) -> torch.Tensor:
    """The best clip ratio per (row, group) [N, K/G]; 1.0 on `frozen_rows`. Rows are independent,
    so they are searched in chunks of CHUNK_ELEMENTS weights."""
    blocks = diagonal_blocks(moment, scheme.group_size, col_scale)
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    best = torch.cat([_best_clips(w[i:i + rows], blocks, scheme, grid or clip_grid())
                      for i in range(0, w.shape[0], rows)])
    if frozen_rows is not None and frozen_rows.any():
        best[torch.from_numpy(frozen_rows)] = 1.0
    return best


def _best_clips(w: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme, grid: list[float]) -> torch.Tensor:
    best_err = best = None
    buf = torch.empty_like(w)
    for c in grid:
        err = group_errors(w, blocks, scheme, c, buf)
        if best is None:
            best_err, best = err, torch.full_like(err, c)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, c), best)
    return best


def search_clip(weights: Mapping[str, torch.Tensor], names: list[str], stats, scheme: QuantScheme,
                col_scales: Mapping[str, torch.Tensor], qk_rows: Mapping[str, np.ndarray],
                progress: bool = True) -> dict[str, torch.Tensor]:
    """Clip ratios [N, K/G] for each linear in `names` that has calibration statistics."""
    from tqdm import tqdm

    todo = [n for n in names if n in stats and not (n in qk_rows and qk_rows[n].all())]

    def one(name: str) -> torch.Tensor:
        return search_layer_clip(weights[name], stats.of(name).moment, scheme, col_scales.get(name), qk_rows.get(name))

    with tqdm(total=len(todo), desc="awq clip", unit="layer", disable=not progress, file=sys.stderr) as bar:
        return dict(zip(todo, thread_map(one, todo, bar)))
