#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-quantize, llama-perplexity, llama-imatrix) from
# the source tree inside the llama-cpp-python sdist, the baseline every speed table is measured
# against. Cached under .cache/llama.cpp; ~15 min on 2 cores the first time.
set -euo pipefail
VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/llama.cpp"
BIN="$CACHE/src/vendor/llama.cpp/build/bin"
if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-quantize" && -f "$CACHE/built-without-amx" ]]; then
    echo "$BIN"; exit 0
fi
mkdir -p "$CACHE"
if [[ ! -d "$CACHE/src" ]]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
    mv "$CACHE/llama_cpp_python-$VERSION" "$CACHE/src"
fi
cd "$CACHE/src/vendor/llama.cpp"
# -march=native, except where the CPU reports AMX: virtual machines often do not grant the AMX
# tile state, and ggml's AMX kernels then die with SIGILL (seen on this project's Xeon VMs), so
# there the x86 features are listed one by one without AMX.
arch=(-DGGML_NATIVE=ON)
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null) "
if [[ "$flags" == *" amx_tile "* ]]; then
    arch=(-DGGML_NATIVE=OFF)
    for pair in avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        [[ "$flags" == *" ${pair%%:*} "* ]] && arch+=("-DGGML_${pair##*:}=ON")
    done
fi
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${arch[@]}" >&2
cmake --build build --target llama-bench llama-quantize llama-perplexity llama-imatrix >&2
touch "$CACHE/built-without-amx"  # this script's build flags (a cache from an older script rebuilds)
echo "$BIN"
