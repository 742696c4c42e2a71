"""Lazy tensor readers for checkpoints: a tensor is read (and widened to float32) only when asked
for, so a compile holds one block of a model in memory, never the whole checkpoint.

* Hugging Face safetensors: every shard memory-mapped; bf16/f16 stay as stored until read.
* GGUF: the file memory-mapped by the `gguf` package; a tensor is dequantized when read, and
  llama.cpp's q/k row permutation (its converter interleaves RoPE halves for the `llama`
  architecture) is undone, as transformers' GGUF loader does.

Names are Hugging Face's, without the leading "model." (e.g. "layers.0.self_attn.q_proj.weight").
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Protocol

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (the message names the file and what to do)."""


class Checkpoint(Protocol):
    source: str

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


def _strip(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


class SafetensorsCheckpoint:
    """The *.safetensors shards of a Hugging Face checkpoint directory. Each read maps the shard
    afresh and unmaps it after, so the pages of tensors already read do not stay resident."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no *.safetensors weight files")
        self.source = str(directory)
        self._where: dict[str, tuple[Path, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():
                        self._where[_strip(name)] = (f, name)
                        self._shapes[_strip(name)] = tuple(handle.get_slice(name).get_shape())
            except (SafetensorError, OSError, RuntimeError) as err:
                raise CheckpointError(f"{f} is corrupt or truncated ({err}); re-download or re-save the "
                                      "checkpoint") from None

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        f, stored = self._where[name]
        try:
            with safe_open(str(f), framework="pt") as handle:
                return handle.get_tensor(stored).float().numpy()
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{f}: tensor {stored} cannot be read ({err}); re-download the checkpoint") from None


class GGUFCheckpoint:
    """The tensors of a GGUF file, under the Hugging Face names `hf_names` lists (the family's
    checkpoint names; gguf's name map finds each one's GGUF name). The caller has run
    check_gguf_header on it (the gguf package trusts the file's counts and lengths; the loader
    checks before transformers reads the header, so once is enough)."""

    def __init__(self, path: Path, n_heads: int, n_kv_heads: int, n_layers: int, hf_names: list[str]):
        import gguf
        try:
            reader = gguf.GGUFReader(str(path))
            arch = str(reader.fields["general.architecture"].contents())
        except Exception as err:  # noqa: BLE001  (the gguf package raises anything on a damaged file)
            raise CheckpointError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
        arches = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if any("_exps." in t.name for t in reader.tensors):  # llama.cpp stacks experts as ffn_*_exps
            raise CheckpointError(f"{path} is a mixture-of-experts GGUF, which awqc does not read yet; compile its "
                                  "Hugging Face checkpoint (Mixtral and Qwen3-MoE are supported from those)")
        if arch not in arches:
            raise CheckpointError(f"{path} declares GGUF architecture {arch!r}, which the gguf package does not know")
        name_map = gguf.get_tensor_name_map(arches[arch], n_layers)
        by_gguf = {t.name: t for t in reader.tensors}
        self.source = str(path)
        self._path = path
        self._permute = arch == "llama"  # llama.cpp's converter permutes q/k rows only for this arch
        self._heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
        # llama.cpp's converter stores Gemma's norm weights w (applied as 1 + w) as 1 + w
        self._norm_shift = 1.0 if arch in ("gemma2", "gemma3") else 0.0
        self._tensors = {}
        for hf in hf_names:
            stored = name_map.get_name(f"model.{hf}" if not hf.startswith("lm_head") else hf,
                                       try_suffixes=(".weight", ".bias"))
            if stored in by_gguf:
                self._tensors[hf] = by_gguf[stored]

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF lists dims innermost first

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{self._path}: tensor {t.name} cannot be read ({type(err).__name__}: {err})") from None
        proj = name.split(".")[-2]
        if self._permute and proj in self._heads:
            w = _unpermute_rope_rows(w, self._heads[proj])
        if self._norm_shift and name.endswith("norm.weight"):
            w = w - np.float32(self._norm_shift)
        w = np.ascontiguousarray(w)
        return w if w.flags.writeable else w.copy()  # F32 tensors are views of the read-only file map


# GGUF header limits. The gguf package (and transformers, through it) loops over and allocates by
# the counts and lengths the file declares, so a damaged header can make it run for hours or
# exhaust memory; check_gguf_header walks the header with every count bounded first.
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_MAX_KEY_BYTES = 64 << 10  # the GGUF spec caps keys at 65535 bytes
_MAX_NAME_BYTES = 64 << 10  # tensor names are short (llama.cpp: 64); this is a generous sanity cap
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 3  # real files hold flat arrays; nesting is legal but never deep
_RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # the gguf reader's own field names
# value type code -> byte size of a fixed-size value (8 string and 9 array are variable)
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
# smallest encoding of one entry: a KV is key length + type + a 1-byte value; a tensor info is
# name length + n_dims + one dim + type + offset
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_ELEMENT_BYTES = {**_GGUF_FIXED, _GGUF_STRING: 8, _GGUF_ARRAY: 4 + 8}


class _GGUFCursor:
    """Bounded little-endian reads over a memory-mapped file; reading past the end is a
    CheckpointError, never a short read that a later step would misinterpret."""

    def __init__(self, path: Path, data: mmap.mmap | bytes):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path} has a damaged GGUF header: {problem}; re-download the model file")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def skip(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends after {self.remaining()}")
        self.pos += n

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        start = self.pos
        self.skip(size, what)
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self, what: str, limit: int | None) -> bytes | None:
        """A u64-length string: its bytes when `limit` caps it, else skipped (None), so a long
        value string is never copied."""
        length = self.unpack("<Q", f"{what} length")
        if limit is not None and length > limit:
            raise self.fail(f"{what} at byte {self.pos - 8} is {length} bytes long (more than {limit})")
        start = self.pos
        self.skip(length, what)
        return None if limit is None else bytes(self.data[start:start + length])

    def text(self, what: str, limit: int) -> str:
        raw = self.string(what, limit)
        assert raw is not None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - len(raw)} is not UTF-8") from None


def check_gguf_header(path: Path) -> None:
    """Walk a GGUF file's header (magic, version, metadata KVs, tensor infos) with every count
    and length bounded by the bytes left, and every tensor's data inside the file; raises
    CheckpointError naming the file and the problem. Run it before anything else parses the file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 4 + 4 + 8 + 8:  # mmap refuses an empty file; nothing this short is GGUF
                raise CheckpointError(f"{path} is {size} bytes, too short to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk_gguf(_GGUFCursor(path, data))
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror or err}") from None


def _walk_gguf(cur: _GGUFCursor) -> None:
    magic = bytes(cur.data[0:4])
    if magic != _GGUF_MAGIC:
        raise CheckpointError(f"{cur.path} is not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in _GGUF_VERSIONS:
        raise cur.fail(f"version {version} (supported: {', '.join(map(str, _GGUF_VERSIONS))})")
    tensor_count = cur.unpack("<Q", "tensor count")
    kv_count = cur.unpack("<Q", "metadata count")
    # cheap first bound, before any loop runs `count` times
    if kv_count > cur.remaining() // _MIN_KV_BYTES:
        raise cur.fail(f"metadata count {kv_count} cannot fit in the {cur.remaining()} bytes left")
    if tensor_count > cur.remaining() // _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"tensor count {tensor_count} cannot fit in the {cur.remaining()} bytes left")
    alignment = _walk_kvs(cur, kv_count)
    tensors = [_walk_tensor_info(cur) for _ in range(tensor_count)]
    names = [name for name, _, _ in tensors]
    if len(set(names)) != len(names):
        raise cur.fail("two tensors have the same name")
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    data_size = max(0, len(cur.data) - data_start)
    for name, offset, nbytes in tensors:
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            raise cur.fail(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) runs past the end of the "
                           f"file ({data_size} bytes of tensor data); the file is truncated")


def _walk_kvs(cur: _GGUFCursor, count: int) -> int:
    """Check `count` metadata KVs; returns the data alignment (general.alignment, default 32)."""
    seen = set(_RESERVED_KEYS)
    alignment = 32
    for _ in range(count):
        key = cur.text("metadata key", _MAX_KEY_BYTES)
        if key in seen:
            raise cur.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = cur.unpack("<I", f"type of {key!r}")
        if key == "general.alignment":
            # the gguf reader takes only a u32 here, and the data offset is rounded up to it
            if vtype != _GGUF_UINT32:
                raise cur.fail(f"general.alignment has value type {vtype}, not u32 ({_GGUF_UINT32})")
            alignment = cur.unpack("<I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")
            continue
        _walk_value(cur, vtype, key, depth=0)
    return alignment


def _walk_value(cur: _GGUFCursor, vtype: int, key: str, depth: int) -> None:
    if vtype in _GGUF_FIXED:
        cur.skip(_GGUF_FIXED[vtype], f"value of {key!r}")
    elif vtype == _GGUF_STRING:
        cur.string(f"string value of {key!r}", None)
    elif vtype == _GGUF_ARRAY:
        if depth >= _MAX_ARRAY_DEPTH:
            raise cur.fail(f"{key!r} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        etype = cur.unpack("<I", f"element type of {key!r}")
        count = cur.unpack("<Q", f"element count of {key!r}")
        if etype not in _MIN_ELEMENT_BYTES:
            raise cur.fail(f"array {key!r} has unknown element type {etype}")
        if count * _MIN_ELEMENT_BYTES[etype] > cur.remaining():
            raise cur.fail(f"array {key!r} declares {count} elements, more than the {cur.remaining()} bytes left hold")
        if etype in _GGUF_FIXED:  # fixed-size elements: skip them in one step, not one by one
            cur.skip(count * _GGUF_FIXED[etype], f"elements of {key!r}")
        else:
            for _ in range(count):
                _walk_value(cur, etype, key, depth + 1)
    else:
        raise cur.fail(f"metadata {key!r} has unknown value type {vtype} (known: 0..12)")


def _walk_tensor_info(cur: _GGUFCursor) -> tuple[str, int, int]:
    """One tensor info; returns (name, data offset, byte size)."""
    import gguf

    name = cur.text("tensor name", _MAX_NAME_BYTES)
    n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
    dims = [cur.unpack("<Q", f"dimension of tensor {name!r}") for _ in range(n_dims)]
    raw_type = cur.unpack("<I", f"type of tensor {name!r}")
    offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    if min(dims) < 1:
        raise cur.fail(f"tensor {name!r} has shape {dims} with an empty dimension")
    if dims[0] % block_size:  # dims[0] is the innermost (contiguous) dimension
        raise cur.fail(f"tensor {name!r} has innermost dimension {dims[0]}, not a multiple of the "
                       f"{ggml_type.name} block size {block_size}")
    n_elements = 1
    for d in dims:  # Python ints: no overflow; the bound below rejects a huge product
        n_elements *= d
    nbytes = n_elements // block_size * type_size
    if nbytes > len(cur.data):
        raise cur.fail(f"tensor {name!r} has shape {dims} ({nbytes} bytes), larger than the file")
    return name, offset, nbytes


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head reordering of q/k rows (pairs interleaved → two halves)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
