#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-quantize, llama-perplexity, llama-imatrix) from
# the source tree inside the llama-cpp-python sdist, the baseline every speed table is measured
# against. Cached under .cache/llama.cpp; ~15 min on 2 cores the first time.
set -euo pipefail
VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/llama.cpp"
BIN="$CACHE/src/vendor/llama.cpp/build/bin"
if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-quantize" ]]; then
    echo "$BIN"; exit 0
fi
mkdir -p "$CACHE"
if [[ ! -d "$CACHE/src" ]]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
    mv "$CACHE/llama_cpp_python-$VERSION" "$CACHE/src"
fi
cd "$CACHE/src/vendor/llama.cpp"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build build --target llama-bench llama-quantize llama-perplexity llama-imatrix >&2
echo "$BIN"
