"""Build the C++ runner (awqc_runner.cc) into a bundle directory to copy onto a device:

    OUT/awqc_runner                 the program; finds its libraries through rpath $ORIGIN/lib
    OUT/lib/libtvm_runtime.so       the TVM runtime of the wheel for the device's architecture
    OUT/lib/libtvm_ffi.so

By default it cross-compiles for aarch64 with Debian's aarch64-linux-gnu-g++ against
.cache/aarch64/ (libraries and tvm-ffi headers from the aarch64 wheels; scripts/setup.sh
downloads them).

usage: python runtime/cpp/build.py [-o OUT] [--cxx aarch64-linux-gnu-g++] [--tvm-dir .cache/aarch64]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("awqc_runner.cc")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TVM_DIR = REPO / ".cache" / "aarch64"
DEFAULT_CXX = "aarch64-linux-gnu-g++"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")


class RunnerBuildError(RuntimeError):
    """A tool or a library needed to build the runner is missing, or the compiler failed."""


def check_inputs(tvm_dir: Path, cxx: str) -> None:
    """Fail with the fix in the message: everything here comes from scripts/setup.sh."""
    if shutil.which(cxx) is None:
        raise RunnerBuildError(f"{cxx} is not installed; run scripts/setup.sh (Debian g++-aarch64-linux-gnu)")
    needed = [tvm_dir / "lib" / lib for lib in RUNTIME_LIBS] + [tvm_dir / "include" / "tvm" / "ffi" / "function.h"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise RunnerBuildError(f"the device TVM runtime is missing ({', '.join(missing)}); run scripts/setup.sh")


def compile_command(out: Path, tvm_dir: Path, cxx: str) -> list[str]:
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", f"-I{tvm_dir / 'include'}", str(SOURCE), "-o", str(out)]
    versions = tvm_dir / "versions"  # "TVM_VERSION FFI_VERSION", written by scripts/setup.sh
    if versions.is_file():  # lets the runner refuse artifacts of another TVM version
        cmd.append(f'-DAWQC_TVM_VERSION="{versions.read_text().split()[0]}"')
    # --no-as-needed: the program calls into libtvm_runtime only through the global function
    # registry (vm.builtin.*), so the linker would otherwise drop it and those would be missing.
    cmd += [f"-L{tvm_dir / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
            "-Wl,-rpath,$ORIGIN/lib", "-lpthread", "-ldl"]
    return cmd


def package_dir(name: str) -> Path:
    """Where an installed Python package lives (found without importing it)."""
    import importlib.util

    return Path(importlib.util.find_spec(name).origin).parent


def host_tvm_dir(dest: Path) -> Path:
    """The installed TVM's runtime libraries and tvm-ffi headers, laid out in dest as build_runner
    expects, to build the runner for this machine."""
    import importlib.metadata

    (dest / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(package_dir("tvm") / "lib" / "libtvm_runtime.so", dest / "lib")
    shutil.copy2(package_dir("tvm_ffi") / "lib" / "libtvm_ffi.so", dest / "lib")
    shutil.copytree(package_dir("tvm_ffi") / "include", dest / "include", dirs_exist_ok=True)
    versions = [importlib.metadata.version(p) for p in ("apache-tvm", "apache-tvm-ffi")]
    (dest / "versions").write_text(" ".join(versions))
    return dest


def build_runner(out_dir: Path, tvm_dir: Path = DEFAULT_TVM_DIR, cxx: str = DEFAULT_CXX) -> Path:
    """Compile the runner into out_dir with the runtime libraries beside it; the program's path."""
    check_inputs(tvm_dir, cxx)
    (out_dir / "lib").mkdir(parents=True, exist_ok=True)
    for lib in RUNTIME_LIBS:
        shutil.copy2(tvm_dir / "lib" / lib, out_dir / "lib" / lib)
    exe = out_dir / "awqc_runner"
    proc = subprocess.run(compile_command(exe, tvm_dir, cxx), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunnerBuildError(f"{cxx} failed to build the runner:\n{proc.stderr[-4000:]}")
    return exe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, default=Path("awqc-runner-aarch64"), help="bundle directory")
    parser.add_argument("--cxx", default=DEFAULT_CXX, help="C++ compiler for the device")
    parser.add_argument("--tvm-dir", type=Path, default=DEFAULT_TVM_DIR,
                        help="holds lib/libtvm_runtime.so, lib/libtvm_ffi.so and include/ for the device")
    args = parser.parse_args(argv)
    try:
        exe = build_runner(args.out, args.tvm_dir, args.cxx)
    except RunnerBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(exe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
