#!/usr/bin/env bash
# The whole GPU check on a bare machine (Python 3.12, torch, numpy, tokenizers; no TVM, no PyPI):
#   bench/gpu/run.sh PAYLOAD_DIR [OUT_DIR]
# PAYLOAD_DIR is what bench/gpu/prepare.py wrote (with --dry-run: the same check on this CPU).
# Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md (OUT_DIR defaults to $OUT, else ./gpu-check); exits 1
# if a kernel or the tiny model disagrees with numpy / the host build. Stops itself at 7.5 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
payload=$(cd "${1:?usage: bench/gpu/run.sh PAYLOAD_DIR [OUT_DIR]}" && pwd)
out=${2:-${OUT:-$PWD/gpu-check}}
py=${PYTHON:-python3}
want=$(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' "$payload/bundle/bundle.json")
if ! "$py" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$want')"; then
  echo "error: the payload's tvm-ffi is built for Python $want; run with PYTHON=python$want or prepare it for this Python" >&2
  exit 2
fi
mkdir -p "$out"
# TVM's runtime only, from the bundle (no compiler library); -P: nothing from the working directory
export PYTHONPATH="$payload/bundle/python" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
timeout 450 "$py" -P "$here/device.py" "$payload" "$out" 2>&1 | tee "$out/log.txt"
