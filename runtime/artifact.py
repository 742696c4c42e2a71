"""The artifact directory: manifest, file hashes, and a safetensors reader that needs only numpy."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
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
_MAX_ST_HEADER = 100 << 20  # safetensors' own cap
_MAX_MANIFEST_BYTES = 64 << 20  # the largest real manifests are a few hundred KB
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
    return {rel: sha256_file(root / rel) for rel in _tree_files(root) if rel != MANIFEST}


def _tree_files(root: Path) -> list[str]:
    """Every file under root as a relative POSIX path; a symbolic link anywhere is refused
    (it could point outside the artifact)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise ArtifactError(f"artifact {root} holds a symbolic link, {path.relative_to(root).as_posix()}; "
                                    "an artifact holds only its own files, recompile it")
        out += [(Path(dirpath) / n).relative_to(root).as_posix() for n in filenames]
    return sorted(out)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content, less this digest itself (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json sealed with its own digest, so an edit is caught like a damaged file."""
    sealed = {**manifest, "manifest_sha256": manifest_digest(manifest)}
    (root / MANIFEST).write_text(json.dumps(sealed, indent=2))


def read_manifest(root: Path) -> dict[str, Any]:
    """The artifact's manifest, checked against its digest and schema (manifest_schema.py)."""
    from .manifest_schema import check_manifest

    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory; create one with `awqc compile`")
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{path} is missing; {root} is not a complete awqc artifact, recompile it")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is {path.stat().st_size} bytes, more than a manifest ever is; recompile it")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # ValueError: also an integer over Python's 4300-digit limit
        raise ArtifactError(f"{path} is not valid JSON ({err}); recompile the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; recompile the artifact")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}; this runtime reads {FORMAT!r}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ArtifactError(f"{path} does not match its manifest_sha256 (edited or damaged); recompile the artifact")
    check_manifest(manifest, path)
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with its recorded sha256, and nothing is extra.
    (The schema check already refused paths that are absolute or climb out with '..'.)"""
    recorded: dict[str, str] = manifest["files"]
    present = _tree_files(root)
    for rel, digest in recorded.items():
        path = root / rel
        if rel not in present:
            raise ArtifactError(f"artifact file {rel} is missing from {root}; recompile the artifact")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"artifact file {rel} does not match its sha256 in the manifest (tampered or damaged); "
                "recompile the artifact")
    extra = set(present) - set(recorded) - {MANIFEST}
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
    """Read a safetensors file (8-byte header length, JSON header, raw little-endian data) as
    memory-mapped arrays. Every header field is checked before any data is touched: the header
    length is capped, dtypes known, each tensor's byte range inside the file and equal to its
    shape x itemsize, ranges non-overlapping."""
    try:
        size = path.stat().st_size
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as err:
        raise ArtifactError(f"{path} cannot be read: {err.strerror}") from None
    if size < 8:
        raise ArtifactError(f"{path} is truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    if header_len > min(_MAX_ST_HEADER, size - 8):
        raise ArtifactError(f"{path} declares a {header_len}-byte header in a {size}-byte file; it is truncated "
                            "or not a safetensors file")
    try:
        header = json.loads(data[8:8 + header_len].tobytes())
    except (ValueError, RecursionError) as err:
        raise ArtifactError(f"{path} has an unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has a safetensors header that is not a JSON object")
    base = 8 + header_len
    ranges = []
    for name, info in header.items():
        if name != "__metadata__":
            ranges.append((*_tensor_range(path, name, info, size - base), name))
    ranges.sort()
    for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
        if start < end:
            raise ArtifactError(f"{path}: tensors {a} and {b} overlap")
    out: dict[str, np.ndarray] = {}
    for start, end, name in ranges:
        info = header[name]
        out[name] = data[base + start:base + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def drop_pages(view: np.ndarray) -> None:
    """Tell the kernel that the mapped file pages behind `view` (an array of load_safetensors) are
    not needed any more: once a tensor is copied to the device, its pages leave this process's
    RSS instead of doubling it (the file is unchanged; a later access reads it again)."""
    owner = view
    while owner is not None and not isinstance(getattr(owner, "_mmap", None), mmap.mmap):
        owner = getattr(owner, "base", None)
    if owner is None or view.nbytes == 0:
        return
    offset = view.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    owner._mmap.madvise(mmap.MADV_DONTNEED, start, offset + view.nbytes - start)


def _tensor_range(path: Path, name: str, info: Any, data_size: int) -> tuple[int, int]:
    """The checked (start, end) byte range of one tensor's header entry."""
    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{path}: tensor {name!r} {problem}; the file is damaged")

    if not isinstance(info, dict):
        raise bad("has no header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:  # a list or dict is unhashable: a TypeError
        raise bad(f"has dtype {dtype!r}, not one of {', '.join(_ST_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
        raise bad(f"has shape {shape!r}")
    # numpy refuses (ValueError) any shape whose non-zero dims times the itemsize overflow its
    # index type, even when a zero dim makes the tensor empty
    if int(np.prod([max(d, 1) for d in shape], dtype=object)) * np.dtype(_ST_DTYPES[dtype]).itemsize >= 1 << 62:
        raise bad(f"has shape {shape}, too large for an array")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}")
    start, end = offsets
    if not start <= end <= data_size:
        raise bad(f"has data_offsets {offsets} outside the {data_size} bytes of data")
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if nbytes != end - start:
        raise bad(f"has shape {shape} ({nbytes} bytes) but {end - start} bytes of data")
    return start, end


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62
