"""Quality of 4-bit quantization on the default model (SmolLM2-135M-Instruct): perplexity of float,
round-to-nearest, AWQ (scale search only), AWQ (scale + clip search) and AWQ + GPTQ rounding
(passes/gptq.py) at w4 g64 and g32, with the search time (calibration + search); prints a markdown
table.

    python bench/quality.py                      # 40 windows x 512 tokens, 128 x 512 calibration
    python bench/quality.py --windows 20 --group-sizes 64

Evaluation texts: the Python tutorial, FAQ and HOWTOs (python3.11-doc) and the Jargon File
(jargon-text: English prose of another kind); calibration text: the Python library reference
(disjoint from both). Quantized weights are scored dequantized in the float
library compiled once (compiler/evaluate.py), so the table does not depend on the int4 kernels.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

from awqc.compiler.calibrate import CalibrationSettings
from awqc.compiler.evaluate import QualityRun, QualitySettings, format_table
from awqc.compiler.model_import import load_model
from awqc.passes.quantizer import QuantScheme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32])
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of --window-len tokens (default 40)")
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--gram-tokens", type=int, default=128, help="tokens per sample for the Gram (0: all)")
    p.add_argument("--calib-stats", type=Path, default=None, help="calibration statistics cache file")
    p.add_argument("--domains", nargs="+", default=["python-docs", "jargon"],
                   help="evaluation texts (compiler/text_data.py EVAL_DOMAINS; default both)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = load_model(args.model)
    t_load = time.perf_counter() - t0
    calibration = CalibrationSettings(None, args.calib_samples, args.calib_seq_len, args.gram_tokens or None,
                                      args.calib_stats)
    settings = QualitySettings(None, args.windows, args.window_len, calibration)
    run = QualityRun(model, settings)
    rows = []
    for domain in args.domains:
        for r in run.compare(["float", "rtn", "awq-scale", "awq", "awq+gptq"],
                             [QuantScheme(group_size=g) for g in args.group_sizes], domain):
            rows.append({"text": domain, **r, "search s": None if r["search s"] is None else round(r["search s"])})
    print(format_table(rows))
    tokens = len(run.windows) * args.window_len
    print(f"\n{args.model}: {len(run.windows)} evaluation windows x {args.window_len} tokens ({tokens} tokens) "
          f"per text (python-docs: the Python tutorial/FAQ/HOWTOs; jargon: the Jargon File); calibration {args.calib_samples} x {args.calib_seq_len} tokens "
          f"(Python library reference), Gram from {args.gram_tokens or args.calib_seq_len} tokens per sample; "
          f"search s = calibration ({run.calib_seconds:.0f} s, shared by all rows) + scale (+ clip) search.")
    print(f"load {t_load:.0f} s, total {time.perf_counter() - t0:.0f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
