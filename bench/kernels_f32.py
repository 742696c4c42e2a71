"""Benchmark the float32 linear-layer CPU schedules (awqc.schedules.cpu) against numpy/OpenBLAS.

    python bench/kernels_f32.py [--threads 1 2] [--targets x86-avx2 host '{"kind":"llvm",...}']

For every SmolLM2-135M linear shape it times
  * decode GEMV  y[1, N] = x[1, K] @ W[N, K]^T   -> GB/s of weight read
      cold: the weights rotate over >= 256 MB of copies, so they come from DRAM as in a real
            decode step (all 540 MB of fp32 weights are read once per token, L3 is 32 MB);
      hot:  the same weight every call (L2/L3 resident), for reference only;
  * prefill GEMM y[64, N] = x[64, K] @ W[N, K]^T (dynamic row count, run at 64) -> GFLOP/s;
and the machine's read bandwidth (numpy sum over 512 MB; 2 threads: two Python threads on the
halves, numpy releases the GIL). Every (library, thread count) runs in its own subprocess with
TVM_NUM_THREADS / OPENBLAS_NUM_THREADS set, one after the other (never two at once), so the
two thread pools never spin against each other. Times are the best of several repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

# (name, K, N): fused qkv, o_proj, fused gate_up, down, tied LM head
SHAPES = [
    ("qkv", 576, 960),
    ("o_proj", 576, 576),
    ("gate_up", 576, 3072),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
]
N_LAYERS = 30
GEMM_ROWS = 64
COLD_BYTES = 256 << 20  # rotate weights over at least this much memory (8x the 32 MB L3)
REPEATS = 10  # best of: the other core may be busy, the minimum is the least disturbed run
# awqc target names (x86-avx2 = x86-64-v3; host = what the compiler picks for this machine, from
# the /proc/cpuinfo flags) or TVM target JSON
DEFAULT_TARGETS = ["x86-avx2", "host"]


def _best(fn, calls: int, repeats: int) -> float:
    """Best (minimum) mean seconds per call over `repeats` runs of `calls` calls."""
    fn(0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _weights(k: int, n: int, copies: int) -> list[np.ndarray]:
    big = np.random.default_rng(0).random((copies, n, k), dtype=np.float32) - 0.5
    return list(big)


# ------------------------------------------------------------------------------- workers
def _worker_bandwidth(threads: int) -> dict:
    a = np.ones(128 << 20, dtype=np.float32)  # 512 MB
    parts = np.array_split(a, threads)

    def run(_):
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return {"read_GBps": a.nbytes / _best(run, 1, 7) / 1e9}


def _worker_numpy(threads: int) -> dict:
    out = {}
    for name, k, n in SHAPES:
        copies = max(2, -(-COLD_BYTES // (n * k * 4)))
        ws = _weights(k, n, copies)
        x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
        xm = np.random.default_rng(2).standard_normal((GEMM_ROWS, k), dtype=np.float32)
        cold = _best(lambda i: x @ ws[i % copies].T, copies, REPEATS)
        hot = _best(lambda i: x @ ws[0].T, 50, REPEATS)
        gemm = _best(lambda i: xm @ ws[0].T, 3, REPEATS)
        out[name] = {"cold_s": cold, "hot_s": hot, "gemm_s": gemm}
        del ws
    return out


def _nt_matmul_primfunc(k: int, n: int, rows):
    """The PrimFunc the relax pipeline emits for x[1, rows, K] @ permute_dims(W[N, K])."""
    import tvm
    from tvm import relax, tirx

    bb = relax.BlockBuilder()
    m = tirx.Var(rows, "int64") if isinstance(rows, str) else rows
    x = relax.Var("x", relax.TensorType([1, m, k], "float32"))
    w = relax.Var("w", relax.TensorType([n, k], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    mod = tvm.ir.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.DeadCodeElimination(),
        ]
    )(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _compile(func, target):
    import tvm

    from awqc.schedules.cpu import schedule_cpu_module

    mod = schedule_cpu_module(tvm.IRModule({"main": func}), target)
    assert mod["main"].attrs.get("tirx.is_scheduled"), "schedule rule did not apply"
    return tvm.compile(mod, target=target)["main"]


def _resolve_target(name: str):
    import tvm

    if name.lstrip().startswith("{"):
        return tvm.target.Target(json.loads(name))
    from awqc.compiler.targets import get_target

    return get_target(name).target()


def _worker_tvm(threads: int, target_name: str) -> dict:
    import tvm

    target = _resolve_target(target_name)
    out = {"_target": str(target)}
    for name, k, n in SHAPES:
        gemv = _compile(_nt_matmul_primfunc(k, n, 1), target)
        gemm = _compile(_nt_matmul_primfunc(k, n, "seq_len"), target)
        copies = max(2, -(-COLD_BYTES // (n * k * 4)))
        ws_np = _weights(k, n, copies)
        ws = [tvm.runtime.tensor(w) for w in ws_np]
        x_np = np.random.default_rng(1).standard_normal((1, 1, k), dtype=np.float32)
        xm_np = np.random.default_rng(2).standard_normal((1, GEMM_ROWS, k), dtype=np.float32)
        x, xm = tvm.runtime.tensor(x_np), tvm.runtime.tensor(xm_np)
        y = tvm.runtime.tensor(np.zeros((1, 1, n), np.float32))
        ym = tvm.runtime.tensor(np.zeros((1, GEMM_ROWS, n), np.float32))
        # correctness guard, so a broken schedule cannot produce a nice number
        gemv(x, ws[0], y)
        gemm(xm, ws[0], ym)
        np.testing.assert_allclose(y.numpy()[0], x_np[0] @ ws_np[0].T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ym.numpy()[0], xm_np[0] @ ws_np[0].T, rtol=1e-4, atol=1e-3)
        cold = _best(lambda i: gemv(x, ws[i % copies], y), copies, REPEATS)
        hot = _best(lambda i: gemv(x, ws[0], y), 50, REPEATS)
        gemm_s = _best(lambda i: gemm(xm, ws[0], ym), 3, REPEATS)
        out[name] = {"cold_s": cold, "hot_s": hot, "gemm_s": gemm_s}
        del ws, ws_np
    return out


# ------------------------------------------------------------------------------- driver
def _machine() -> str:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "/".join(f for f in ("avx2", "fma", "avx512f") if f in flags)
    return f"{model}, {os.cpu_count()} logical CPUs, cpuinfo flags: {simd or 'n/a'}"


def _run_worker(kind: str, threads: int, target: str = "") -> dict:
    env = dict(os.environ)
    for var in ("TVM_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--targets", target]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {kind}/{threads} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS,
                    help="awqc target names (host, x86-avx2) or TVM target JSON")
    ap.add_argument("--worker", choices=["bw", "numpy", "tvm"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "bw":
            result = _worker_bandwidth(args.threads[0])
        elif args.worker == "numpy":
            result = _worker_numpy(args.threads[0])
        else:
            result = _worker_tvm(args.threads[0], args.targets[0])
        print(json.dumps(result))
        return

    res = {}
    for t in args.threads:  # strictly sequential: one heavy process at a time
        for kind, tgt in [("bw", ""), ("numpy", ""), *[("tvm", name) for name in args.targets]]:
            print(f"... {kind} {tgt} with {t} thread(s)", file=sys.stderr, flush=True)
            res[(kind, tgt, t)] = _run_worker(kind, t, tgt)

    print("## float32 linear kernels: TVM hand schedules (awqc.schedules.cpu) vs numpy (OpenBLAS)\n")
    print(f"Machine: {_machine()}  ")
    for name in args.targets:
        print(f"TVM target `{name}`: `{res[('tvm', name, args.threads[0])]['_target']}`  ")
    bw = ", ".join(f"{t} thread(s) {res[('bw', '', t)]['read_GBps']:.1f} GB/s" for t in args.threads)
    print(f"Read bandwidth (numpy sum over 512 MB): {bw}\n")

    def gbps(nbytes: int, seconds: float) -> str:
        return f"{nbytes / seconds / 1e9:.1f}"

    print("### Decode GEMV (1 row): GB/s of weights read; cold = weights from DRAM, hot = cached\n")
    tv_cols = " | ".join(f"TVM {n} cold" for n in args.targets)
    hot_cols = " | ".join(f"TVM {n} hot" for n in args.targets)
    print(f"| layer | K x N | MB | threads | {tv_cols} | numpy cold | best TVM cold / read BW | {hot_cols} | numpy hot |")
    print("|---|---|---|---" + "|---" * (2 * len(args.targets) + 3) + "|")
    for t in args.threads:
        rbw = res[("bw", "", t)]["read_GBps"]
        for name, k, n in SHAPES:
            nb = n * k * 4
            tv = [res[("tvm", tg, t)][name] for tg in args.targets]
            npy = res[("numpy", "", t)][name]
            best = min(r["cold_s"] for r in tv)
            print(
                f"| {name} | {k}x{n} | {nb / 1e6:.1f} | {t} | "
                + " | ".join(gbps(nb, r["cold_s"]) for r in tv)
                + f" | {gbps(nb, npy['cold_s'])} | {100 * nb / best / 1e9 / rbw:.0f}% | "
                + " | ".join(gbps(nb, r["hot_s"]) for r in tv)
                + f" | {gbps(nb, npy['hot_s'])} |"
            )

    print("\nRead BW is measured in its own process just before; when the other core is busy it varies")
    print("from run to run, so the ratio can pass 100%.")

    print(f"\n### Prefill GEMM ({GEMM_ROWS} rows, dynamic row count): GFLOP/s\n")
    print("| layer | K x N | threads | " + " | ".join(f"TVM {n}" for n in args.targets) + " | numpy |")
    print("|---|---|---" + "|---" * (len(args.targets) + 1) + "|")
    for t in args.threads:
        for name, k, n in SHAPES:
            flop = 2 * GEMM_ROWS * n * k
            tv = [res[("tvm", tg, t)][name] for tg in args.targets]
            npy = res[("numpy", "", t)][name]
            print(f"| {name} | {k}x{n} | {t} | " + " | ".join(gbps(flop, r["gemm_s"]) for r in tv)
                  + f" | {gbps(flop, npy['gemm_s'])} |")

    print(f"\n### Whole-model decode estimate: {N_LAYERS} layers + LM head, linear layers only, cold\n")
    print("| threads | engine | weight MB/token | ms/token | GB/s | tok/s bound |")
    print("|---|---|---|---|---|---|")
    per_layer = [s for s in SHAPES if s[0] != "lm_head"]
    total_bytes = N_LAYERS * sum(n * k * 4 for _, k, n in per_layer) + 576 * 49152 * 4
    for t in args.threads:
        engines = [(f"TVM {tg}", res[("tvm", tg, t)]) for tg in args.targets] + [("numpy", res[("numpy", "", t)])]
        for label, r in engines:
            sec = N_LAYERS * sum(r[name]["cold_s"] for name, _, _ in per_layer) + r["lm_head"]["cold_s"]
            print(f"| {t} | {label} | {total_bytes / 1e6:.0f} | {sec * 1e3:.1f} | {gbps(total_bytes, sec)} | {1 / sec:.1f} |")


if __name__ == "__main__":
    main()
