"""Calibration's block forward against torch's own matmul on the same shapes, same run.

    python bench/calib_speed.py --shape llama2-7b --samples 8 --seq-len 512

One decoder block of the shape (random weights) runs on `samples` × `seq-len` hidden states
through awqc's BlockCalibrator (transformers' decoder layer, with the statistics taps); then the
block's four linear products run alone as torch.mm on the same token count. GFLOP/s counts the
linears' 2·tokens·K·N (attention and the statistics are extra work for the block, not counted),
so "block / matmul" ≥ 1 would mean the block runs its linears faster than bare matmuls.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from synthetic import SHAPES, config

    from awqc.compiler.calibrate import BlockCalibrator
    from awqc.compiler.config import config_from_hf
    from awqc.compiler.model_import import ImportedModel, expected_shapes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = config_from_hf({**config(args.shape), "num_hidden_layers": 1})
    shapes = expected_shapes(cfg)
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02) if len(s) == 2 else np.ones(s, np.float32)
               for n, s in shapes.items()}
    model = ImportedModel(cfg, weights, tokenizer=None, source="synthetic")
    samples = [list(rng.integers(0, cfg.vocab_size, args.seq_len)) for _ in range(args.samples)]
    cal = BlockCalibrator(model, samples)
    block = {n: torch.from_numpy(w) for n, w in weights.items() if n.startswith("layers.0.")}
    linears = [w for n, w in block.items() if w.ndim == 2]
    tokens = args.samples * args.seq_len
    flops = sum(2 * tokens * w.shape[0] * w.shape[1] for w in linears)
    cal.block(0, block)  # warm-up
    t_block = min(_timed(lambda: cal.block(0, block)) for _ in range(args.repeat))
    x = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in linears}
    torch.mm(x[linears[0].shape[1]], linears[0].T)
    t_mm = min(_timed(lambda: [torch.mm(x[w.shape[1]], w.T) for w in linears]) for _ in range(args.repeat))
    print(f"{args.shape} block, {tokens} tokens, {torch.get_num_threads()} threads: block forward "
          f"{flops / t_block / 1e9:.0f} GFLOP/s of linears ({t_block:.2f} s), torch.mm alone "
          f"{flops / t_mm / 1e9:.0f} GFLOP/s ({t_mm:.2f} s); block / matmul = {t_mm / t_block:.2f}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
