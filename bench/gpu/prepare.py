"""Prepare the GPU check's payload here (no GPU needed): everything bench/gpu/run.sh needs on a bare
GPU machine that has Python 3.12, torch, numpy, tokenizers and nvcc but no TVM and no PyPI.

    python bench/gpu/prepare.py -o .cache/gpu-payload            # for the H200 (cuda-sm90), ~15 min
    python bench/gpu/prepare.py --dry-run -o .cache/gpu-dry      # the same check on this CPU, ~3 min
    bench/gpu/run.sh .cache/gpu-dry                              # rehearse it here

The payload (well under the 64 MiB a device call carries):

    bundle/            `awqc bundle` of a tiny int4 model for the target: TVM's runtime only, awqc's
                       runtime, tvm-ffi for the device's Python (cp312), the tiny artifact
    tiny.npz           that model's logits from the float32 host build of the same int4 weights
    kernels/lib.so     the int4 GEMV and GEMMs (SIMT and tensor-core) as compiled for the target,
                       standalone: the timing shapes and odd correctness shapes, group 64 and 128
    kernels/check.npz  inputs and numpy references for the correctness shapes
    kernels/ptxas.json ptxas's registers, shared memory and spills per kernel
    llama7b-w4/, llama7b-f16/
                       Llama-2-7B-shaped artifacts (int4 g128 and float16) without their weights:
                       weights_header.json is the weights file's header; the device writes random
                       weights of exactly that layout and records their hash in the manifest
    payload.json       what is where, the target, the shapes

--dry-run builds the same payload for this CPU: the CUDA kernels in emulation (their TIR with thread
loops serial, the device helpers compiled for the host), smaller shapes, a tiny model instead of the
7B one, the bundle for this Python, so run.sh's every step runs here before device minutes are spent.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO / "bench"))

import synthetic  # noqa: E402  (bench/synthetic.py: random checkpoints of real shapes)

TARGET = "cuda-sm90"
GROUP = 128  # the timed kernels' group (AWQ's default)
# (k, n): in -> out features. Llama-2-7B's q/k/v/o, gate/up, down, and a 32,000-token head
TIMING_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)]
GEMM_ROWS = [512, 2048]
DRY_TIMING_SHAPES = [(256, 256), (256, 768), (768, 256), (256, 2000)]
DRY_GEMM_ROWS = [16, 48]
# (k, n, group) and the rows each kernel is checked at: n not a multiple of the block tile, k of one group
CHECK_SHAPES = [(576, 960, 64), (256, 7, 128), (1536, 130, 64), (384, 200, 128), (128, 130, 128)]
CHECK_GEMM_ROWS = [1, 7, 33, 130]
CONTEXT = 1024


def kernel_funcs(shapes: list[tuple[int, int, int]], emulate: bool) -> dict[str, object]:
    """name -> PrimFunc: for each (k, n, group) the GEMV, the SIMT GEMM and the tensor-core GEMM
    with the target's knobs (schedules/records/cuda-sm90.json)."""
    from awqc.compiler.cuda_package import gpu_arch
    from awqc.compiler.targets import get_target
    from awqc.schedules.cuda import knobs_for, w4_gemm_f16, w4_gemv_f16

    knobs = knobs_for(TARGET, gpu_arch(get_target(TARGET)))
    funcs = {}
    for k, n, g in shapes:
        tag = f"{k}x{n}_g{g}"
        funcs[f"gemv_{tag}"] = w4_gemv_f16(k, n, g, knobs.gemv_rows, emulate=emulate)
        funcs[f"gemm_{tag}"] = w4_gemm_f16(k, n, g, dataclasses.replace(knobs, gemm_mma=False), emulate=emulate)
        funcs[f"mma_{tag}"] = w4_gemm_f16(k, n, g, dataclasses.replace(knobs, gemm_mma=True), emulate=emulate)
    return {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}


def build_kernels(out: Path, shapes: list[tuple[int, int, int]], dry: bool) -> None:
    """out/lib.so: the kernels, as nvcc fatbin for the target, or (dry) emulated for this CPU."""
    import tvm

    from awqc.compiler.cuda_package import export_cuda_library, source_codegen
    from awqc.compiler.targets import get_target
    from awqc.schedules.cuda import host_helper_source

    mod = tvm.IRModule(kernel_funcs(shapes, emulate=dry))
    out.mkdir(parents=True)
    if not dry:
        spec = get_target(TARGET)
        with source_codegen():
            ex = tvm.compile(mod, spec.target())
        usage = export_cuda_library(ex, out / "lib.so", spec)["ptxas"]  # registers, spills per kernel
        (out / "ptxas.json").write_text(json.dumps(usage, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "helpers.cc").write_text(host_helper_source())
        subprocess.run(["g++", "-O2", "-fPIC", "-c", f"{tmp}/helpers.cc", "-o", f"{tmp}/helpers.o"], check=True)
        ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        ex.export_library(str(out / "lib.so"), addons=[f"{tmp}/helpers.o"])


def check_data(out: Path) -> list[dict]:
    """out/check.npz: packed int4 weights, fp16 inputs and float64 numpy references per check."""
    from awqc.schedules.layouts import K8

    rng = np.random.default_rng(0)
    arrays, checks = {}, []
    for k, n, g in CHECK_SHAPES:
        q = rng.integers(0, 16, (n, k), dtype=np.uint8)
        s = (rng.random((n, k // g)) * 0.02 + 0.002).astype(np.float16)
        z = rng.integers(0, 16, (n, k // g)).astype(np.float16)
        w = (q - np.repeat(z.astype(np.float64), g, 1)) * np.repeat(s.astype(np.float64), g, 1)
        tag = f"{k}x{n}_g{g}"
        for i, packed in enumerate(K8.pack(q, s, z)):
            arrays[f"{tag}/w{i}"] = packed
        for m in CHECK_GEMM_ROWS:
            x = rng.standard_normal((m, k)).astype(np.float16)
            arrays[f"{tag}/x{m}"], arrays[f"{tag}/ref{m}"] = x, x.astype(np.float64) @ w.T
            for kind in (["gemv"] if m == 1 else []) + ["gemm", "mma"]:
                checks.append({"kernel": f"{kind}_{tag}", "weights": tag, "rows": m})
    np.savez_compressed(out / "check.npz", **arrays)
    return checks


def timing_args(shapes: list[tuple[int, int]]) -> dict[str, list]:
    """k x n -> [[shape, dtype] of qweight, scales, zeros]: what the device fills with random bits."""
    from awqc.schedules.layouts import K8

    k, n, g = CHECK_SHAPES[0]
    dtypes = [str(a.dtype) for a in K8.pack(np.zeros((n, k), np.uint8), np.ones((n, k // g), np.float16),
                                          np.zeros((n, k // g), np.float16))]
    return {f"{k}x{n}": [[list(s), d] for s, d in zip(K8.shapes(n, k, GROUP), dtypes)] for k, n in shapes}


def tiny_model(root: Path, dry: bool) -> Path:
    """A tiny random Llama quantized once (RTN g64), built for the target (float16; dry: the host)
    and for the host in float32; tiny.npz holds the host build's logits over a prompt and greedy
    decode steps. Returns the target's artifact."""
    from awqc.compiler.awq import quantize_model
    from awqc.compiler.build import write_artifact
    from awqc.compiler.model_import import load_model
    from awqc.compiler.targets import get_target
    from awqc.passes.quantizer import QuantScheme
    from awqc.runtime.engine import Engine

    model = load_model(str(synthetic.write("tiny", root / "tiny-ckpt", seed=1)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=64), quantize_head=False)
    host = write_artifact(root / "tiny-host", model, get_target("host"), "float32", 256, quant=quant, method="rtn")
    art = host if dry else write_artifact(root / "tiny-cuda", model, get_target(TARGET), "float16", 256,
                                          quant=quant, method="rtn")
    engine = Engine(host)
    prompt = [1, 450, 3681, 310, 278, 29871, 17, 99, 250, 3, 4242, 901]
    logits = [engine.prefill(prompt)]
    for _ in range(8):
        logits.append(engine.decode(int(logits[-1].argmax())))
    np.savez(root / "tiny.npz", prompt=np.array(prompt), logits=np.stack(logits))
    return art


def big_model(root: Path, name: str, shape: str, quant: str | None, dry: bool) -> dict:
    """An artifact of `shape` compiled as users do (`awqc compile`, its time and peak RSS recorded),
    then its weights file replaced by its header, kept byte for byte (weights_header.json): the
    device regenerates random weights of that layout."""
    ckpt = root / f"{shape}-ckpt"
    if not ckpt.is_dir():  # written beside and renamed, so an interrupted write is not reused
        partial = root / f"{shape}-ckpt.partial"
        shutil.rmtree(partial, ignore_errors=True)
        synthetic.write(shape, partial).rename(ckpt)
    art = root / name
    cmd = [sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", str(ckpt), "--target",
           "host" if dry else TARGET, "--dtype", "float32" if dry else "float16", "--context-window", str(CONTEXT),
           "-o", str(art), *(["--quant", quant] if quant else [])]
    start = time.perf_counter()
    _, status, usage = os.wait4(subprocess.Popen(cmd).pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), cmd)
    compile_s = time.perf_counter() - start
    weights = art / "weights.safetensors"
    with open(weights, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = f.read(size)
    (art / "weights_header.json").write_bytes(header)
    weights.unlink()
    return {"dir": name, "shape": shape, "quant": quant or "float", "weights_bytes": weights_size(json.loads(header)),
            "compile_s": round(compile_s, 1), "compile_peak_rss_mib": round(usage.ru_maxrss / 1024)}


def weights_size(header: dict) -> int:
    return max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


def ffi_wheel(cache: Path) -> Path:
    """The tvm-ffi wheel for the device's Python 3.12, downloaded once into `cache`."""
    from importlib.metadata import version

    want = version("apache-tvm-ffi")
    found = sorted(cache.glob(f"apache_tvm_ffi-{want}-cp312-*x86_64.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform",
                        "manylinux_2_28_x86_64", "-d", str(cache), f"apache-tvm-ffi=={want}"], check=True)
        found = sorted(cache.glob(f"apache_tvm_ffi-{want}-cp312-*x86_64.whl"))
    return found[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="payload directory to write (an earlier payload there is replaced)")
    p.add_argument("--dry-run", action="store_true", help="a payload for this CPU, to rehearse run.sh here")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "gpu-work",
                   help="checkpoints and full artifacts (kept: ~20 GB for the 7B shapes)")
    args = p.parse_args()
    dry, final = args.dry_run, args.output
    if final.exists() and not (final / "payload.json").is_file():
        p.error(f"{final} exists and is not a GPU payload (no payload.json); choose another -o")
    out = final.parent / f".{final.name}.partial"  # renamed into place at the end: a failure leaves no payload
    work = args.work / ("dry" if dry else "device")
    for stale in (out, work / "tiny-host", work / "tiny-cuda"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True)
    try:
        write_payload(out, work, dry)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    mib = sum(f.stat().st_size for f in final.rglob("*") if f.is_file()) / 2**20
    print(f"{final}: {mib:.1f} MiB")
    return 0


def write_payload(out: Path, work: Path, dry: bool) -> None:
    from awqc.compiler.bundle import make_bundle

    timing = DRY_TIMING_SHAPES if dry else TIMING_SHAPES
    build_kernels(out / "kernels", [*[(k, n, GROUP) for k, n in timing], *CHECK_SHAPES], dry)
    checks = check_data(out / "kernels")
    tiny = tiny_model(work, dry)
    shutil.move(str(work / "tiny.npz"), out / "tiny.npz")
    make_bundle(tiny, out / "bundle", tvm_ffi_wheel=None if dry else ffi_wheel(REPO / ".cache" / "wheels"))
    shape = "tiny" if dry else "llama2-7b"
    models = []
    for name, quant in (("llama7b-w4", "rtn-w4g128"), ("llama7b-f16", None)):
        shutil.rmtree(work / name, ignore_errors=True)
        models.append(big_model(work, name, shape, quant, dry))
        print(f"{name}: compiled in {models[-1]['compile_s']} s, peak RSS {models[-1]['compile_peak_rss_mib']} MiB")
        shutil.copytree(work / name, out / name)
    cfg = synthetic.config(shape)
    payload = {
        "format": "awqc-gpu-payload/1", "device": "cpu" if dry else "cuda", "target": "host" if dry else TARGET,
        "dtype": "float32" if dry else "float16", "group": GROUP,
        "timing_shapes": timing, "timing_args": timing_args(timing), "gemm_rows": DRY_GEMM_ROWS if dry else GEMM_ROWS,
        # weight copies cycled while timing: 5x the H200's 50 MB L2 (dry: emulated kernels are slow)
        "rotate_bytes": (1 if dry else 256) << 20, "min_seconds": 0.01 if dry else 0.2,
        "checks": checks, "models": models, "model_config": cfg, "context_window": CONTEXT,
    }
    (out / "payload.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main())
