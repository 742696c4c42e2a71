"""CUDA and Jetson builds without a GPU: the int4 kernels run on the CPU in emulation against numpy,
every CUDA/Jetson target compiles a tiny int4 model (nvcc fatbin inside lib.so), the PTX of the
int4 kernels has the instructions the design promises, and ptxas's resource report is in bounds.
Needs nvcc (CI has it, no GPU)."""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tvm

from awqc.compiler.awq import quantize_model
from awqc.compiler.cli import main
from awqc.compiler.cuda_package import KERNELS_SOURCE, embedded_cuda_module, nvcc_compile, parse_ptxas_usage
from awqc.compiler.targets import TARGET_NAMES, UnknownTargetError, get_target
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.artifact import ArtifactError
from awqc.schedules.cuda import CudaKnobsError, W4CudaKnobs, host_helper_source, knobs_for, w4_gemm_f16, w4_gemv_f16
from awqc.schedules.layouts import K8

from conftest import clean_env, make_checkpoint

CUDA_TARGETS = [n for n in TARGET_NAMES if n.startswith(("cuda-", "jetson-"))]
FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # 0xBA55ED50, little-endian
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA builds need nvcc")


def reference(x: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray, group: int) -> np.ndarray:
    w = (q.astype(np.float64) - np.repeat(z.astype(np.float64), group, 1)) * np.repeat(s.astype(np.float64), group, 1)
    return x.astype(np.float64) @ w.T


def int4_data(m: int, k: int, n: int, group: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s = (rng.random((n, k // group)) * 0.02 + 0.002).astype(np.float16)
    z = rng.integers(0, 16, (n, k // group)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float16)
    return [x, *K8.pack(q, s, z)], reference(x, q, s, z, group)


# ------------------------------------------------------------------------------ device helpers
@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CUDA device helpers built for this CPU (with the host shim), as a shared library."""
    d = tmp_path_factory.mktemp("helpers")
    (d / "helpers.cc").write_text(host_helper_source())
    subprocess.run(["g++", "-O2", "-fPIC", "-shared", str(d / "helpers.cc"), "-o", str(d / "helpers.so")], check=True)
    subprocess.run(["g++", "-O2", "-fPIC", "-c", str(d / "helpers.cc"), "-o", str(d / "helpers.o")], check=True)
    return d


def test_dequant_bit_trick_is_exact(helpers: Path) -> None:
    """awqc_w4_dequant8: LOP3 of a nibble pair into fp16 1024 (+ HSUB2, HFMA2) gives (q - z) * s in
    pair order (w0, w4, w1, w5, ...), for every nibble value at every position."""
    lib = ctypes.CDLL(str(helpers / "helpers.so"))
    lib.awqc_w4_dequant8.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    rng = np.random.default_rng(1)
    for _ in range(64):
        q = rng.integers(0, 16, 8)
        word = int(sum(int(v) << (4 * j) for j, v in enumerate(q)))
        s, z = np.float16(rng.random() * 0.1 + 1e-3), np.float16(rng.integers(0, 16))
        nzs = np.float16(-(np.float32(z) * np.float32(s)))
        out = np.zeros(8, np.float16)
        bits = lambda h: int(np.array([h, h], np.float16).view(np.uint32)[0])  # noqa: E731
        lib.awqc_w4_dequant8(word, bits(s), bits(nzs), out.ctypes.data)
        want = (np.float32(q) * np.float32(s) + np.float32(nzs)).astype(np.float16)  # one fp16 rounding (fma)
        np.testing.assert_array_equal(out, want[[0, 4, 1, 5, 2, 6, 3, 7]])
        pairs = np.zeros(8, np.float16)
        x = rng.standard_normal(8).astype(np.float16)
        xw = x.view(np.uint32)
        lib.awqc_pair8(*[ctypes.c_uint32(int(v)) for v in xw], ctypes.c_void_p(pairs.ctypes.data))
        np.testing.assert_array_equal(pairs, x[[0, 4, 1, 5, 2, 6, 3, 7]])


def emulate(func: tvm.tirx.PrimFunc, helpers: Path, out: Path):
    """A kernel built in emulation mode, compiled for this CPU with the host helpers linked in."""
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target({"kind": "llvm"}))
    ex.export_library(str(out), addons=[str(helpers / "helpers.o")])
    return tvm.runtime.load_module(str(out))["main"]


GEMM_SHAPES = [(7, 576, 960, 64), (33, 96, 200, 32), (1, 128, 130, 128), (64, 64, 128, 32)]


@pytest.mark.parametrize("kind,m,k,n,group", [
    ("gemv", 1, 576, 960, 64), ("gemv", 1, 1536, 576, 64), ("gemv", 1, 96, 10, 32), ("gemv", 1, 256, 7, 128),
    *[("gemm", *shape) for shape in GEMM_SHAPES], *[("gemm_mma", *shape) for shape in GEMM_SHAPES]])
def test_emulated_cuda_kernel_matches_numpy(helpers: Path, tmp_path: Path, kind: str, m: int, k: int, n: int,
                                            group: int) -> None:
    """The CUDA kernel itself (its TIR: thread mapping, guards, shared-memory staging, pairing;
    for the tensor-core GEMM the warp tiles and which accumulator holds which output), with
    thread loops serial and the device helpers from the host build. The host mma helper computes
    its lane's outputs directly, so the PTX fragment layout itself is checked only on a GPU."""
    if kind == "gemv":
        func = w4_gemv_f16(k, n, group, emulate=True)
    else:
        func = w4_gemm_f16(k, n, group, W4CudaKnobs(gemm_mma=kind == "gemm_mma"), emulate=True)
    fn = emulate(func, helpers, tmp_path / f"{kind}_{m}_{k}_{n}.so")
    args, ref = int4_data(m, k, n, group, seed=k + n)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float16))
    fn(*[tvm.runtime.tensor(a) for a in args], y)
    # fp16 output, products summed in fp16 over one word (8 terms) before the float32 accumulator
    assert np.abs(y.numpy().astype(np.float64) - ref).max() / np.abs(ref).max() < 2e-3


# ------------------------------------------------------------------------------ PTX of the int4 kernels
ARCHS = {"cuda-sm80": "sm_80", "cuda-sm86": "sm_86", "jetson-orin-nano": "sm_87", "cuda-sm89": "sm_89",
         "cuda-sm90": "sm_90a"}


@pytest.fixture(scope="module")
def int4_ptx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict]]:
    """PTX and ptxas usage of the GEMV and GEMM kernels (SmolLM2's MLP shape) per arch."""
    out = {}
    for target, arch in ARCHS.items():
        spec = get_target(target)
        mma = w4_gemm_f16(576, 1536, 64, W4CudaKnobs(gemm_mma=True))
        mod = tvm.IRModule({"w4_gemv": w4_gemv_f16(576, 1536, 64).with_attr("global_symbol", "w4_gemv"),
                            "w4_gemm": w4_gemm_f16(576, 1536, 64).with_attr("global_symbol", "w4_gemm"),
                            "w4_mma": mma.with_attr("global_symbol", "w4_mma")})
        src = tvm.compile(mod, spec.target()).mod.imports[0].inspect_source("cuda")
        work = tmp_path_factory.mktemp(arch)
        ptx, _ = nvcc_compile(src, arch, "ptx", work)
        _, log = nvcc_compile(src, arch, "cubin", work, ["-Xptxas", "-v"])
        out[target] = (ptx.decode(), parse_ptxas_usage(log))
    return out


def kernel_ptx(ptx: str, name: str) -> str:
    start = ptx.index(f".entry {name}_kernel")
    end = ptx.find(".entry", start + 1)
    return ptx[start:end if end > 0 else len(ptx)]


@pytest.mark.parametrize("target", list(ARCHS))
def test_gemv_ptx(int4_ptx: dict, target: str) -> None:
    body = kernel_ptx(int4_ptx[target][0], "w4_gemv")
    assert re.search(r"ld\.global(\.nc)?\.v4\.u32", body), "128-bit weight loads"
    assert len(re.findall(r"ld\.global(\.nc)?\.v4", body)) >= 5  # 1 x weights + 4 x activations per lane
    # one LOP3 (a & 0x000F000F) | 0x64006400 per nibble pair; the masks live in registers
    assert len(re.findall(r"lop3\.b32[^;]*, 0xEA;", body)) == 16
    assert re.search(r"mov\.[bu]32\s+%r\d+, 1677747200;", body) and re.search(r"mov\.[bu]32\s+%r\d+, 983055;", body)
    assert body.count("sub.f16x2") == 16 and body.count("fma.rn.f16x2") == 32  # 4 words x 4 pairs
    assert body.count("prmt.b32") == 16
    assert "shfl.sync" in body


@pytest.mark.parametrize("target", list(ARCHS))
def test_gemm_ptx(int4_ptx: dict, target: str) -> None:
    body = kernel_ptx(int4_ptx[target][0], "w4_gemm")
    assert re.search(r"ld\.global(\.nc)?\.v4", body)
    assert "ld.shared.v4" in body and "st.shared.v4" in body and "bar.sync" in body
    assert "lop3.b32" in body and "sub.f16x2" in body
    assert body.count("fma.rn.f32") >= 4 * 8 * 8  # a 4 x 8 register tile per 8 k


@pytest.mark.parametrize("target", list(ARCHS))
def test_tensor_core_gemm_ptx(int4_ptx: dict, target: str) -> None:
    """Per 32-wide k tile: the weights dequantized with the fast conversion into shared memory,
    then per warp 2 x 4 tiles x 2 k16 steps of f16 x f16 -> f32 mma.sync, each fed by six 32-bit
    shared loads (4 for the activation fragment, 2 for the weights)."""
    body = kernel_ptx(int4_ptx[target][0], "w4_mma")
    mma = re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32", body)
    assert len(mma) == 16
    assert len(re.findall(r"ld\.shared\.[ub]32", body)) == 6 * len(mma)
    assert len(re.findall(r"lop3\.b32[^;]*, 0xEA;", body)) == 16 and "sub.f16x2" in body
    assert "fma.rn.f32" not in body and ".local" not in body  # accumulators stay in registers


@pytest.mark.parametrize("target", list(ARCHS))
def test_int4_kernel_resources(int4_ptx: dict, target: str) -> None:
    usage = int4_ptx[target][1]
    limit = get_target(target).tvm_target["max_shared_memory_per_block"]
    for name in ("w4_gemv_kernel", "w4_gemm_kernel", "w4_mma_kernel"):
        u = usage[name]
        assert 0 < u["registers"] <= 255 and u["smem"] <= limit and u["spill"] == 0, (name, u)
    for name in ("w4_gemm_kernel", "w4_mma_kernel"):
        assert usage[name]["smem"] == (32 + 128) * 40 * 2  # padded tiles, as designed
    assert usage["w4_mma_kernel"]["stack"] == 0


def test_every_cuda_target_uses_tensor_cores(tmp_path: Path) -> None:
    """Each CUDA/Jetson target (all sm_80 or newer) has a knobs record choosing the tensor-core
    GEMM; a damaged or misplaced record is refused by name, and no record means the defaults."""
    for target in CUDA_TARGETS:
        assert knobs_for(target, get_target(target).tvm_target["arch"]).gemm_mma, target
    assert knobs_for("cuda-sm80", "sm_80", tmp_path) == W4CudaKnobs()
    record = json.loads((Path(__file__).parents[1] / "schedules/records/cuda-sm80.json").read_text())
    (tmp_path / "cuda-sm86.json").write_text(json.dumps(record))  # sm_80's record under sm_86's name
    with pytest.raises(CudaKnobsError, match="cuda-sm86.json is not the awqc-cuda-knobs/1 record of cuda-sm86"):
        knobs_for("cuda-sm86", "sm_86", tmp_path)
    (tmp_path / "cuda-sm80.json").write_text(json.dumps({**record, "knobs": {"gemm_mma": True, "tiles": 3}}))
    with pytest.raises(CudaKnobsError, match="cuda-sm80.json has bad knobs"):
        knobs_for("cuda-sm80", "sm_80", tmp_path)


@pytest.mark.parametrize("dtype,rows", [("float32", 1), ("float32", None), ("float16", 4)])
def test_generic_cuda_schedules_compile(tmp_path: Path, dtype: str, rows: int | None) -> None:
    """float32 activations (and a static row count other than 1) use schedules of the generic
    kernel; they compile for the GPU with a shuffle reduction (GEMV) and no spills."""
    from awqc.schedules.cuda import schedule_w4_cuda
    from awqc.schedules.w4_kernels import w4_matmul

    func = schedule_w4_cuda(w4_matmul(576, 960, 64, dtype, rows), 64, rows).with_attr("global_symbol", "k")
    src = tvm.compile(tvm.IRModule({"k": func}), get_target("cuda-sm80").target()).mod.imports[0].inspect_source("cuda")
    ptx, _ = nvcc_compile(src, "sm_80", "ptx", tmp_path)
    _, log = nvcc_compile(src, "sm_80", "cubin", tmp_path, ["-Xptxas", "-v"])
    assert ("shfl.sync" in ptx.decode()) == (rows == 1)
    assert parse_ptxas_usage(log)["k_kernel"]["spill"] == 0


# ------------------------------------------------------------------------------ targets
def test_cuda_targets() -> None:
    for name in CUDA_TARGETS:
        spec = get_target(name)
        json.dumps(spec.tvm_target)  # goes into the manifest as it is
        t = spec.target()
        assert t.kind.name == "cuda" and spec.device == "cuda"
        if name.startswith("jetson"):
            assert t.attrs["arch"] == "sm_87" and spec.arch == "aarch64"
            assert t.host.attrs["mcpu"] == "cortex-a78" and spec.cross_compiler == "aarch64-linux-gnu-g++"
        else:
            assert spec.arch == "x86_64" and t.attrs["arch"].startswith(f"sm_{name[-2:]}")
    with pytest.raises(UnknownTargetError, match="cuda-sm90"):
        get_target("cuda-sm75")


# ------------------------------------------------------------------------------ tiny int4 model, every target
@pytest.fixture(scope="module")
def tiny_cuda_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny fp16 int4 model compiled for every CUDA/Jetson target by `awqc compile`, several at
    a time (separate processes: TVM's builders are not thread-safe; nvcc dominates)."""
    root = tmp_path_factory.mktemp("cuda")
    ckpt = make_checkpoint(root / "ckpt", seed=7, intermediate_size=128)
    env = {**os.environ, "AWQC_CACHE_DIR": str(root / "cache")}  # compile fresh; both sm_87 boards share one
    out = {t: root / t for t in CUDA_TARGETS}
    # both sm_87 boards compile the same CUDA source: run them apart so the second hits the cache
    order = ["jetson-orin-nano", *[t for t in CUDA_TARGETS if not t.startswith("jetson")], "jetson-agx-orin"]
    assert sorted(order) == sorted(CUDA_TARGETS)
    jobs = [[sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", str(ckpt), "--target", t,
             "--dtype", "float16", "--quant", "rtn-w4g32", "--context-window", "128", "-o", str(out[t])]
            for t in order]
    # a compile process holds ~1.5 GB (torch, TVM): at most 4 at a time
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, env=env), jobs))
    for target, r in zip(order, results):
        assert r.returncode == 0, f"awqc compile --target {target} failed:\n{r.stderr[-3000:]}"
    return out


def check_cuda_artifact(art: Path, target: str) -> dict:
    manifest = json.loads((art / "manifest.json").read_text())
    spec = get_target(target)
    t = manifest["target"]
    assert t["name"] == target and t["device"] == "cuda" and t["arch"] == spec.arch
    cuda = t["cuda"]
    assert cuda["kernels"] == "fatbin" and cuda["gpu_arch"] == spec.tvm_target["arch"]
    fmt, names, code = embedded_cuda_module(art / "lib.so")
    assert fmt == "fatbin" and code.startswith(FATBIN_MAGIC) and len(code) == cuda["fatbin_bytes"]
    assert any(n.startswith("w4_gemv") for n in names) and any(n.startswith("w4_gemm") for n in names)
    assert b"__global__" not in (art / "lib.so").read_bytes()  # the source is not what ships in lib.so
    source = (art / KERNELS_SOURCE).read_text()
    assert "__global__" in source and "mma.sync.aligned.m16n8k16" in source  # the tensor-core prefill GEMM
    assert (art / "lib.so").read_bytes()[18] == ELF_MACHINE[spec.arch]
    assert set(cuda["ptxas"]) == set(names)  # ptxas reported every kernel of the module
    assert 0 < cuda["max_registers"] <= 255
    assert cuda["max_static_smem"] <= spec.tvm_target["max_shared_memory_per_block"]
    return manifest


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_tiny_int4_model_builds(tiny_cuda_artifacts: dict[str, Path], target: str) -> None:
    manifest = check_cuda_artifact(tiny_cuda_artifacts[target], target)
    assert manifest["dtype"] == "float16" and manifest["quantization"]["layout"] == "k8"


FAMILY_CKPTS = {"qwen3": dict(model_type="qwen3", head_dim=32), "phi3": dict(model_type="phi3", pad_token_id=0),
                "gemma3_text": dict(model_type="gemma3_text", head_dim=32, sliding_window=48,
                                    layer_types=["sliding_attention", "full_attention"])}


def test_other_families_build_for_cuda(tmp_path: Path) -> None:
    """Qwen3's per-head q/k norms, Phi-3's checkpoint layout and Gemma 3 (RoPE in the graph,
    sliding layers) through the CUDA path: each family's int4 fp16 artifact compiles for sm_80
    with every kernel bound to threads."""
    env = {**os.environ, "AWQC_CACHE_DIR": str(tmp_path / "cache")}
    jobs = {}
    for fam, kw in FAMILY_CKPTS.items():
        ckpt = make_checkpoint(tmp_path / f"{fam}-ckpt", seed=7, intermediate_size=128, **kw)
        jobs[fam] = [sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", str(ckpt), "--target",
                     "cuda-sm80", "--dtype", "float16", "--quant", "rtn-w4g32", "--context-window", "128",
                     "-o", str(tmp_path / fam)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, env=env),
                                          jobs.values())))
    for fam, r in results.items():
        assert r.returncode == 0, (fam, r.stderr[-2000:])
        manifest = check_cuda_artifact(tmp_path / fam, "cuda-sm80")
        assert manifest["model"]["model_type"] == fam


def test_soft_capped_attention_refused_for_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Gemma 2's attention soft-cap is computed only by awqc's CPU kernels: a CUDA compile says so
    and writes nothing."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=7, model_type="gemma2", head_dim=32, attn_logit_softcapping=50.0)
    out = tmp_path / "art"
    assert main(["compile", "--model", str(ckpt), "--target", "cuda-sm80", "--dtype", "float16", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "soft-caps its attention scores (attn_logit_softcapping 50.0" in err and "compile it for a CPU target" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA device")
def test_cuda_artifact_refused_without_gpu(tiny_cuda_artifacts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from awqc.runtime.engine import Engine

    art = tiny_cuda_artifacts["cuda-sm90"]
    with pytest.raises(ArtifactError, match="this artifact targets cuda-sm90 but no CUDA device is available; "
                                            "compile with --target host"):
        Engine(art)
    assert main(["run", str(art), "--prompt", "hi"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="cannot run on device 'cpu'"):
        Engine(art, "cpu")


# ------------------------------------------------------------------------------ the default model
@pytest.fixture(scope="module")
def default_cuda_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2-135M, RTN w4g64, fp16, for an H100 and a Jetson Orin Nano (model loaded once)."""
    from awqc.compiler.build import write_artifact
    from awqc.compiler.model_import import load_model

    root = tmp_path_factory.mktemp("default-cuda")
    model = load_model("default")
    quant = quantize_model(model, "rtn", QuantScheme(group_size=64), quantize_head=False)
    old_cache = os.environ.get("AWQC_CACHE_DIR")
    os.environ["AWQC_CACHE_DIR"] = str(root / "cache")  # run nvcc, not a fatbin cached by an earlier run
    try:
        return {t: write_artifact(root / t, model, get_target(t), "float16", 512, quant=quant, method="rtn")
                for t in ("cuda-sm90", "jetson-orin-nano")}
    finally:
        os.environ.pop("AWQC_CACHE_DIR") if old_cache is None else os.environ.update(AWQC_CACHE_DIR=old_cache)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cuda-sm90", "jetson-orin-nano"])
def test_default_model_cuda_artifact(default_cuda_artifacts: dict[str, Path], target: str) -> None:
    manifest = check_cuda_artifact(default_cuda_artifacts[target], target)
    usage = manifest["target"]["cuda"]["ptxas"]
    # SmolLM2: qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576; decode GEMV and prefill GEMM
    for k, n in [(576, 960), (576, 576), (576, 3072), (1536, 576)]:
        for kind in ("gemv", "gemm"):
            u = usage[f"w4_{kind}_{k}x{n}_g64_kernel"]
            assert u["registers"] <= 255 and u["spill"] == 0


def test_cuda_bundle_has_the_cuda_runtime(tiny_cuda_artifacts: dict[str, Path], tmp_path: Path,
                                          bare_python: Path) -> None:
    """A CUDA artifact's bundle carries libtvm_runtime_cuda and no C++ runner (it drives CPUs only);
    its Python entry, with no TVM installed, loads the artifact up to the device check."""
    from awqc.compiler.bundle import BundleError, make_bundle

    record = make_bundle(tiny_cuda_artifacts["cuda-sm90"], tmp_path / "b")
    assert (tmp_path / "b" / "python" / "tvm" / "lib" / "libtvm_runtime_cuda.so").is_file()
    assert not (tmp_path / "b" / "bin").exists() and record["device"] == "cuda"
    proc = subprocess.run([tmp_path / "b" / "awqc", "run", tmp_path / "b" / "artifact", "--prompt", "hi"],
                          capture_output=True, text=True, env={**clean_env(), "PYTHON": str(bare_python)})
    if tvm.cuda(0).exist:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2 and "no CUDA device is available" in proc.stderr, proc.stderr
    with pytest.raises(BundleError, match="only the Python entry can run it: pass --tvm-ffi-wheel"):
        make_bundle(tiny_cuda_artifacts["jetson-orin-nano"], tmp_path / "jetson")
