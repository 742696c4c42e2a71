"""Benchmark the int4 expert kernel (schedules/w4_kernels.w4_expert_matmul) at real MoE shapes.

    python bench/moe_kernels.py [--threads 1 2] [--shapes qwen3-30b-a3b mixtral-8x7b] [--json out.json]

For each shape (one layer's experts, stacked, int4 g128 in layout k8) it times:
  * decode: one token's gate/up (x shared by the chosen experts) and down (one input per chosen
    expert), the chosen experts drawn at random per call, so over the calls the layer's experts
    come from DRAM as in a decode step. GB/s counts the weights a call must read (int4 values,
    scales, zeros of the chosen experts only); "% BW" is that over the read bandwidth probe of
    bench/int4_kernels.py, measured in the same process;
  * the dense int4 GEMV of one expert's gate/up shape in the layout and schedule `awqc compile`
    gives a dense linear, cold likewise, for reference;
  * prefill of 64 tokens (each token's experts drawn at random): GFLOP/s of the multiply-adds
    the chosen experts do (2 per weight per token).
Each thread count runs in its own subprocess with TVM_NUM_THREADS set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # (hidden, expert width, experts, chosen per token)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
GROUP = 128
PREFILL_TOKENS = 64
CALLS = {"decode": 16, "prefill": 2}  # calls per timing run (different experts each)
REPEATS = {"decode": 5, "prefill": 2}


def _stacked(rng, experts: int, n: int, k: int):
    """Random packed k8 weights of `experts` stacked [N, K] linears (qweight, scales, zeros)."""
    import numpy as np
    import tvm

    from awqc.schedules.w4_kernels import zeros_shape

    q = rng.integers(0, 2**32, (experts, n, k // 8), dtype=np.uint32)
    s = (rng.random((experts, n, k // GROUP)) * 0.02 + 0.001).astype(np.float16)
    z = rng.integers(0, 2**32, (experts, *zeros_shape(n, k // GROUP)), dtype=np.uint32)
    return [tvm.runtime.tensor(a) for a in (q, s, z)]


def bench_shape(spec, name: str) -> dict:
    import numpy as np
    import tvm

    from awqc.schedules.tuning import cold_copies, packed_bytes, random_weights, record_for, time_calls, time_gemv
    from awqc.schedules.layouts import choose_layout, get_layout
    from awqc.schedules.tuning import compile_kernel
    from awqc.schedules.w4_kernels import w4_expert_matmul

    h, inter, experts, slots = SHAPES[name]
    rng = np.random.default_rng(0)
    gate_up, down = _stacked(rng, experts, 2 * inter, h), _stacked(rng, experts, h, inter)

    def build(k: int, n: int, per_slot: bool):
        f = w4_expert_matmul(k, n, GROUP, experts, slots, "float32", per_slot)
        return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=spec.target())["main"]

    k_gu, k_down = build(h, 2 * inter, False), build(inter, h, True)
    row = {"shape": name, "hidden": h, "expert_width": inter, "experts": experts, "chosen": slots}
    for phase, tokens in (("decode", 1), ("prefill", PREFILL_TOKENS)):
        x = tvm.runtime.tensor(rng.standard_normal((tokens, h)).astype(np.float32))
        a = tvm.runtime.tensor(rng.standard_normal((tokens, slots, inter)).astype(np.float32))
        y_gu = tvm.runtime.tensor(np.zeros((tokens, slots, 2 * inter), np.float32))
        y_down = tvm.runtime.tensor(np.zeros((tokens, slots, h), np.float32))
        choices = [tvm.runtime.tensor(np.stack([rng.choice(experts, slots, replace=False) for _ in range(tokens)])
                                      .astype(np.int32)) for _ in range(CALLS[phase])]
        s = time_calls(lambda i: (k_gu(x, choices[i], *gate_up, y_gu), k_down(a, choices[i], *down, y_down)),
                       CALLS[phase], REPEATS[phase])
        weights_read = slots * tokens * (packed_bytes(h, 2 * inter, GROUP) + packed_bytes(inter, h, GROUP))
        row[f"{phase}_ms"] = s * 1e3
        if phase == "decode":
            row["decode_GBps"] = weights_read / s / 1e9
        else:
            row["prefill_GFLOPs"] = 2 * tokens * slots * 3 * inter * h / s / 1e9
    record = record_for(spec)  # the dense GEMV of one expert's gate/up, as a dense linear compiles
    layout = choose_layout(get_layout(record.layout), [(2 * inter, h)], GROUP)
    copies = cold_copies(h, 2 * inter, GROUP)
    gemv = compile_kernel(spec, layout, h, 2 * inter, GROUP, 1, gemv=record.gemv_knobs(h, 2 * inter))
    t = time_gemv(gemv, random_weights(layout, h, 2 * inter, GROUP, copies), h, 2 * inter)
    row["dense_layout"] = layout.name
    row["dense_gemv_GBps"] = packed_bytes(h, 2 * inter, GROUP) / t / 1e9
    return row


def worker(shapes: list[str]) -> dict:
    from int4_kernels import bandwidth_probe

    from awqc.compiler.targets import get_target
    from awqc.schedules.tuning import machine_name

    spec = get_target("host")
    bw = bandwidth_probe(spec)
    rows = [bench_shape(spec, s) for s in shapes]
    bw = max(bw["tvm_GBps"], bandwidth_probe(spec)["tvm_GBps"])
    for r in rows:
        r["decode_pct_bw"] = 100 * r["decode_GBps"] / bw
        r["dense_pct_bw"] = 100 * r["dense_gemv_GBps"] / bw
    return {"machine": machine_name(), "read_GBps": bw, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.shapes)))
        return 0
    results = {}
    for threads in args.threads:
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, __file__, "--worker", "--shapes", *args.shapes], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"{first['machine']}; int4 g{GROUP} experts in layout k8\n")
    print("| shape | threads | decode ms (gate/up + down) | decode GB/s | % read BW | dense GEMV GB/s (same layer, "
          "% BW) | prefill 64 tok ms | prefill GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for threads, res in results.items():
        for r in res["rows"]:
            print(f"| {r['shape']} (top-{r['chosen']} of {r['experts']}) | {threads} | {r['decode_ms']:.2f} | "
                  f"{r['decode_GBps']:.1f} | {r['decode_pct_bw']:.0f}% | {r['dense_gemv_GBps']:.1f} "
                  f"({r['dense_pct_bw']:.0f}%, {r['dense_layout']}) | {r['prefill_ms']:.1f} | {r['prefill_GFLOPs']:.1f} |")
        print(f"\nread bandwidth ({threads} threads): {res['read_GBps']:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
