"""awqc against llama.cpp's own `llama-bench`, same weights, same threads, interleaved.

    python bench/vs_llamacpp.py                                   # the default model, rtn-w4a8g64
    python bench/synthetic.py --shape llama2-7b -o /tmp/llama2-7b    # a random checkpoint of a real shape
    python bench/vs_llamacpp.py --model /tmp/llama2-7b --pp 128 --tg 32

The default --quant, rtn-w4a8g64, runs the kernels of the default CPU scheme (awq+gptq-w4a8g64):
the weights' values do not change the kernels' speed, and round-to-nearest compiles a 7B in
minutes where AWQ takes half an hour.

llama.cpp's tools are built from the source in the llama-cpp-python sdist by
scripts/build_llama_cpp.sh (cached under .cache/llama.cpp). Its Q4_0 GGUF holds every tensor in
Q4_0 (`--pure`): the default GGUF is requantized, a Hugging Face checkpoint goes through the same
tree's convert_hf_to_gguf.py (f16) first. awqc compiles the same checkpoint with each `--quant`
(always `--quantize-head`, as Q4_0 quantizes the head too).

Measured like llama-bench does: prefill (pp) = N prompt tokens into an empty cache in one call;
decode (tg) = M tokens one by one from an empty cache, no sampling; each after a warm-up run.
Every repetition runs each engine in a fresh process at each thread count, alternating engines,
so a slow spell of the shared machine hits both. Medians over repetitions; ratio = awqc / llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llamacpp import float_gguf, linear_bits_per_weight, llama_bin, quantize  # noqa: E402


def make_q4_0(model: str, workdir: Path, bin_dir: Path) -> Path:
    """A Q4_0 (pure) GGUF of the model's weights, made once."""
    return quantize(bin_dir, float_gguf(model, workdir, bin_dir), workdir / f"{Path(model).name}.q4_0.gguf", "Q4_0",
                    pure=True)


def compile_awqc(model: str, quant: str, workdir: Path, context: int) -> Path:
    out = workdir / f"{Path(model).name}-{quant}"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", model, "--quant", quant,
                        "--quantize-head", "--context-window", str(context), "-o", str(out)], check=True)
    return out


def awqc_bits_per_weight(artifact: Path) -> float:
    """Bits per weight of the artifact's linears: its int4 layout's, or its float dtype's."""
    from awqc.passes.quantizer import QuantScheme
    from awqc.runtime.artifact import read_manifest

    manifest = read_manifest(artifact)
    if not manifest["quantization"]:
        return {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0}[manifest["dtype"]]
    return QuantScheme.parse(manifest["quantization"]["scheme"]).bits_per_weight


def llama_bench(bin_dir: Path, gguf: Path, threads: int, pp: int, tg: int) -> dict[str, float]:
    res = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(pp),
                          "-n", str(tg), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    out = {}
    for test in json.loads(res.stdout):
        out["pp" if test["n_prompt"] else "tg"] = float(test["avg_ts"])
    return out


def awqc_worker(artifact: str, pp: int, tg: int) -> dict[str, float]:
    """One repetition, timed as `awqc bench` times it (runtime/bench.py): warm-up, then each test."""
    from awqc.runtime.bench import time_decode, time_prefill
    from awqc.runtime.engine import Engine

    engine = Engine(artifact)
    time_prefill(engine, pp), time_decode(engine, tg)  # warm-up, as llama-bench does
    return {"pp": pp / time_prefill(engine, pp), "tg": tg / time_decode(engine, tg)}


def run_awqc(artifact: Path, threads: int, pp: int, tg: int) -> dict[str, float]:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, __file__, "--worker", str(artifact), "--pp", str(pp), "--tg", str(tg)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="default, a Hugging Face checkpoint directory")
    ap.add_argument("--quant", nargs="+", default=["rtn-w4a8g64"])
    ap.add_argument("--artifact", nargs="+", type=Path, default=[],
                    help="awqc artifacts of the same model already compiled (instead of --quant)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/awqc-vs-llamacpp"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(awqc_worker(args.worker, args.pp, args.tg)))
        return

    from decode import machine_name

    args.workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = llama_bin()
    gguf = make_q4_0(args.model, args.workdir, bin_dir)
    artifacts = {a.name: a for a in args.artifact} or {
        q: compile_awqc(args.model, q, args.workdir, args.pp + args.tg) for q in args.quant}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for threads in args.threads:
            runs.setdefault(("llama.cpp Q4_0", threads), []).append(llama_bench(bin_dir, gguf, threads, args.pp, args.tg))
            for quant, art in artifacts.items():
                runs.setdefault((f"awqc {quant}", threads), []).append(run_awqc(art, threads, args.pp, args.tg))
            print(f"rep {rep + 1}/{args.reps}, {threads} thread(s) done", file=sys.stderr)

    bits = {"llama.cpp Q4_0": linear_bits_per_weight(gguf)}
    bits.update({f"awqc {quant}": awqc_bits_per_weight(art) for quant, art in artifacts.items()})

    def median(engine: str, threads: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(engine, threads)])

    print(f"\nmachine: {machine_name()}; model {args.model}; pp{args.pp} and tg{args.tg}, "
          f"median of {args.reps} interleaved runs; Q4_0 {gguf.stat().st_size / 2**30:.2f} GiB\n")
    print("| engine | bits/weight (linears) | threads | prefill tok/s | decode tok/s | prefill vs llama.cpp "
          "| decode vs llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for (engine, threads) in runs:
        pp, tg = median(engine, threads, "pp"), median(engine, threads, "tg")
        base_pp, base_tg = median("llama.cpp Q4_0", threads, "pp"), median("llama.cpp Q4_0", threads, "tg")
        print(f"| {engine} | {bits[engine]:.2f} | {threads} | {pp:.1f} | {tg:.1f} | {pp / base_pp:.2f}x | {tg / base_tg:.2f}x |")


if __name__ == "__main__":
    main()
