"""Compile and run at real model sizes: peak RSS and wall time of `awqc compile`, artifact size,
load time and RSS of `awqc run`, decode tok/s, on random-weight checkpoints (bench/synthetic.py).

    python bench/scale.py --shapes llama32-1b llama2-7b --quant rtn-w4g128 --workdir /tmp/awqc-scale

Each command runs in its own process under /usr/bin/time -v (peak RSS is the process's
maximum resident set). Prints a markdown table. Quality cannot be judged on random weights;
memory, time and speed can. AWQ rows take --calib-samples (default 16) so they finish; the
calibration forward scales linearly with it.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stderr) of a command run under /usr/bin/time -v."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return wall, rss_kb / (1 << 20), res.stderr


def size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1 << 30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama32-1b"])
    p.add_argument("--quant", nargs="+", default=["rtn-w4g128"], help="e.g. rtn-w4g128 awq-w4g128")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/awqc-scale"))
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and artifacts")
    args = p.parse_args()
    awqc = [sys.executable, "-m", "awqc.compiler.cli"]
    rows, notes = [], []
    for shape in args.shapes:
        ckpt = args.workdir / shape
        if not (ckpt / "config.json").is_file():
            subprocess.run([sys.executable, str(HERE / "synthetic.py"), "--shape", shape, "-o", str(ckpt)], check=True)
        for quant in args.quant:
            art = args.workdir / f"{shape}-{quant}"
            shutil.rmtree(art, ignore_errors=True)
            extra = ["--calib-samples", str(args.calib_samples)] if quant.startswith("awq") else []
            wall, rss, compile_err = timed([*awqc, "compile", "--model", str(ckpt), "--quant", quant,
                                            "--quantize-head", "-o", str(art), *extra])
            notes += [f"{shape} {quant}: {line}" for line in compile_err.splitlines() if line.startswith("awq:")]
            run_wall, run_rss, err = timed([*awqc, "run", str(art), "--prompt", "The compiler", "--max-new-tokens",
                                            "32", "--verify"])
            tok_s = float(re.search(r"([\d.]+) tok/s", err).group(1))
            rows.append((shape, quant + (f" (calib {args.calib_samples})" if extra else ""), f"{size_gib(ckpt):.1f}",
                         f"{wall:.0f}", f"{rss:.2f}", f"{size_gib(art):.2f}", f"{run_wall:.1f}", f"{run_rss:.2f}",
                         f"{tok_s:.1f}"))
            if not args.keep:
                shutil.rmtree(art, ignore_errors=True)
    head = ("shape", "quant", "checkpoint GiB", "compile s", "compile peak RSS GiB", "artifact GiB",
            "run s (load + 32 tok, --verify)", "run peak RSS GiB", "decode tok/s")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for n in notes:  # where AWQ's time went, with the per-sample figure that projects --calib-samples 128
        print(f"\n{n}")


if __name__ == "__main__":
    main()
