"""Benchmark the int4 CPU kernels (schedules/w4_cpu.py) against this machine's read bandwidth.

    python bench/int4_kernels.py [--threads 1 2] [--target host] [--shapes smollm large] [--json out.json]

For every shape it times, with the layout and knobs `awqc compile` would use for the target
(its tuning record in schedules/records/, else the defaults):
  * decode GEMV  y[1, N] = x[1, K] @ W[N, K]^T, the weights cold: the call rotates over copies
    of the packed weights totalling >= 2x the LLC, so they come from DRAM as in a decode step.
    GB/s counts what a call must read: int4 values + scales + zeros (float32, group 64);
    "% BW" is that over the read bandwidth measured below, in the same process;
  * the same GEMV in the old layout k8 (its rfactor schedule), for reference, and the W4A8
    GEMV (layout d8, int8 activations, integer dot products; x86 only) that `--quant
    rtn-w4a8g64` compiles; all are timed alternately (ROUNDS rounds, one pass over the copies each), and the table gives the
    best round and, in brackets, the median one, which shows how noisy the machine was;
  * prefill GEMM y[64, N] = x[64, K] @ W[N, K]^T (dynamic rows, run at 64) -> GFLOP/s.
Read bandwidth: a STREAM-like probe, a TVM-compiled sum over 512 MB (16-lane vectors, four
independent accumulators per thread, the array split across the threads), and numpy's sum
(1 thread) as a cross-check, both before and after the kernels; the best is used.

Each thread count runs in its own subprocess with TVM_NUM_THREADS set, one after the other.
Times are the best of several repeats: the machine may be shared, so the minimum is the least
disturbed run; run the script more than once to see the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPE_SETS = {
    # SmolLM2-135M: fused qkv, o_proj, fused gate_up, down, LM head (tied, quantized copy)
    "smollm": [("qkv", 576, 960), ("o_proj", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
               ("lm_head", 576, 49152)],
    # Llama-7B class: attention, MLP up, and an LM head that alone exceeds a 32 MB LLC
    "large": [("4096x4096", 4096, 4096), ("4096x11008", 4096, 11008), ("lm_head_32k", 4096, 32000)],
}
GROUP = 64
GEMM_ROWS = 64
ROUNDS = 7
PROBE_FLOATS = 128 << 20  # 512 MB


# ------------------------------------------------------------------------------- worker side
def bandwidth_probe(spec) -> dict[str, float]:
    """Read GB/s of a plain streaming sum (TVM, this process's threads) and of numpy (1 thread)."""
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from awqc.schedules.tuning import time_calls

    n, chunks, lanes, chains = PROBE_FLOATS, 64, 16, 4
    per = n // chunks

    @T.prim_func(s_tir=False)
    def probe(a: T.Buffer((n,), "float32"), out: T.Buffer((chunks,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for c in T.parallel(chunks):  # TVM splits the chunks into one contiguous range per thread
            acc = T.decl_buffer((chains * lanes,), "float32", scope="global")
            for v in T.vectorized(chains * lanes):
                acc[v] = T.float32(0)
            for i in range(per // (chains * lanes)):
                for h in T.unroll(chains):
                    for v in T.vectorized(lanes):
                        acc[h * lanes + v] = acc[h * lanes + v] + a[c * per + i * chains * lanes + h * lanes + v]
            out[c] = acc[0] + acc[lanes] + acc[2 * lanes] + acc[3 * lanes]

    kernel = tvm.compile(tvm.IRModule({"main": probe}), target=spec.target())["main"]
    host = np.ones(n, np.float32)
    a, out = tvm.runtime.tensor(host), tvm.runtime.tensor(np.zeros(chunks, np.float32))
    tvm_s = time_calls(lambda _: kernel(a, out), 1, 10)
    numpy_s = time_calls(lambda _: host.sum(), 1, 5)
    return {"tvm_GBps": n * 4 / tvm_s / 1e9, "numpy_GBps": n * 4 / numpy_s / 1e9}


def bench_shape(spec, record, name: str, k: int, n: int) -> dict:
    from awqc.compiler.build import w4_backend
    from awqc.passes.quantizer import QuantScheme
    from awqc.schedules.layouts import K8, choose_layout, get_layout
    from awqc.schedules.w4a8_cpu import dot_isa
    from awqc.schedules.tuning import (LLC_BYTES, cold_copies, compile_kernel, packed_bytes, random_weights,
                                       time_gemm, time_gemv)

    layout = choose_layout(get_layout(record.layout), [(n, k)], GROUP)
    copies = cold_copies(k, n, GROUP)
    row = {"shape": name, "K": k, "N": n, "layout": layout.name, "MB": packed_bytes(k, n, GROUP) / 1e6,
           "exceeds_llc": packed_bytes(k, n, GROUP) > LLC_BYTES}
    weights = random_weights(layout, k, n, GROUP, copies)
    k8_weights = random_weights(K8, k, n, GROUP, copies)
    gemv = compile_kernel(spec, layout, k, n, GROUP, 1, gemv=record.gemv_knobs(k, n))
    k8_gemv = compile_kernel(spec, K8, k, n, GROUP, 1)
    kernels = {"gemv": (gemv, weights), "k8_gemv": (k8_gemv, k8_weights)}
    a8_layout = None
    if dot_isa(spec.tvm_target):  # the W4A8 layout a compile picks for this shape (d16 on VNNI, else d8)
        a8_layout = w4_backend(spec, QuantScheme(group_size=GROUP, act_bits=8), [(n, k)]).layout
        row["a8_layout"] = a8_layout.name
        kernels["a8_gemv"] = (compile_kernel(spec, a8_layout, k, n, GROUP, 1),
                              random_weights(a8_layout, k, n, GROUP, copies))
    rounds: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(ROUNDS):  # alternate, so a busy spell on a shared machine hits all
        for name, (kernel, w) in kernels.items():
            rounds[name].append(time_gemv(kernel, w, k, n, repeats=1) * 1e3)
    for name, times in rounds.items():
        times.sort()
        row[f"{name}_ms"], row[f"{name}_median_ms"] = times[0], times[len(times) // 2]
        row[f"{name}_GBps"] = packed_bytes(k, n, GROUP) / times[0] / 1e6
        row[f"{name}_median_GBps"] = packed_bytes(k, n, GROUP) / times[len(times) // 2] / 1e6
    gemm = compile_kernel(spec, layout, k, n, GROUP, None, gemm=record.gemm_knobs(k, n))
    row["gemm_ms"] = time_gemm(gemm, weights[0], k, n, GEMM_ROWS) * 1e3
    row["gemm_GFLOPs"] = 2 * GEMM_ROWS * k * n / row["gemm_ms"] / 1e6
    if a8_layout is not None:  # the W4A8 integer GEMM: int8 x int4 multiply-adds, counted as 2 ops each
        a8_gemm = compile_kernel(spec, a8_layout, k, n, GROUP, None)
        row["a8_gemm_ms"] = time_gemm(a8_gemm, kernels["a8_gemv"][1][0], k, n, GEMM_ROWS) * 1e3
        row["a8_gemm_GOPs"] = 2 * GEMM_ROWS * k * n / row["a8_gemm_ms"] / 1e6
    return row


def worker(target: str, shape_sets: list[str]) -> dict:
    from awqc.compiler.targets import get_target
    from awqc.schedules.tuning import machine_name, record_for, record_name

    spec = get_target(target)
    record = record_for(spec)
    before = bandwidth_probe(spec)
    rows = [bench_shape(spec, record, *shape) for s in shape_sets for shape in SHAPE_SETS[s]]
    after = bandwidth_probe(spec)  # probed before and after the kernels: the best of both is used
    bw = {key: max(before[key], after[key]) for key in before}
    return {"machine": machine_name(), "target": record_name(spec), "record_layout": record.layout,
            "bandwidth": bw, "rows": rows}


# ------------------------------------------------------------------------------- driver side
def run_worker(threads: int, target: str, shape_sets: list[str]) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", target, *shape_sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker ({threads} threads) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(threads: int, result: dict) -> str:
    bw = result["bandwidth"]
    best = max(bw.values())
    lines = [f"## {threads} thread(s): read bandwidth {best:.1f} GB/s "
             f"(TVM probe {bw['tvm_GBps']:.1f}, numpy 1-thread {bw['numpy_GBps']:.1f})", "",
             "| shape | K x N | MB read | layout | GEMV ms | GEMV GB/s (median) | % BW | k8 GEMV GB/s (median) "
             "| W4A8 layout | W4A8 GEMV GB/s (median) | W4A8 % BW | GEMM(64) ms | GEMM GFLOP/s | W4A8 GEMM(64) GOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        big = " (> LLC)" if r["exceeds_llc"] else ""
        a8_gemm = f"{r['a8_gemm_GOPs']:.0f}" if "a8_gemm_GOPs" in r else "–"
        lines.append(f"| {r['shape']} | {r['K']}x{r['N']} | {r['MB']:.1f}{big} | {r['layout']} | {r['gemv_ms']:.3f} | "
                     f"{r['gemv_GBps']:.1f} ({r['gemv_median_GBps']:.1f}) | {100 * r['gemv_GBps'] / best:.0f}% | "
                     f"{r['k8_gemv_GBps']:.1f} ({r['k8_gemv_median_GBps']:.1f}) | {r.get('a8_layout', '–')} | {_a8(r, best)} | {r['gemm_ms']:.3f} | "
                     f"{r['gemm_GFLOPs']:.0f} | {a8_gemm} |")
    return "\n".join(lines)


def _a8(row: dict, best: float) -> str:
    if "a8_gemv_GBps" not in row:
        return "– | –"
    return f"{row['a8_gemv_GBps']:.1f} ({row['a8_gemv_median_GBps']:.1f}) | {100 * row['a8_gemv_GBps'] / best:.0f}%"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--target", default="host", help="awqc CPU target this machine runs (default: host)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_SETS), choices=list(SHAPE_SETS))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    results = {}
    for threads in args.threads:
        results[threads] = run_worker(threads, args.target, args.shapes)
    first = next(iter(results.values()))
    print(f"# int4 kernels on {first['machine']} (target {first['target']}, record layout "
          f"{first['record_layout']}, group {GROUP}, float32 activations)\n")
    for threads, result in results.items():
        print(format_report(threads, result) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
