"""Packaging CUDA artifacts: the kernels go into lib.so as a fatbin compiled here with nvcc.

TVM 0.27's CUDA codegen keeps kernels as CUDA *source* in the exported library when no CUDA
runtime is loaded at compile time (always so on a build machine without a GPU). Such a library
compiles its kernels when it is loaded, which needs `tvm_callback_cuda_compile` (NVRTC or nvcc)
on the device — unavailable to a C++-only runtime on a Jetson. So awqc compiles the source with
nvcc for the target's SM architecture (SASS plus PTX of the same arch) and replaces the CUDA
module's payload in the library's import blob: fmt "cuda" + source becomes fmt "fatbin" + the
fatbin. The stock TVM CUDA runtime loads that directly (cuModuleLoadData) with no compiler on
the device. The source is shipped beside it as kernels.cu for inspection.

Blob format (src/target/codegen.cc, support/serializer.h; all integers little-endian uint64):
  [nbytes] [import_tree_row_ptr: vec] [import_tree_child_indices: vec] then per module group
  [kind: str] and, unless kind is "_lib" (the host code itself), [payload: str];
  a CUDA payload is [fmt: str] [function table] [code: str].
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator

import tvm

from .targets import TargetSpec

KERNELS_SOURCE = "kernels.cu"
_U64 = struct.Struct("<Q")


class CudaBuildError(RuntimeError):
    """nvcc failed on the generated kernels, or the library is not laid out as expected."""


class NvccNotFoundError(CudaBuildError, FileNotFoundError):
    """No nvcc: reported by the CLI as a plain error."""


@contextlib.contextmanager
def source_codegen() -> Iterator[None]:
    """Keep CUDA kernels as source during tvm.compile even where a CUDA runtime is loaded, so a
    build on a GPU machine packages the same way as one without (and needs no NVRTC)."""
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


def cuda_module(ex: Any) -> Any:
    """The CUDA module among the executable's imports."""
    stack = list(ex.mod.imports)
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            return mod
        stack.extend(mod.imports)
    raise CudaBuildError("the compiled library has no CUDA module; was it compiled for a CUDA target?")


def nvcc_path() -> str:
    path = os.environ.get("AWQC_NVCC") or shutil.which("nvcc")
    if not path:
        raise NvccNotFoundError("CUDA targets need nvcc (the CUDA toolkit) on PATH, or AWQC_NVCC naming it")
    return path


def gpu_arch(spec: TargetSpec) -> str:
    """'sm_90a', 'sm_87', ... from the target."""
    return str(spec.tvm_target["arch"])


def nvcc_compile(source: str, arch: str, kind: str, workdir: Path, extra: list[str] | None = None) -> tuple[bytes, str]:
    """nvcc -<kind> (fatbin, cubin or ptx) of CUDA source for one arch: (output bytes, nvcc's
    stderr, which holds ptxas's resource report when `extra` asks for -Xptxas -v)."""
    src = workdir / KERNELS_SOURCE
    src.write_text(source)
    out = workdir / f"kernels.{kind}"
    # -arch=sm_XX embeds SASS for sm_XX and PTX for compute_XX; -w: TVM's prelude defines
    # helpers that a given library does not use, which nvcc reports one by one.
    cmd = [nvcc_path(), f"-{kind}", f"-arch={arch}", "-O3", "-w", *(extra or []), "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CudaBuildError(f"nvcc failed on the generated kernels ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return out.read_bytes(), proc.stderr


def _cache_dir() -> Path:
    return Path(os.environ.get("AWQC_CACHE_DIR") or Path.home() / ".cache" / "awqc") / "nvcc"


def build_fatbin(source: str, arch: str, workdir: Path) -> tuple[bytes, dict[str, dict[str, int]]]:
    """The fatbin of `source` for `arch` and ptxas's per-kernel resource usage. Cached by the
    hash of (source, arch, nvcc version): identical kernels (e.g. two boards of one SM arch) are
    compiled once."""
    key = hashlib.sha256("\0".join([source, arch, nvcc_version(), "v1"]).encode()).hexdigest()[:32]
    cached, report = _cache_dir() / f"{key}.fatbin", _cache_dir() / f"{key}.json"
    if cached.is_file() and report.is_file():
        return cached.read_bytes(), json.loads(report.read_text())
    fatbin, log = nvcc_compile(source, arch, "fatbin", workdir, ["-Xptxas", "-v"])
    usage = parse_ptxas_usage(log)
    try:  # a cache that cannot be written only costs time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(fatbin)
        os.replace(tmp, cached)
        report.write_text(json.dumps(usage))
    except OSError:
        pass
    return fatbin, usage


def parse_ptxas_usage(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {registers, smem, stack, spill}} from `ptxas -v` output (smem: static bytes)."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = usage.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spill": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(sm.group(1)) if sm else 0
    return usage


def nvcc_version() -> str:
    return _nvcc_version(nvcc_path())


@functools.lru_cache(maxsize=4)
def _nvcc_version(nvcc: str) -> str:
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if "release" in line]
    return lines[-1].strip() if lines else proc.stdout.strip()


# -- the import blob ------------------------------------------------------------------------------
def _read_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = _U64.unpack_from(buf, pos)
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def _read_vec(buf: bytes, pos: int) -> tuple[bytes, int]:
    """A vector<uint64> kept as its raw bytes."""
    (n,) = _U64.unpack_from(buf, pos)
    return buf[pos:pos + 8 + 8 * n], pos + 8 + 8 * n


def _str(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def replace_cuda_payload(blob: bytes, code: bytes, fatbin: bytes) -> bytes:
    """The packed imports with the CUDA module's (fmt, code) replaced by ("fatbin", fatbin)."""
    (nbytes,) = _U64.unpack_from(blob, 0)
    body, pos, out, replaced = blob[8:8 + nbytes], 0, [], 0
    for _ in range(2):  # import tree
        vec, pos = _read_vec(body, pos)
        out.append(vec)
    while pos < len(body):
        kind, pos = _read_str(body, pos)
        out.append(_str(kind))
        if kind == b"_lib":
            continue
        if kind == b"_import_tree":
            for _ in range(2):
                vec, pos = _read_vec(body, pos)
                out.append(vec)
            continue
        payload, pos = _read_str(body, pos)
        if kind == b"cuda":
            payload = _fatbin_payload(payload, code, fatbin)
            replaced += 1
        out.append(_str(payload))
    if replaced != 1:
        raise CudaBuildError(f"expected one CUDA module in the library, found {replaced}")
    new = b"".join(out)
    return _U64.pack(len(new)) + new


def parse_cuda_payload(payload: bytes) -> tuple[bytes, bytes, list[str], bytes]:
    """(fmt, function-table bytes, kernel names, code) of a serialized CUDA module. The function
    table is Map<String, FunctionInfo>: count, then per kernel its key, name, arg dtypes (4 bytes
    each), launch parameter tags (strings) and arg extra tags (int32 each)."""
    fmt, pos = _read_str(payload, 0)
    fmap_start = pos
    (count,), pos = _U64.unpack_from(payload, pos), pos + 8
    names = []
    for _ in range(count):
        key, pos = _read_str(payload, pos)
        _name, pos = _read_str(payload, pos)
        (n,), pos = _U64.unpack_from(payload, pos), pos + 8
        pos += 4 * n  # DLDataType: code u8, bits u8, lanes u16
        (n,), pos = _U64.unpack_from(payload, pos), pos + 8
        for _ in range(n):
            _tag, pos = _read_str(payload, pos)
        (n,), pos = _U64.unpack_from(payload, pos), pos + 8
        pos += 4 * n  # ArgExtraTags: int32
        names.append(key.decode())
    fmap = payload[fmap_start:pos]
    code, pos = _read_str(payload, pos)
    if pos != len(payload):
        raise CudaBuildError("unexpected CUDA module layout (this TVM serializes CUDA modules differently)")
    return fmt, fmap, names, code


def _fatbin_payload(payload: bytes, code: bytes, fatbin: bytes) -> bytes:
    fmt, fmap, _, old = parse_cuda_payload(payload)
    if fmt != b"cuda" or old != code:
        raise CudaBuildError(f"the CUDA module holds {fmt.decode()!r}, not the source nvcc compiled")
    return _str(b"fatbin") + fmap + _str(fatbin)


def embedded_cuda_module(lib: Path) -> tuple[str, list[str], bytes]:
    """(fmt, kernel names, code) of the CUDA module inside an exported library."""
    data = lib.read_bytes()
    key = _str(b"cuda")
    at = data.find(key)
    while at >= 0:
        try:
            payload, _ = _read_str(data, at + len(key))
            fmt, _, names, code = parse_cuda_payload(payload)
            return fmt.decode(), names, code
        except (struct.error, CudaBuildError):
            at = data.find(key, at + 1)
    raise CudaBuildError(f"{lib} holds no CUDA module")


# -- export ---------------------------------------------------------------------------------------
def export_cuda_library(ex: Any, out: Path, spec: TargetSpec) -> dict[str, Any]:
    """Export `ex` to `out` (lib.so) with the CUDA kernels as an nvcc fatbin for the target's arch,
    and write kernels.cu beside it; what the manifest records about the kernels."""
    module = cuda_module(ex)
    source = module.inspect_source("cuda")
    code = source.encode()  # the module's payload code: source, as codegen left it (see source_codegen)
    arch = gpu_arch(spec)
    work = out.parent / ".cuda-build"
    work.mkdir(exist_ok=True)
    try:
        fatbin, usage = build_fatbin(source, arch, work)
        triple = str(spec.tvm_target["host"]["mtriple"])

        def pack_imports(mod: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
            blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy())
            blob = replace_cuda_payload(blob, code, fatbin)
            obj = os.path.join(workspace, f"{prefix}devc.o")
            # the same LLVM blob object export_library makes by default, for the host's triple
            target = json.dumps({"kind": "llvm", "mtriple": triple})
            tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, target, prefix).write_to_file(obj)
            return obj

        ex.mod.export_library(str(out), fcompile=spec.fcompile(), fpack_imports=pack_imports,
                              workspace_dir=str(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out.parent / KERNELS_SOURCE).write_text(source)
    return {"kernels": "fatbin", "gpu_arch": arch, "nvcc": nvcc_version(), "fatbin_bytes": len(fatbin),
            "max_registers": max((u["registers"] for u in usage.values()), default=0),
            "max_static_smem": max((u["smem"] for u in usage.values()), default=0),
            "spill_bytes": sum(u["spill"] for u in usage.values()), "ptxas": usage}
