"""The artifact directory: manifest, file hashes, and a safetensors reader that needs only numpy."""
from __future__ import annotations

import hashlib
import json
import platform
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "awqc-artifact/1"
MANIFEST = "manifest.json"
LIBRARY = "lib.so"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"
# Packed int4 weight layouts this runtime accepts (schedules/layouts.py; this module imports
# nothing from the compiler, so the names are listed here): "k8", "i{L}r{R}" (nibbles
# interleaved over L SIMD lanes, tiles of R rows) and "d{L}" (W4A8: L rows in the lanes of an
# integer dot product). The runtime only hands the arrays to the
# library, whose kernels read the layout the manifest names.
KNOWN_LAYOUTS = ("k8", *(f"i{lanes}r{rows}" for lanes in (4, 8, 16) for rows in (1, 2, 4, 8, 16)), "d8", "d16")

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "U32": np.uint32, "U8": np.uint8,
              "I8": np.int8, "I64": np.int64}


class ArtifactError(ValueError):
    """The artifact is missing, damaged, or built for something this runtime cannot run."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by relative POSIX path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory; create one with `awqc compile`")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {root} is not a complete awqc artifact, recompile it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); recompile the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}; this runtime reads {FORMAT!r}")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with its recorded sha256, and nothing is extra."""
    recorded: dict[str, str] = manifest["files"]
    for rel, digest in recorded.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {root}; recompile the artifact")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"artifact file {rel} does not match its sha256 in the manifest (tampered or damaged); "
                "recompile the artifact")
    extra = set(hash_tree(root)) - set(recorded)
    if extra:
        raise ArtifactError(f"artifact {root} holds files the manifest does not list: {', '.join(sorted(extra))}")


def check_compatible(manifest: dict[str, Any], tvm_version: str) -> None:
    """Refuse an artifact built for another machine architecture or TVM version."""
    arch = manifest["target"]["arch"]
    if arch != platform.machine():
        raise ArtifactError(
            f"the artifact was built for {arch} (target {manifest['target']['name']}) but this machine is "
            f"{platform.machine()}; compile it for this machine with --target host")
    quant = manifest.get("quantization")
    if quant and quant["layout"] not in KNOWN_LAYOUTS:
        raise ArtifactError(
            f"the artifact's int4 weights use layout {quant['layout']!r}, which this runtime does not know "
            f"(known: {', '.join(KNOWN_LAYOUTS)}); upgrade awqc or recompile the artifact")
    if manifest["tvm_version"] != tvm_version:
        raise ArtifactError(
            f"the artifact was built with TVM {manifest['tvm_version']} but this runtime has TVM {tvm_version}; "
            "install the same TVM or recompile")


def check_device(manifest: dict[str, Any], device_available: Callable[[str], bool], requested: str | None) -> str:
    """The TVM device kind to run the artifact on ("cpu", "cuda"); refuses a device this host
    lacks, or one other than the kind its kernels were compiled for. `device_available(kind)`
    asks the TVM runtime (this module does not import TVM)."""
    target = manifest["target"]
    kind = target.get("device", "cpu")
    aliases = {"llvm": "cpu", "gpu": "cuda"}
    if requested is not None and aliases.get(requested.split(":")[0], requested.split(":")[0]) != kind:
        raise ArtifactError(f"this artifact targets {target['name']} ({kind} kernels) and cannot run on "
                            f"device {requested!r}; compile it with --target host for the CPU")
    if kind != "cpu" and not device_available(kind):
        raise ArtifactError(f"this artifact targets {target['name']} but no {kind.upper()} device is available; "
                            "compile with --target host")
    return kind


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ArtifactError(f"{path} is truncated")
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    if 8 + header_len > data.size:
        raise ArtifactError(f"{path} is truncated")
    header = json.loads(data[8:8 + header_len].tobytes())
    base = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > data.size:
            raise ArtifactError(f"{path} is truncated at tensor {name}")
        dtype = _ST_DTYPES[info["dtype"]]
        out[name] = data[base + start:base + end].view(dtype).reshape(info["shape"])
    return out
