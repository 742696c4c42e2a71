"""ARM NEON, proven by running: aarch64 builds run under qemu-aarch64 with the C++ runner
(runtime/cpp/awqc_runner.cc) on the aarch64 TVM runtime of the apache-tvm wheel, and match the x86
engine and numpy. qemu checks correctness only; nothing here is timed.

Needs the aarch64 cross toolchain, qemu-user and .cache/aarch64/ from scripts/setup.sh; without
them the tests fail (not skip), naming that script.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tvm

from awqc.compiler.build import write_artifact
from awqc.compiler.bundle import make_bundle
from awqc.compiler.awq import quantize_model
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.cpp.build import RunnerBuildError, build_runner
from awqc.runtime.engine import Engine
from awqc.schedules.layouts import K8, InterleavedLayout
from awqc.schedules.w4_cpu import cpu_scheduler

from conftest import make_checkpoint, rel_err

SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's aarch64 libc, for qemu's dynamic loader
QEMU = ["qemu-aarch64", "-L", str(SYSROOT)]
TOOLS = ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "qemu-aarch64")
EM_AARCH64 = 183  # ELF e_machine
# The decode GEMV's inner loop on the interleaved layout (schedules/layouts.py): a constant mask
# (or, for nibble 7, a shift by an immediate), int->float and the fused multiply-add on v
# registers; no variable shift (ushl) as layout k8 needed.
NEON_GEMV_LOOP = {"and", "ushr", "ucvtf", "fmla"}
# The prefill GEMM dequantizes a block of weight rows (shift, mask, convert, - zero, * scale)
# and runs a float micro-kernel (fmla) over it.
NEON_DEQUANT = {"ushr", "and", "ucvtf", "fsub", "fmul"}


# ------------------------------------------------------------------------------- helpers
def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not (SYSROOT / "lib").is_dir():
        missing.append(f"{SYSROOT}/lib (libc6-arm64-cross)")
    if missing:
        pytest.fail(f"ARM NEON tests need {', '.join(missing)}; run scripts/setup.sh")


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def qemu(runner: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*QEMU, str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)


def qemu_ok(runner: Path, *args: str | Path) -> str:
    proc = qemu(runner, *args)
    assert proc.returncode == 0, f"awqc_runner failed under qemu ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def ids_arg(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def disassemble(lib: Path) -> dict[str, list[tuple[int, str, str]]]:
    """aarch64 objdump of a library: function name -> [(address, mnemonic, operands)]."""
    out = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(lib)],
                         capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    current: list[tuple[int, str, str]] = []
    for line in out.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            current = funcs.setdefault(m.group(1), [])
        elif m := re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line):
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def innermost_loop(insns: list[tuple[int, str, str]], mnemonic: str) -> list[tuple[int, str, str]] | None:
    """The shortest loop (a backward branch and its target) whose body holds `mnemonic` on vector
    registers; None if there is none."""
    loops = []
    for addr, op, operands in insns:
        target = re.search(r"\b([0-9a-f]+) <", operands)  # objdump: "b.ne 1f3c <fn+0x5c>"
        if not re.fullmatch(r"b(\.\w+)?|cbn?z|tbn?z", op) or target is None:
            continue
        start = int(target.group(1), 16)
        body = [i for i in insns if start <= i[0] <= addr]
        if start < addr and vector_mnemonics(body)[mnemonic]:
            loops.append(body)
    return min(loops, key=len, default=None)


def vector_mnemonics(insns: list[tuple[int, str, str]]) -> Counter:
    """Mnemonics of instructions on NEON vector registers (v0.4s, v1.16b, ...)."""
    return Counter(mn for _, mn, ops in insns if re.search(r"\bv\d+\.\d*[bhsd]\b", ops))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools()
    try:
        exe = build_runner(tmp_path_factory.mktemp("runner"))
    except RunnerBuildError as err:
        pytest.fail(str(err))
    assert elf_machine(exe) == EM_AARCH64
    return exe


@pytest.fixture(scope="module")
def arm_and_host(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same RTN int4 weights compiled for arm-neon (cross) and for this x86 host."""
    require_tools()
    root = tmp_path_factory.mktemp("arm")
    model = load_model(str(make_checkpoint(root / "ckpt", seed=5, intermediate_size=128)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), False)
    arm = write_artifact(root / "arm", model, get_target("arm-neon"), "float32", 128, quant=quant, method="rtn")
    host = write_artifact(root / "host", model, get_target("host"), "float32", 128, quant=quant, method="rtn")
    return arm, host


# ----------------------------------------------------------------------- (a) whole model
def test_arm_artifact_is_aarch64(arm_and_host: tuple[Path, Path]) -> None:
    assert elf_machine(arm_and_host[0] / "lib.so") == EM_AARCH64


def test_int4_model_under_qemu_matches_x86(runner: Path, arm_and_host: tuple[Path, Path], tmp_path: Path) -> None:
    arm, host = arm_and_host
    prompt = [int(t) for t in np.random.RandomState(7).randint(3, 300, size=13)]
    feed, n_greedy = [42, 7, 250], 5

    logits_bin = tmp_path / "logits.bin"
    out = qemu_ok(runner, arm, "--prompt", ids_arg(prompt), "--feed", ids_arg(feed),
                  "--greedy", str(n_greedy), "--logits", logits_bin)
    arm_next = [int(t) for t in re.search(r"^next:(.*)$", out, re.M).group(1).split()]

    engine = Engine(host)  # prefill, teacher-forced decodes, then greedy decodes
    ref = [engine.prefill(prompt)] + [engine.decode(t) for t in feed]
    for _ in range(n_greedy):
        ref.append(engine.decode(int(ref[-1].argmax())))
    ref_logits = np.stack(ref)

    arm_logits = np.fromfile(logits_bin, np.float32).reshape(ref_logits.shape)
    assert rel_err(arm_logits, ref_logits) < 1e-4
    assert arm_next == [int(x.argmax()) for x in ref_logits]


def test_aarch64_bundle_runs_under_qemu(arm_and_host: tuple[Path, Path], tmp_path: Path) -> None:
    """`awqc bundle` of an arm-neon artifact: the C++ runner and the aarch64 TVM runtime beside the
    artifact, no Python entry without a tvm-ffi wheel for the device; it gives the x86 engine's tokens."""
    arm, host = arm_and_host
    bundle = tmp_path / "bundle"
    record = make_bundle(arm, bundle)
    assert record["python"] is None and not (bundle / "python").exists()
    assert elf_machine(bundle / "bin" / "lib" / "libtvm_runtime.so") == EM_AARCH64
    prompt = [9, 31, 77, 200]
    out = qemu_ok(bundle / "bin" / "awqc_runner", bundle / "artifact", "--prompt", ids_arg(prompt), "--greedy", "4")
    got = [int(t) for t in re.search(r"^next:(.*)$", out, re.M).group(1).split()]
    engine = Engine(host)
    want = [int(engine.prefill(prompt).argmax())]
    for _ in range(4):
        want.append(int(engine.decode(want[-1]).argmax()))
    assert got == want


def test_runner_refuses_host_artifact(runner: Path, arm_and_host: tuple[Path, Path]) -> None:
    proc = qemu(runner, arm_and_host[1], "--prompt", "1,2")
    assert proc.returncode == 1
    assert "built for x86_64 but this runner is for aarch64" in proc.stderr


def test_runner_usage_errors(runner: Path, arm_and_host: tuple[Path, Path]) -> None:
    proc = qemu(runner)
    assert proc.returncode == 2 and "usage: awqc_runner ARTIFACT_DIR" in proc.stderr
    proc = qemu(runner, arm_and_host[0], "--prompt", "1,x")
    assert proc.returncode == 2 and "comma-separated token ids" in proc.stderr
    proc = qemu(runner, arm_and_host[0], "--prompt", "1,320")
    assert proc.returncode == 1 and "token id 320 is outside the vocabulary" in proc.stderr


# ------------------------------------------------------------------------- (b) kernels
def kernel_data(rows: int, k: int, n: int, group: int, dtype: str, layout, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Kernel arguments (x, qweight, scales, zeros, y=0) and the float64 numpy reference of y."""
    rs = np.random.RandomState(seed)
    q = rs.randint(0, 16, size=(n, k)).astype(np.uint8)
    scales = (rs.rand(n, k // group) * 0.02 + 0.005).astype(np.float16).astype(dtype)
    zeros = rs.randint(0, 16, size=(n, k // group)).astype(dtype)
    x = rs.randn(rows, k).astype(dtype)
    w = (q - np.repeat(zeros.astype(np.float64), group, 1)) * np.repeat(scales.astype(np.float64), group, 1)
    return [x, *layout.pack(q, scales, zeros), np.zeros((rows, n), dtype)], x.astype(np.float64) @ w.T


def cross_build_kernel(k: int, n: int, group: int, dtype: str, rows: int | None, out: Path, layout) -> Path:
    """The scheduled int4 kernel alone, as an aarch64 library exporting `name`."""
    spec = get_target("arm-neon")
    func = cpu_scheduler(layout)(layout.kernel(k, n, group, dtype, rows), group, rows)
    func = func.with_attr("global_symbol", "w4_kernel")
    tvm.compile(tvm.IRModule({"w4_kernel": func}), spec.target()).export_library(str(out), fcompile=spec.fcompile())
    return out


@pytest.mark.parametrize("layout, rows, m, k, n, group, dtype", [
    (InterleavedLayout(4, 4), 1, 1, 512, 96, 64, "float32"),     # decode GEMV (the NEON default layout)
    (InterleavedLayout(8, 2), 1, 1, 256, 64, 32, "float16"),     # decode GEMV, fp16 activations
    (InterleavedLayout(4, 4), None, 5, 256, 80, 32, "float32"),  # prefill GEMM, dynamic rows
    (InterleavedLayout(4, 4), None, 3, 128, 64, 128, "float16"),  # prefill GEMM, one group per row
    (K8, 1, 1, 512, 96, 64, "float32"),                          # layout k8 (fallback): GEMV
    (K8, None, 5, 256, 80, 32, "float32"),                       # and GEMM
], ids=lambda v: getattr(v, "name", None))
def test_int4_kernel_under_qemu_matches_numpy(runner: Path, tmp_path: Path, layout, rows: int | None, m: int,
                                              k: int, n: int, group: int, dtype: str) -> None:
    from safetensors.numpy import save_file

    lib = cross_build_kernel(k, n, group, dtype, rows, tmp_path / "kernel.so", layout)
    assert elf_machine(lib) == EM_AARCH64
    args, ref = kernel_data(m, k, n, group, dtype, layout)
    save_file({f"arg{i}": a for i, a in enumerate(args)}, str(tmp_path / "args.safetensors"))
    qemu_ok(runner, "--kernel", lib, "w4_kernel", tmp_path / "args.safetensors", tmp_path / "y.bin")
    y = np.fromfile(tmp_path / "y.bin", dtype).reshape(m, n).astype(np.float64)
    assert rel_err(y, ref) < (2e-3 if dtype == "float16" else 1e-5)


# ------------------------------------------------------------------ (c) NEON instructions
@pytest.mark.parametrize("kind", ["w4_gemv", "w4_gemm"])
def test_int4_inner_loop_is_neon(arm_and_host: tuple[Path, Path], kind: str) -> None:
    """The int4 kernels of the shipped library (decode GEMV, prefill GEMM) run their K loop on
    NEON vectors. A kernel's body is in `<name>_compute_` when its rows run in parallel."""
    manifest = json.loads((arm_and_host[0] / "manifest.json").read_text())
    assert manifest["quantization"]["layout"] == "i4r4"  # tuning.default_layout for NEON
    funcs = disassemble(arm_and_host[0] / "lib.so")
    ours = {name: insns for name, insns in funcs.items() if kind in name}
    assert ours, f"no {kind} function in lib.so"
    kernels = {re.sub(r"^__tvm_ffi_|_compute_$", "", name) for name in ours}
    for kernel in kernels:
        insns = [i for name, body in ours.items() if kernel in name for i in body]
        loop = innermost_loop(insns, "fmla")
        assert loop is not None, f"{kernel}: no loop with a vector fmla; is the NEON schedule (schedules/w4_cpu.py) applied?"
        found = vector_mnemonics(loop)
        if kind == "w4_gemv":
            assert NEON_GEMV_LOOP <= set(found) and "ushl" not in found, f"{kernel}: inner loop has {dict(found)}"
        else:
            dequant = innermost_loop(insns, "ucvtf")
            assert dequant is not None and NEON_DEQUANT <= set(vector_mnemonics(dequant)), \
                f"{kernel}: no vectorized dequantization loop"


# ------------------------------------------------------------------ (d) W4A8 on sdot
@pytest.mark.parametrize("rows, m, k, n, group", [(1, 1, 576, 64, 64), (None, 5, 256, 96, 32)],
                         ids=["gemv", "gemm"])
def test_w4a8_sdot_kernel_under_qemu_matches_numpy(runner: Path, tmp_path: Path, rows: int | None, m: int, k: int,
                                                   n: int, group: int) -> None:
    """The W4A8 kernels for arm-neon-dotprod (sdot) against numpy with the same int8 rounding of
    the activations (per row and group, scale max|x| / 127)."""
    from safetensors.numpy import save_file

    from awqc.schedules.layouts import DotLayout
    from awqc.schedules.w4a8_cpu import dot_scheduler

    from test_w4a8 import fake_quant_activations, random_quantized

    layout, spec = DotLayout(8), get_target("arm-neon-dotprod")
    func = dot_scheduler(layout, "sdot")(layout.kernel(k, n, group, "float32", rows), group, rows)
    lib = tmp_path / "kernel.so"
    tvm.compile(tvm.IRModule({"w4_kernel": func.with_attr("global_symbol", "w4_kernel")}),
                spec.target()).export_library(str(lib), fcompile=spec.fcompile())
    assert "sdot" in {mn for insns in disassemble(lib).values() for _, mn, _ in insns}
    q, s, z, w = random_quantized(n, k, group)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    args = [x, *layout.pack(q, s, z), np.zeros((m, n), np.float32)]
    save_file({f"arg{i}": a for i, a in enumerate(args)}, str(tmp_path / "args.safetensors"))
    qemu_ok(runner, "--kernel", lib, "w4_kernel", tmp_path / "args.safetensors", tmp_path / "y.bin")
    y = np.fromfile(tmp_path / "y.bin", np.float32).reshape(m, n)
    ref = fake_quant_activations(x, group).astype(np.float64) @ w.astype(np.float64).T
    assert rel_err(y, ref) < 1e-5


def test_w4a8_model_under_qemu_matches_x86(runner: Path, tmp_path: Path) -> None:
    """The same RTN W4A8 weights compiled for arm-neon-dotprod and for this x86 host give the same
    logits: the sdot kernels round and sum as the x86 dot-product kernels do."""
    model = load_model(str(make_checkpoint(tmp_path / "ckpt", seed=5, intermediate_size=128)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32, act_bits=8), False)
    arm = write_artifact(tmp_path / "arm", model, get_target("arm-neon-dotprod"), "float32", 128, quant=quant,
                         method="rtn")
    host = write_artifact(tmp_path / "host", model, get_target("host"), "float32", 128, quant=quant, method="rtn")
    assert json.loads((arm / "manifest.json").read_text())["quantization"]["layout"] == "d8"
    prompt, feed = [int(t) for t in np.random.RandomState(7).randint(3, 300, size=13)], [42, 7, 250]
    logits_bin = tmp_path / "logits.bin"
    qemu_ok(runner, arm, "--prompt", ids_arg(prompt), "--feed", ids_arg(feed), "--logits", logits_bin)
    engine = Engine(host)
    ref = np.stack([engine.prefill(prompt)] + [engine.decode(t) for t in feed])
    assert rel_err(np.fromfile(logits_bin, np.float32).reshape(ref.shape), ref) < 1e-4
    funcs = disassemble(arm / "lib.so")
    assert any(mn == "sdot" for name, insns in funcs.items() if "w4" in name for _, mn, _ in insns)
