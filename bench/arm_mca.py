"""Static throughput of the int4 x int8 dot-product inner loops on an ARM core model: awqc's W4A8
GEMV on sdot (schedules/w4a8_cpu.py, target arm-neon-dotprod) against llama.cpp's Q4_0 x Q8_0
kernels, cross-compiled from the source vendored in llama-cpp-python (scripts/build_llama_cpp.sh
fetches it) for the same CPU, both measured by `llvm-mca`.

    python bench/arm_mca.py                      # Cortex-A78 (Jetson Orin, Snapdragon 888's big cores)
    python bench/arm_mca.py --mcpu cortex-x1 --k 4096 --n 11008

This is a static model of one core's pipeline on the loop body in steady state (no caches, no
memory bandwidth, no branch mispredictions), not a measurement. Each loop's work is counted by its
`sdot` instructions: every one multiplies 16 weights by 16 activations, in both engines, so
cycles per 1,000 weights = cycles per iteration / (16 x sdots) x 1000. The kernels compared:

* awqc: the decode GEMV's innermost loop (one quantization group of 8 output rows: unpack,
  sdot, then the group's scale and zero point), llvm's code for the target;
* llama.cpp `ggml_vec_dot_q4_0_q8_0`: its plain NEON dot product (two 32-weight blocks per
  iteration), what a Q4_0 file runs without repacking;
* llama.cpp `ggml_gemv_q4_0_4x4_q8_0`: the repacked kernel llama.cpp switches Q4_0 to on CPUs with
  dotprod (4 rows interleaved, one block per iteration), its fastest decode path there.

Both are compiled with the cross toolchain's gcc/g++ -O3 -mcpu=MCPU.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / ".cache/llama.cpp/src/vendor/llama.cpp"
GGML_INCLUDES = ["ggml/include", "ggml/src", "ggml/src/ggml-cpu"]
PRODUCTS_PER_SDOT = 16


def awqc_asm(k: int, n: int, group: int, mcpu: str) -> str:
    from awqc.schedules.layouts import DotLayout
    from awqc.schedules.w4a8_cpu import dot_scheduler

    layout = DotLayout(8)
    func = dot_scheduler(layout, "sdot")(layout.kernel(k, n, group, "float32", 1), group, 1)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu,
                                "mattr": ["+neon", "+dotprod"]})
    lib = tvm.compile(tvm.IRModule({"w4a8_gemv": func.with_attr("global_symbol", "w4a8_gemv")}), target)
    return lib.mod.inspect_source("asm")


def llama_asm(source: str, function: str, mcpu: str, work: Path) -> str:
    """Assembly of one function of a ggml source file, from the cross compiler."""
    if not (LLAMA / source).is_file():
        sys.exit(f"{LLAMA / source} is missing: run scripts/build_llama_cpp.sh first (it unpacks the source)")
    compiler = "aarch64-linux-gnu-g++" if source.endswith(".cpp") else "aarch64-linux-gnu-gcc"
    out = work / (Path(source).stem + ".s")
    subprocess.run([compiler, "-O3", f"-mcpu={mcpu}", "-S", "-o", str(out), "-DNDEBUG",
                    *[f"-I{LLAMA / d}" for d in GGML_INCLUDES], str(LLAMA / source)], check=True)
    text = out.read_text()
    start = re.search(rf"^{re.escape(function)}[^:\s]*:\s*$", text, re.M)
    if start is None:
        sys.exit(f"{function} not found in the assembly of {source}")
    end = text.find(".size", start.end())
    return text[start.start():end]


def innermost_sdot_loop(asm: str) -> list[str]:
    """The instructions of the shortest loop (a label and a branch back to it) that holds sdot."""
    lines = [line.split("//")[0].strip() for line in asm.splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.fullmatch(r"(\.L\w+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.match(r"(b(?:\.?[a-z]{2})?|cbn?z|tbn?z)\s+(?:.*,\s*)?(\.L\w+)$", line)  # b.ne (llvm), bgt (gcc)
        if m and m.group(2) in labels and labels[m.group(2)] < i:
            body = [x for x in lines[labels[m.group(2)] + 1:i + 1] if x and not x.startswith(".") and not x.endswith(":")]
            if any(x.startswith("sdot") for x in body):
                loops.append(body)
    if not loops:
        sys.exit("no loop with sdot found")
    return min(loops, key=len)


def mca(body: list[str], mcpu: str, iterations: int = 300) -> dict[str, float]:
    out = subprocess.run(["llvm-mca", "-mtriple=aarch64-linux-gnu", f"-mcpu={mcpu}", f"-iterations={iterations}"],
                         input="\n".join(body) + "\n", capture_output=True, text=True, check=True).stdout
    total = float(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    rthroughput = float(re.search(r"Block RThroughput:\s+([\d.]+)", out).group(1))
    return {"cycles_per_iter": total / iterations, "block_rthroughput": rthroughput}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcpu", default="cortex-a78")
    p.add_argument("--k", type=int, default=4096, help="awqc GEMV input size (default 4096)")
    p.add_argument("--n", type=int, default=4096, help="awqc GEMV output size (default 4096)")
    p.add_argument("--group", type=int, default=64, help="awqc quantization group (default 64, Q4_0's is 32)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        kernels = {
            f"awqc W4A8 GEMV, sdot, g{args.group} (d8)": awqc_asm(args.k, args.n, args.group, args.mcpu),
            "llama.cpp ggml_vec_dot_q4_0_q8_0": llama_asm("ggml/src/ggml-cpu/arch/arm/quants.c",
                                                          "ggml_vec_dot_q4_0_q8_0", args.mcpu, Path(tmp)),
            "llama.cpp ggml_gemv_q4_0_4x4_q8_0 (repacked)": llama_asm(
                "ggml/src/ggml-cpu/arch/arm/repack.cpp", "ggml_gemv_q4_0_4x4_q8_0", args.mcpu, Path(tmp)),
        }
        rows = []
        for name, asm in kernels.items():
            body = innermost_sdot_loop(asm)
            sdots = sum(x.startswith("sdot") for x in body)
            r = mca(body, args.mcpu)
            weights = PRODUCTS_PER_SDOT * sdots
            rows.append((name, len(body), sdots, weights, r["cycles_per_iter"], 1000 * r["cycles_per_iter"] / weights))
    print(f"llvm-mca -mcpu={args.mcpu}: static model of the innermost loop, not a measurement\n")
    print("| kernel | instructions / iter | sdot / iter | weights / iter | cycles / iter | cycles / 1000 weights |")
    print("|---|---|---|---|---|---|")
    for name, n_insn, sdots, weights, cyc, per in rows:
        print(f"| {name} | {n_insn} | {sdots} | {weights} | {cyc:.1f} | **{per:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
