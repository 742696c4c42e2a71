"""`awqc bundle`: everything a bare device needs to run one artifact, and nothing of the compiler.

    DIR/artifact/           the artifact as compiled (hard-linked when on the same filesystem)
    DIR/awqc                launcher: `DIR/awqc run DIR/artifact --prompt ...` (also chat, serve, bench)
    DIR/python/awqc/        awqc.runtime only
    DIR/python/tvm/         TVM's Python package for runtime-only mode (TVM_USE_RUNTIME_LIB=1): its
                            sources, with libtvm_runtime (and libtvm_runtime_cuda for CUDA targets),
                            without the compiler library, C++ sources and headers
    DIR/python/tvm_ffi/     tvm-ffi for one CPython version (its compiled core is per version), and
                            typing_extensions.py, its one dependency
    DIR/bin/awqc_runner     the C++ runner (CPU artifacts; needs no Python), DIR/bin/lib/ its libraries
    DIR/bundle.json         target, versions, Python tag and the size of each part

The Python entry needs python3 (the version in bundle.json) with numpy, tokenizers and jinja2; the
C++ runner needs nothing. The TVM and tvm-ffi Python sources are the same on every architecture:
only the shared libraries differ, so an aarch64 bundle takes the aarch64 libraries that
scripts/setup.sh extracts from the aarch64 wheels (.cache/aarch64/lib) and, for its Python entry,
a tvm-ffi wheel for the device (`--tvm-ffi-wheel`, from `pip download`).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from awqc.runtime.artifact import WEIGHTS, ArtifactError, read_manifest, verify_files
from awqc.runtime.cpp.build import RunnerBuildError, build_runner, host_tvm_dir, package_dir

from .output import make_staging_dir, staging_path

REPO = Path(__file__).resolve().parents[1]
AARCH64_LIBS = REPO / ".cache" / "aarch64" / "lib"
LAUNCHER = """\
#!/bin/sh
# Runs awqc's device-side commands (run, chat, serve, bench) from this bundle; PYTHON picks the interpreter.
here=$(cd "$(dirname "$0")" && pwd)
py=${{PYTHON:-python3}}
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != ({major}, {minor}))' 2>/dev/null; then
  echo "error: this bundle's tvm_ffi is built for Python {major}.{minor}; run it with PYTHON=python{major}.{minor}," \\
       "or rebuild it with 'awqc bundle --tvm-ffi-wheel' for this device's Python" >&2
  exit 2
fi
export PYTHONPATH="$here/python${{PYTHONPATH:+:$PYTHONPATH}}" TVM_USE_RUNTIME_LIB=1
exec "$py" -P -m awqc.runtime.cli "$@"  # -P: no module is taken from the working directory
"""
# What runtime-only TVM does not load: the compiler library (~250 MB; lib/ gets the runtime only),
# C++ sources, headers, and the compiler's Python packages (relax, s_tir, topi, web).
_TVM_SKIP = ("3rdparty", "src", "include", "lib", "lib64", "relax", "s_tir", "topi", "web")
# tvm_ffi's sources and headers; its lib/ stays whole (it loads libtvm_ffi_testing too).
_FFI_SKIP = ("3rdparty", "src", "include", "cython")
_WHEEL_NAME = re.compile(r"^apache_tvm_ffi-(?P<version>[^-]+)-(?P<py>cp\d+)-[^-]+-(?P<plat>[^-]+)\.whl$")


class BundleError(ValueError):
    """The bundle cannot be made from these inputs; the message says what to change."""


def make_bundle(artifact: Path, out: Path, tvm_ffi_wheel: Path | None = None, force: bool = False) -> dict:
    """Write the bundle for `artifact` to `out` (built beside it and renamed into place, so a failure
    leaves nothing); returns the bundle.json record. `force` replaces an earlier bundle, nothing else."""
    try:
        manifest = read_manifest(artifact)
        verify_files(artifact, manifest)
    except ArtifactError as err:
        raise BundleError(f"cannot bundle {artifact}: {err}") from None
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / "bundle.json").is_file():
        raise BundleError(f"{out} exists and is not an awqc bundle (no bundle.json); --force replaces only a bundle, "
                          "choose another -o")
    target = manifest["target"]
    arch, device = target["arch"], target.get("device", "cpu")
    if tvm_ffi_wheel is None and arch != platform.machine() and device != "cpu":
        raise BundleError(f"the artifact runs on {arch} with {device}, where only the Python entry can run it: "
                          f"{_wheel_hint(arch)}")
    python_entry = None  # checked before anything is written
    if tvm_ffi_wheel is not None or arch == platform.machine():
        python_entry = (_tvm_libs(arch, device), *_tvm_ffi_source(arch, tvm_ffi_wheel))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    try:
        make_staging_dir(staging)
        _link_tree(artifact, staging / "artifact")
        python = _write_python_entry(staging, *python_entry) if python_entry else None
        if device == "cpu":
            _build_runner(staging / "bin", arch)
        weights = (staging / "artifact" / WEIGHTS).stat().st_size
        record = {
            "artifact": artifact.resolve().name, "target": target["name"], "arch": arch, "device": device,
            "tvm_version": manifest["tvm_version"], "tvm_ffi_version": metadata.version("apache-tvm-ffi"),
            "python": python,
            "mib": {part: _mib(_size(staging / part)) for part in ("artifact", "python", "bin")
                    if (staging / part).exists()},
            "mib_without_weights": _mib(_size(staging) - weights),
        }
        (staging / "bundle.json").write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _write_python_entry(root: Path, tvm_libs: list[Path], put_ffi: Callable[[Path], None], python_tag: str) -> str:
    """root/python/{awqc,tvm,tvm_ffi,typing_extensions.py} and the launcher root/awqc; the Python
    version it runs on."""
    import typing_extensions  # tvm-ffi's one dependency: a single pure-Python file

    python = root / "python"
    _copy_runtime_package(python / "awqc")
    shutil.copy2(typing_extensions.__file__, python / "typing_extensions.py")
    _copy_package(package_dir("tvm"), python / "tvm", _TVM_SKIP)
    (python / "tvm" / "lib").mkdir()
    for lib in tvm_libs:
        shutil.copy2(lib, python / "tvm" / "lib" / lib.name)
    put_ffi(python)
    major, minor = int(python_tag[2]), int(python_tag[3:])
    launcher = root / "awqc"
    launcher.write_text(LAUNCHER.format(major=major, minor=minor))
    launcher.chmod(0o755)
    return f"{major}.{minor}"


def _tvm_libs(arch: str, device: str) -> list[Path]:
    """libtvm_runtime (+ its CUDA part) for the device's architecture."""
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda" else [])
    lib_dir = package_dir("tvm") / "lib" if arch == platform.machine() else AARCH64_LIBS if arch == "aarch64" else None
    if lib_dir is None:
        raise BundleError(f"no TVM runtime for {arch} here; bundle on an {arch} or x86_64 machine")
    missing = [n for n in names if not (lib_dir / n).is_file()]
    if missing:
        fix = "run scripts/setup.sh" if lib_dir == AARCH64_LIBS else "reinstall apache-tvm"
        raise BundleError(f"{', '.join(missing)} for {arch} is not in {lib_dir}; {fix}")
    return [lib_dir / n for n in names]


def _tvm_ffi_source(arch: str, wheel: Path | None) -> tuple[Callable[[Path], None], str]:
    """(a function that puts tvm_ffi under a python/ dir, the CPython tag it is built for)."""
    if wheel is None:
        return (lambda python: _copy_package(package_dir("tvm_ffi"), python / "tvm_ffi", _FFI_SKIP),
                f"cp{sys.version_info.major}{sys.version_info.minor}")
    m = _WHEEL_NAME.match(wheel.name)
    if not wheel.is_file() or m is None:
        raise BundleError(f"{wheel} is not an apache-tvm-ffi wheel file (apache_tvm_ffi-VERSION-cpXY-cpXY-PLATFORM.whl)")
    if m["version"] != metadata.version("apache-tvm-ffi") or not m["plat"].endswith(arch):
        raise BundleError(f"{wheel.name} is tvm-ffi {m['version']} for {m['plat']}; the artifact needs tvm-ffi "
                          f"{metadata.version('apache-tvm-ffi')} for {arch}")
    return (lambda python: _unpack_ffi_wheel(wheel, python)), m["py"]


def _wheel_hint(arch: str) -> str:
    return ("pass --tvm-ffi-wheel with a tvm-ffi wheel for the device's Python, e.g. from `pip download --no-deps "
            f"--only-binary :all: --platform manylinux_2_28_{arch} --python-version 3.12 "
            f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}`")


def _unpack_ffi_wheel(wheel: Path, python: Path) -> None:
    """The wheel's tvm_ffi package, less its sources and headers. The wheel is the user's file:
    a member that would land outside python/tvm_ffi is refused."""
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                parts = name.split("/")
                if parts[0] != "tvm_ffi" or name.endswith("/") or (len(parts) > 2 and parts[1] in _FFI_SKIP):
                    continue
                if any(p in ("", ".", "..") or "\\" in p for p in parts):
                    raise BundleError(f"{wheel.name} holds a file named {name!r}, outside its package; "
                                      "use a wheel from PyPI")
                dest = python.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
    except zipfile.BadZipFile as err:
        raise BundleError(f"{wheel} is not a readable wheel ({err}); download it again") from None


def _copy_package(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """src's tree without `skip` (top-level entries) and bytecode caches."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or (Path(directory) == src and n in skip)]

    shutil.copytree(src, dst, ignore=ignore)


def _copy_runtime_package(dst: Path) -> None:
    """awqc/__init__.py and awqc/runtime/ (without the C++ runner's sources)."""
    import awqc
    import awqc.runtime

    dst.mkdir(parents=True)
    shutil.copy2(awqc.__file__, dst / "__init__.py")
    runtime = Path(awqc.runtime.__file__).parent
    shutil.copytree(runtime, dst / "runtime", ignore=shutil.ignore_patterns("__pycache__", "cpp"))


def _build_runner(bin_dir: Path, arch: str) -> None:
    try:
        if arch == "aarch64" and platform.machine() != "aarch64":
            build_runner(bin_dir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                build_runner(bin_dir, host_tvm_dir(Path(tmp)), "g++")
    except RunnerBuildError as err:
        raise BundleError(f"cannot build the C++ runner: {err}") from None


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links where the filesystem allows (multi-GB weights), copies elsewhere."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def _mib(n: int) -> float:
    return round(n / (1 << 20), 2)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
