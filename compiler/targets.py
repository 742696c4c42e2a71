"""Short target names → a TVM target, the machine it runs on, and how to link its library."""
from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any, Callable

import tvm


class UnknownTargetError(ValueError):
    """A target name awqc does not know."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm_target: dict[str, Any]
    arch: str  # platform.machine() of the device that runs the artifact
    cross_compiler: str | None = None  # g++ driver that links the library; None: the host's
    device: str = "cpu"  # TVM device kind the kernels run on: "cpu" or "cuda"

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)

    def fcompile(self) -> Callable | None:
        if self.cross_compiler is None:
            return None
        return tvm.support.cc.cross_compiler(self.cross_compiler)


def _cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports. TVM's own detection reads the CPU model
    (e.g. znver4) and assumes AVX-512 even where a hypervisor hides it, which dies with SIGILL."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host_x86() -> dict[str, Any]:
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        mcpu = "x86-64-v4"
    elif {"avx2", "fma", "f16c", "bmi2"} <= flags:
        mcpu = "x86-64-v3"
    else:
        mcpu = "x86-64-v2"
    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": os.cpu_count() or 1}
    if mcpu == "x86-64-v4" and "avx512_vnni" in flags:  # vpdpbusd, for the W4A8 kernels
        target["mattr"] = ["+avx512vnni"]
    return target


def _host_aarch64() -> dict[str, Any]:
    mattr = ["+neon"] + (["+dotprod"] if "asimddp" in _cpu_flags() else [])
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr, "num-cores": os.cpu_count() or 1}


def host_spec() -> TargetSpec:
    arch = platform.machine()
    if arch == "x86_64":
        return TargetSpec("host", _host_x86(), arch)
    if arch == "aarch64":
        return TargetSpec("host", _host_aarch64(), arch)
    raise UnknownTargetError(f"the host architecture {arch} is not supported; supported hosts: x86_64, aarch64")


_FIXED: dict[str, TargetSpec] = {
    "x86-avx2": TargetSpec(
        "x86-avx2", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "num-cores": 4}, "x86_64"),
    "arm-neon": TargetSpec(
        "arm-neon", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4},
        "aarch64", cross_compiler="aarch64-linux-gnu-g++"),
    # Armv8.2 dot products (Cortex-A76 and later: Snapdragon 855+, Dimensity, Orin's A78AE):
    # W4A8 on sdot
    "arm-neon-dotprod": TargetSpec(
        "arm-neon-dotprod", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"],
                             "num-cores": 4},
        "aarch64", cross_compiler="aarch64-linux-gnu-g++"),
}


# --- CUDA GPUs and Jetson boards ---------------------------------------------------------------
# Each maps to a TVM tag (its SM arch, thread and shared-memory limits) with the host CPU
# replaced: x86-64-v2 for discrete GPUs (the host side only runs VM glue, so a portable ISA is
# enough), and for Jetson Orin the board's Cortex-A78AE cores, cross-linked for aarch64 (the
# jetson-orin-nano tag says mcpu=carmel, Xavier's CPU).
_CUDA_TAGS: dict[str, tuple[str, str]] = {  # name -> (TVM tag, host)
    "cuda-sm80": ("nvidia/nvidia-a100", "x86"),
    "cuda-sm86": ("nvidia/geforce-rtx-3090", "x86"),
    "cuda-sm89": ("nvidia/geforce-rtx-4090", "x86"),
    "cuda-sm90": ("nvidia/nvidia-h100", "x86"),
    "jetson-orin-nano": ("nvidia/jetson-orin-nano", "orin-6"),
    "jetson-agx-orin": ("nvidia/jetson-agx-orin-64gb", "orin-12"),
}
_CUDA_HOSTS: dict[str, dict[str, Any]] = {
    "x86": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2"},
    "orin-6": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"],
               "num-cores": 6},
    "orin-12": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"],
                "num-cores": 12},
}


def _plain(value: Any) -> Any:
    """A TVM target attribute as plain JSON data (for the manifest)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def _cuda_spec(name: str) -> TargetSpec:
    tag, host = _CUDA_TAGS[name]
    attrs = {k: _plain(v) for k, v in tvm.target.Target(tag).export().items() if k not in ("host", "tag")}
    aarch64 = host.startswith("orin")
    return TargetSpec(name, {**attrs, "host": _CUDA_HOSTS[host]}, "aarch64" if aarch64 else "x86_64",
                      cross_compiler="aarch64-linux-gnu-g++" if aarch64 else None, device="cuda")


TARGET_NAMES = ("host", *_FIXED, *_CUDA_TAGS)


def get_target(name: str) -> TargetSpec:
    """The TargetSpec for a short name such as 'host' or 'arm-neon'."""
    if name == "host":
        return host_spec()
    if name in _CUDA_TAGS:
        return _cuda_spec(name)
    if name not in _FIXED:
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(TARGET_NAMES)}")
    return _FIXED[name]
