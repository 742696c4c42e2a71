"""Static throughput of the int4 x int8 inner loops on an ARM core model: awqc's W4A8 decode GEMV
and prefill GEMM on sdot (schedules/w4a8_cpu.py, target arm-neon-dotprod) against llama.cpp's
Q4_0 x Q8_0 kernels, cross-compiled from the source vendored in llama-cpp-python
(scripts/build_llama_cpp.sh fetches it) for the same CPU, all measured by `llvm-mca`.

    python bench/arm_mca.py                      # Cortex-A78 (Jetson Orin, Snapdragon 888's big cores)
    python bench/arm_mca.py --k 4096 --n 11008 --group 128

This is a static model of one core's pipeline on the loop body in steady state (no caches, no
memory bandwidth, no branch mispredictions), not a measurement; Debian's LLVM 14 models the A78,
X1, A710 and Neoverse N1/N2 with one scheduling model, so it says nothing about which of them is
faster. Each loop's work is counted by its dot instructions (sdot: 16 int8 products, smmla: 32),
so cycles per 1,000 products = cycles per iteration / products per iteration x 1000. Kernels:

* awqc: the innermost loop of the GEMV (one quantization group of 8 output rows: unpack, sdot,
  the group's scale and zero point) and of the GEMM (the same for 4 activation rows);
* llama.cpp `ggml_vec_dot_q4_0_q8_0`: its plain NEON dot product, what a Q4_0 file runs without
  repacking;
* llama.cpp `ggml_gemv_q4_0_4x4_q8_0` / `ggml_gemm_q4_0_4x4_q8_0`: the repacked kernels llama.cpp
  switches Q4_0 to on CPUs with dotprod, and `ggml_gemm_q4_0_4x8_q8_0` its i8mm (smmla) GEMM.

llama.cpp is compiled with the cross toolchain's gcc/g++ -O3 -mcpu=MCPU+dotprod+i8mm; its inline
assembly writes the dot instructions as `.inst` words, read here from their comments.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / ".cache/llama.cpp/src/vendor/llama.cpp"
GGML_INCLUDES = ["ggml/include", "ggml/src", "ggml/src/ggml-cpu"]
PRODUCTS = {"sdot": 16, "smmla": 32}  # int8 multiply-adds per instruction


def awqc_asm(k: int, n: int, group: int, rows: int | None, mcpu: str) -> str:
    """LLVM's assembly of awqc's W4A8 sdot kernel (rows 1: the GEMV; None: the GEMM) for the core."""
    from awqc.schedules.layouts import DotLayout
    from awqc.schedules.w4a8_cpu import dot_scheduler

    layout = DotLayout(8)
    func = dot_scheduler(layout, "sdot")(layout.kernel(k, n, group, "float32", rows), group, rows)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu,
                                "mattr": ["+neon", "+dotprod"]})
    lib = tvm.compile(tvm.IRModule({"w4a8": func.with_attr("global_symbol", "w4a8")}), target)
    return lib.mod.inspect_source("asm")


def llama_asm(source: str, function: str, mcpu: str, work: Path) -> str:
    """Assembly of one function of a ggml source file, from the cross compiler."""
    if not (LLAMA / source).is_file():
        sys.exit(f"{LLAMA / source} is missing: run scripts/build_llama_cpp.sh first (it unpacks the source)")
    compiler = "aarch64-linux-gnu-g++" if source.endswith(".cpp") else "aarch64-linux-gnu-gcc"
    out = work / (Path(source).stem + ".s")
    subprocess.run([compiler, "-O3", f"-mcpu={mcpu}+dotprod+i8mm", "-S", "-o", str(out), "-DNDEBUG",
                    *[f"-I{LLAMA / d}" for d in GGML_INCLUDES], str(LLAMA / source)], check=True)
    text = out.read_text()
    start = re.search(rf"^{re.escape(function)}[^:\s]*:\s*$", text, re.M)
    if start is None:
        sys.exit(f"{function} not found in the assembly of {source}")
    end = text.find(".size", start.end())
    return text[start.start():end]


def _instructions(asm: str) -> list[str]:
    """Lines without comments; llama.cpp's inline assembly writes sdot/smmla as `.inst 0x...` with
    the instruction in the comment, which is what llvm-mca needs."""
    out = []
    for line in asm.splitlines():
        code, _, comment = line.strip().partition("//")
        code = code.strip()
        label = re.match(r"(\d+):(.*)", code)  # inline asm: "2:" runs into the next instruction
        if label:
            out.append(label.group(1) + ":")
            code = label.group(2).strip()
        out.append(comment.strip() if code.startswith(".inst") else code)
    return out


def innermost_loop(asm: str, mnemonic: str) -> list[str]:
    """The instructions of the shortest loop (a label and a branch back to it: `.L5` from the
    compilers, `2:` ... `2b` in inline assembly) that holds `mnemonic`."""
    lines = _instructions(asm)
    loops = []
    for i, line in enumerate(lines):
        m = re.match(r"(b(?:\.?[a-z]{2})?|cbn?z|tbn?z)\s+(?:.*,\s*)?(\.L\w+|\d+b)$", line)  # b.ne (llvm), bgt (gcc)
        if m is None:
            continue
        label = m.group(2)[:-1] + ":" if m.group(2).endswith("b") else m.group(2) + ":"
        start = max((j for j in range(i) if lines[j] == label), default=None)
        if start is None:
            continue
        body = [x for x in lines[start + 1:i + 1] if x and not x.startswith(".") and not re.fullmatch(r"[\w.]+:", x)]
        if any(x.startswith(mnemonic) for x in body):
            loops.append(body)
    if not loops:
        sys.exit(f"no loop with {mnemonic} found")
    return min(loops, key=len)


def cycles_per_iteration(body: list[str], mcpu: str, iterations: int = 300) -> float:
    """llvm-mca's total cycles for `iterations` runs of the loop body, per run."""
    out = subprocess.run(["llvm-mca", "-mtriple=aarch64-linux-gnu", f"-mcpu={mcpu}", "-mattr=+dotprod,+i8mm",
                          f"-iterations={iterations}"],
                         input="\n".join(body) + "\n", capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / iterations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcpu", default="cortex-a78", help="core model (default cortex-a78; i8mm is enabled on it "
                                                          "for the GEMM table)")
    p.add_argument("--k", type=int, default=4096, help="awqc GEMV input size (default 4096)")
    p.add_argument("--n", type=int, default=4096, help="awqc GEMV output size (default 4096)")
    p.add_argument("--group", type=int, default=64, help="awqc quantization group (default 64, Q4_0's is 32)")
    args = p.parse_args(argv)
    missing = [t for t in ("llvm-mca", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++") if shutil.which(t) is None]
    if missing:
        p.error(f"{', '.join(missing)} not found: install Debian's llvm (llvm-mca) and the aarch64 cross compilers "
                "(scripts/setup.sh installs those)")

    quants, repack = "ggml/src/ggml-cpu/arch/arm/quants.c", "ggml/src/ggml-cpu/arch/arm/repack.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gemv = [(f"awqc W4A8 GEMV, sdot, g{args.group} (d8)", awqc_asm(args.k, args.n, args.group, 1, args.mcpu), "sdot"),
                ("llama.cpp ggml_vec_dot_q4_0_q8_0", llama_asm(quants, "ggml_vec_dot_q4_0_q8_0", args.mcpu, work), "sdot"),
                ("llama.cpp ggml_gemv_q4_0_4x4_q8_0 (repacked)",
                 llama_asm(repack, "ggml_gemv_q4_0_4x4_q8_0", args.mcpu, work), "sdot")]
        gemm = [(f"awqc W4A8 GEMM, sdot, g{args.group} (d8)",
                 awqc_asm(args.k, args.n, args.group, None, args.mcpu), "sdot"),
                ("llama.cpp ggml_gemm_q4_0_4x4_q8_0 (repacked, dotprod)",
                 llama_asm(repack, "ggml_gemm_q4_0_4x4_q8_0", args.mcpu, work), "sdot"),
                ("llama.cpp ggml_gemm_q4_0_4x8_q8_0 (repacked, i8mm)",
                 llama_asm(repack, "ggml_gemm_q4_0_4x8_q8_0", args.mcpu, work), "smmla")]
        for title, kernels in (("decode GEMV", gemv), ("prefill GEMM", gemm)):
            print(f"\n{title}, llvm-mca -mcpu={args.mcpu} -mattr=+dotprod,+i8mm: static model of the innermost "
                  "loop, not a measurement\n")
            print("| kernel | instructions / iter | dot instructions / iter | weight x activation products / iter "
                  "| cycles / iter | cycles / 1000 products |")
            print("|---|---|---|---|---|---|")
            for name, asm, mnemonic in kernels:
                body = innermost_loop(asm, mnemonic)
                dots = sum(x.startswith(mnemonic) for x in body)
                products = PRODUCTS[mnemonic] * dots
                cycles = cycles_per_iteration(body, args.mcpu)
                print(f"| {name} | {len(body)} | {dots} {mnemonic} | {products} | {cycles:.1f} | "
                      f"**{1000 * cycles / products:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
