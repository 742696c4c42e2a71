"""Property-based fuzzing of the three parsers that read untrusted files:

* `load_safetensors` (runtime/artifact.py): bit flips (mostly in the length and JSON header),
  truncation, a replaced header length, a replaced or edited JSON header, appended garbage;
* the manifest (`read_manifest`, `verify_files`, `check_compatible`, `check_device`): the JSON
  dict edited at any depth and re-sealed with `write_manifest`, so the schema check is what
  refuses it (not just the digest), plus raw byte damage that is not re-sealed;
* `check_gguf_header` (compiler/checkpoints.py): bit flips biased to the header, truncation,
  u64 counts/lengths and u32 types replaced at real field offsets, one key or tensor name
  copied over another (duplicates), appended garbage.

The property each time: a mutated input ends in the parser's own error (ArtifactError,
CheckpointError) or a correct load, never another exception, a hang or a crash; a GGUF file the
checker passes must open in `gguf.GGUFReader`. Crashers found here are kept as plain regression
tests below the properties.

Each of the four properties runs under the "fuzz" hypothesis profile (75 examples, 300 in all)
in the default run; the long run (profile "long", 5000 examples per property) is marked slow:

    python -m pytest -m slow tests/test_fuzz.py
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awqc.compiler.checkpoints import CheckpointError, check_gguf_header
from awqc.compiler.tensor_file import SafetensorsWriter
from awqc.runtime.artifact import (ArtifactError, check_compatible, check_device, load_safetensors, read_manifest,
                                   verify_files, write_manifest)

# database=None: no example database is kept (hypothesis still caches a self-ignored .hypothesis/);
# a failure prints its reproducing input, to be pasted into the regression cases below.
settings.register_profile("fuzz", max_examples=75, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", settings.get_profile("fuzz"), max_examples=5000)
PROFILES = [pytest.param("fuzz", id="fuzz"), pytest.param("long", id="long", marks=pytest.mark.slow)]


def run_property(profile: str, strategy: st.SearchStrategy, prop: Callable[[Any], None]) -> None:
    """Run `prop` on inputs drawn from `strategy` under the named hypothesis profile."""
    settings(settings.get_profile(profile))(given(strategy)(prop))()


# ---------------------------------------------------------------- shared strategies

# Any JSON value; leaves include the edge values schemas trip on.
JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
               | st.sampled_from([0, -1, 1, 2, 1 << 20, (1 << 20) + 1, 1 << 62, 1 << 64, "", "cuda", "k8"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def flip_bit(raw: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(raw)
    out[pos % len(out)] ^= 1 << bit
    return bytes(out)


@st.composite
def byte_positions(draw: st.DrawFn, size: int, header_end: int) -> int:
    """A byte position in a file of `size` bytes, three times in four inside its header."""
    if size == 0:
        return 0
    if draw(st.integers(0, 3)) and header_end > 0:
        return draw(st.integers(0, min(header_end, size) - 1))
    return draw(st.integers(0, size - 1))


U64_VALUES = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 300),
                       st.sampled_from([(1 << 64) - 1, 1 << 63, (1 << 62) + 1, 1 << 32, (1 << 32) - 1]))


# ---------------------------------------------------------------- 1. safetensors

ST_TENSORS = {
    "w.f32": (np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5),
    "h.f16": np.array([1.0, -2.0, 3.5, 0.0], np.float16),
    "idx.u32": np.arange(6, dtype=np.uint32).reshape(3, 2) * 1000003,
    "b.u8": np.arange(5, dtype=np.uint8),
    "empty.u8": np.zeros((0, 3), np.uint8),
}


@functools.lru_cache(maxsize=None)
def safetensors_file() -> tuple[bytes, int]:
    """A valid file holding ST_TENSORS (bytes, header length)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        w = SafetensorsWriter(path, list(ST_TENSORS))
        for name, a in ST_TENSORS.items():
            w.write(name, a)
        w.close()
        raw = path.read_bytes()
    return raw, struct.unpack("<Q", raw[:8])[0]


def st_header() -> dict[str, Any]:
    raw, header_len = safetensors_file()
    return json.loads(raw[8:8 + header_len])


def st_with_header(header: Any, pad: int) -> bytes:
    """The original file's data behind a new JSON header (and its true length)."""
    raw, header_len = safetensors_file()
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + raw[8 + header_len:]


ITEMSIZES = {"F32": 4, "F16": 2, "U32": 4, "U8": 1, "I32": 4, "I8": 1, "I64": 8}
ST_DTYPES = st.sampled_from(["F32", "F16", "U32", "U8", "I32", "I8", "I64", "BF16", "F64", "f32", "", "U8 "]) | JSON_VALUES
# dims: small, huge but in range (two of them overflow numpy's index type), and invalid ones
ST_DIMS = st.one_of(st.integers(0, 8), st.integers(0, 8), st.sampled_from([1 << 31, 1 << 40, (1 << 62) - 1]),
                    st.integers(-3, -1) | st.integers(1 << 62, 1 << 64) | st.booleans() | st.floats()
                    | st.text(max_size=2) | st.none())
ST_SHAPES = st.lists(ST_DIMS, max_size=10) | JSON_VALUES


def st_offsets(data_size: int) -> st.SearchStrategy:
    ints = st.integers(-4, data_size + 8) | st.integers() | st.booleans() | st.floats()
    return st.lists(ints, max_size=3) | st.tuples(ints, ints).map(list) | JSON_VALUES


@st.composite
def st_entries(draw: st.DrawFn, data_size: int) -> Any:
    """A tensor entry: a dict with some of the three fields, or any JSON value."""
    if draw(st.booleans()):
        return draw(JSON_VALUES)
    fields = {"dtype": ST_DTYPES, "shape": ST_SHAPES, "data_offsets": st_offsets(data_size)}
    return draw(st.fixed_dictionaries({}, optional=fields))


@st.composite
def edited_headers(draw: st.DrawFn) -> Any:
    """The original header with a few edits, or (one time in six) a wholly generated one."""
    raw, header_len = safetensors_file()
    data_size = len(raw) - 8 - header_len
    if draw(st.integers(0, 5)) == 0:
        return draw(st.dictionaries(st.text(max_size=6), st_entries(data_size), max_size=5) | JSON_VALUES)
    header = st_header()
    for _ in range(draw(st.integers(1, 3))):
        names = [n for n in header if n != "__metadata__"] or ["x"]
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["field", "drop-field", "entry", "drop", "add", "metadata", "swap", "consistent"]))
        entry = header.get(name)
        if kind == "consistent":
            # length = shape x itemsize, so only the checks past the per-field ones (file bounds,
            # overlap, numpy's array size limit) can refuse it
            dtype = draw(st.sampled_from(sorted(ITEMSIZES)))
            shape = draw(st.lists(st.integers(0, 8) | st.sampled_from([1 << 31, 1 << 40, (1 << 62) - 1]), max_size=4))
            bounds = sorted({o for e in st_header().values() for o in e.get("data_offsets", ())})
            start = draw(st.sampled_from(bounds) | st.integers(0, data_size))  # mostly at a tensor boundary
            header[name] = {"dtype": dtype, "shape": shape,
                            "data_offsets": [start, start + ITEMSIZES[dtype] * int(np.prod(shape, dtype=object))]}
        elif kind == "field" and isinstance(entry, dict):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            strategy = {"dtype": ST_DTYPES, "shape": ST_SHAPES, "data_offsets": st_offsets(data_size)}[field]
            entry[field] = draw(strategy)
        elif kind == "drop-field" and isinstance(entry, dict) and entry:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif kind == "entry":
            header[name] = draw(st_entries(data_size))
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "add":
            header[draw(st.text(max_size=6))] = draw(st_entries(data_size))
        elif kind == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
        elif kind == "swap":  # two tensors trade data ranges: overlaps, wrong lengths
            other = draw(st.sampled_from(names))
            a, b = header.get(name), header.get(other)
            if isinstance(a, dict) and isinstance(b, dict):
                a["data_offsets"], b["data_offsets"] = b.get("data_offsets"), a.get("data_offsets")
    return header


@st.composite
def mutated_safetensors(draw: st.DrawFn) -> bytes:
    """The valid file after one to three mutations."""
    raw, header_len = safetensors_file()
    out = raw
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "length", "header", "header", "append"]))
        if kind == "flip" and out:
            out = flip_bit(out, draw(byte_positions(len(out), 8 + header_len)), draw(st.integers(0, 7)))
        elif kind == "truncate":
            out = out[:draw(st.integers(0, len(out)))]
        elif kind == "length" and len(out) >= 8:
            near = st.integers(max(0, header_len - 16), header_len + 16)
            value = draw(U64_VALUES | near | st.sampled_from([100 << 20, (100 << 20) + 1]))
            out = struct.pack("<Q", value) + out[8:]
        elif kind == "header":
            out = st_with_header(draw(edited_headers()), draw(st.integers(0, 8)))
        elif kind == "append":
            out = out + draw(st.binary(min_size=1, max_size=64))
    return out


def check_safetensors(path: Path, raw: bytes) -> None:
    """The property: an ArtifactError, or arrays that lie within the file (equal to the
    originals when the file is unchanged)."""
    path.unlink(missing_ok=True)  # a new inode: earlier examples' memory maps never see a truncation
    path.write_bytes(raw)
    try:
        out = load_safetensors(path)
    except ArtifactError:
        return
    assert isinstance(out, dict)
    assert all(isinstance(a, np.ndarray) for a in out.values())
    assert sum(a.nbytes for a in out.values()) <= len(raw)
    if raw == safetensors_file()[0]:
        assert set(out) == set(ST_TENSORS)
        for name, a in ST_TENSORS.items():
            np.testing.assert_array_equal(out[name], a)
            assert out[name].dtype == a.dtype


def test_safetensors_unchanged_file_loads() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_safetensors(Path(tmp) / "w.safetensors", safetensors_file()[0])
        assert len(load_safetensors(Path(tmp) / "w.safetensors")) == len(ST_TENSORS)


@pytest.mark.parametrize("profile", PROFILES)
def test_safetensors_fuzz(profile: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        run_property(profile, mutated_safetensors(), lambda raw: check_safetensors(path, raw))


def _header_edit(name: str, **fields: Any) -> dict[str, Any]:
    header = st_header()
    header[name].update(fields)
    return header


# Crashers the fuzzer found (a TypeError and a numpy ValueError before the fix, now ArtifactErrors).
ST_REGRESSIONS = {
    "unhashable-dtype-list": _header_edit("w.f32", dtype=[]),
    "unhashable-dtype-dict": _header_edit("b.u8", dtype={}),
    # empty (a zero dim) but 2**62 elements of the other dims: numpy cannot make the array
    "empty-tensor-too-big-for-numpy": _header_edit("w.f32", dtype="F16", shape=[0, 1 << 31, 1 << 31],
                                                   data_offsets=[0, 0]),
    "empty-tensor-huge-dims": _header_edit("empty.u8", shape=[0, (1 << 62) - 1, (1 << 62) - 1]),
}


@pytest.mark.parametrize("case", sorted(ST_REGRESSIONS))
def test_safetensors_regressions(case: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        path.write_bytes(st_with_header(ST_REGRESSIONS[case], 0))
        with pytest.raises(ArtifactError, match="the file is damaged"):
            load_safetensors(path)


# ---------------------------------------------------------------- 2. manifest

@pytest.fixture(scope="module")
def artifact_copy(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> tuple[Path, bytes]:
    """A copy of the tiny artifact whose manifest.json the examples overwrite (and its
    original bytes, restored after each test)."""
    root = tmp_path_factory.mktemp("fuzz-art") / "art"
    shutil.copytree(tiny_artifact, root)
    return root, (root / "manifest.json").read_bytes()


def load_artifact(root: Path) -> None:
    """Every check the engine runs on an artifact before it trusts the manifest."""
    import tvm

    manifest = read_manifest(root)
    verify_files(root, manifest)
    check_compatible(manifest, tvm.__version__)
    check_device(manifest, lambda kind: False, None)


def check_manifest_bytes(root: Path, raw: bytes) -> None:
    """The property: the artifact loads, or an ArtifactError."""
    (root / "manifest.json").write_bytes(raw)
    try:
        load_artifact(root)
    except ArtifactError:
        pass


def json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """The path (keys and indices) of every value inside obj, obj itself first."""
    out = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out += json_paths(v, prefix + (k,))
    return out


def resolve(obj: Any, path: tuple) -> tuple[Any, Any] | None:
    """(container, key) of the value at path, or None where an earlier edit removed it."""
    for k in path[:-1]:
        try:
            obj = obj[k]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(obj, dict) and path[-1] in obj or isinstance(obj, list) and isinstance(path[-1], int) \
            and path[-1] < len(obj):
        return obj, path[-1]
    return None


BAD_FILE_NAMES = ["../x", "/etc/passwd", "a/../../b", "", ".", "..", "a\0b", "lib.so\0", "./lib.so", "a//b",
                  "tokenizer/", "a\\b", "C:\\x", "tokenizer/../lib.so", "manifest.json", "lib.so/x", "tokenizer"]
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)


MANIFEST_WORDS = st.sampled_from(["", "cpu", "cuda", "gpu", "llvm", "x86_64", "aarch64", "host", "k8", "i8r4",
                                  "d8", "awqc-artifact/1", "awqc-artifact/2", "float32"])


def same_type_values(value: Any) -> st.SearchStrategy:
    """Values of the JSON type `value` has: these get past the type checks to the range checks."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers() | st.sampled_from([0, -1, 1, 2, 127, 128, 129, 1 << 20, (1 << 20) + 1, 1 << 63])
    if isinstance(value, str):
        return st.text(max_size=12) | MANIFEST_WORDS
    if isinstance(value, list):
        return st.lists(JSON_LEAVES | MANIFEST_WORDS, max_size=4)
    return JSON_VALUES


# A well-formed quantization entry (the tiny artifact is float32, so it has none), whose layout
# check_compatible must refuse or accept.
QUANTIZATION = st.fixed_dictionaries({
    "method": st.sampled_from(["awq", None]), "scheme": st.sampled_from(["w4a16", "w4a8"]), "bits": st.just(4),
    "group_size": st.sampled_from([32, 128]), "symmetric": st.booleans(), "quantized": st.just([]),
    "layout": st.sampled_from(["k8", "i8r4", "i16r16", "d8", "d16", "i4r3", "d4", "K8", ""]) | st.text(max_size=6)})


@st.composite
def edited_manifests(draw: st.DrawFn, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest after one to three edits at any depth."""
    out = copy.deepcopy(manifest)
    paths = sorted((p for p in json_paths(manifest) if p), key=len)  # shallow keys first: hypothesis favours them
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "replace", "same-type", "same-type", "file", "file-digest", "quant"]))
        if kind == "quant":
            out["quantization"] = draw(QUANTIZATION)
            continue
        if kind == "file":  # a path entry that must not escape the artifact
            name = draw(st.sampled_from(BAD_FILE_NAMES) | st.text(max_size=8))
            out.setdefault("files", {})
            if isinstance(out["files"], dict):
                out["files"][name] = draw(HEX64 | st.sampled_from(sorted(manifest["files"].values())) | JSON_LEAVES)
            continue
        if kind == "file-digest":  # a listed file under a new name, or with a new digest
            name = draw(st.sampled_from(sorted(manifest["files"])))
            files = out.get("files")
            if isinstance(files, dict) and name in files:
                new = draw(st.sampled_from(BAD_FILE_NAMES) | st.just(name))
                files[new] = files.pop(name) if new != name else draw(HEX64)
            continue
        where = resolve(out, draw(st.sampled_from(paths)))
        if where is None:
            continue
        container, key = where
        if kind == "delete":
            del container[key]
        elif kind == "replace":
            container[key] = draw(JSON_VALUES)
        else:
            container[key] = draw(same_type_values(container[key]))
    return out


@st.composite
def damaged_manifest_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    """manifest.json bytes damaged without re-sealing."""
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "json", "binary"]))
    if kind == "flip":
        out = raw
        for _ in range(draw(st.integers(1, 4))):
            out = flip_bit(out, draw(st.integers(0, len(out) - 1)), draw(st.integers(0, 7)))
        return out
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw)))]
    if kind == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(max_size=16) | st.sampled_from([b"1" * 5000, b"[" * 100000, b"\xff"])) + raw[at:]
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    return draw(st.binary(max_size=64))


def test_manifest_unchanged_artifact_loads(artifact_copy: tuple[Path, bytes]) -> None:
    root, raw = artifact_copy
    check_manifest_bytes(root, raw)
    load_artifact(root)  # passes: the fuzz starts from an artifact the runtime accepts


@pytest.mark.parametrize("profile", PROFILES)
def test_manifest_resealed_fuzz(profile: str, artifact_copy: tuple[Path, bytes]) -> None:
    root, raw = artifact_copy
    manifest = json.loads(raw)

    def prop(edited: dict[str, Any]) -> None:
        write_manifest(root, edited)  # re-sealed: the schema, not the digest, must refuse it
        try:
            load_artifact(root)
        except ArtifactError:
            pass

    try:
        run_property(profile, edited_manifests(manifest), prop)
    finally:
        (root / "manifest.json").write_bytes(raw)


@pytest.mark.parametrize("profile", PROFILES)
def test_manifest_bytes_fuzz(profile: str, artifact_copy: tuple[Path, bytes]) -> None:
    root, raw = artifact_copy
    try:
        run_property(profile, damaged_manifest_bytes(raw), lambda damaged: check_manifest_bytes(root, damaged))
    finally:
        (root / "manifest.json").write_bytes(raw)


# Crasher: an integer literal over Python's 4300-digit limit raised a plain ValueError from
# json.loads, not an ArtifactError (the deep nesting was already caught; kept as a neighbour).
@pytest.mark.parametrize("text", [b'{"format": ' + b"1" * 5000 + b"}", b"[" * 100000],
                         ids=["int-over-4300-digits", "nested-100000-deep"])
def test_manifest_regressions(text: bytes, artifact_copy: tuple[Path, bytes]) -> None:
    root, raw = artifact_copy
    try:
        (root / "manifest.json").write_bytes(text)
        with pytest.raises(ArtifactError, match="not valid JSON"):
            read_manifest(root)
    finally:
        (root / "manifest.json").write_bytes(raw)


# ---------------------------------------------------------------- 3. GGUF header

def write_gguf(path: Path) -> None:
    """A small llama-arch GGUF: a KV of every value type (string arrays included), a custom
    alignment, and F32, F16 and Q8_0 tensors. Keys test.v0..v9 and the blk.0/blk.1 tensor
    names are one bit apart, so a single flip can make two of them equal."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("test.v0", 7)
    w.add_int8("test.v1", -7)
    w.add_uint16("test.v2", 700)
    w.add_int16("test.v3", -700)
    w.add_uint32("llama.context_length", 64)
    w.add_int32("test.v4", -70000)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("test.v5", True)
    w.add_string("general.name", "fuzz")
    w.add_uint64("test.v6", 1 << 40)
    w.add_int64("test.v7", -(1 << 40))
    w.add_float64("test.v8", 0.25)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "bc", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.5, -1.0, 2.0, 1.5])
    w.add_array("test.v9", [[1, 2], [3]])  # nested
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((5, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(8).astype(np.float16))
    w.add_tensor("blk.1.attn_norm.weight", rng.standard_normal(8).astype(np.float32))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class GGUFLayout(NamedTuple):
    """The valid file's bytes and where its fields lie (from the parts gguf.GGUFReader parsed)."""
    raw: bytes
    data_start: int  # where tensor data begins
    u64: tuple[int, ...]  # offsets of u64 fields: counts, lengths, dims, tensor offsets
    u32: tuple[int, ...]  # offsets of u32 fields: value types, n_dims, ggml types
    names: tuple[tuple[int, int], ...]  # (offset, length) of every key and tensor name


@functools.lru_cache(maxsize=None)
def gguf_file() -> GGUFLayout:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        write_gguf(path)
        reader = gguf.GGUFReader(str(path))
        base = reader.data.ctypes.data
        u64, u32, names = set(), set(), set()
        for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
            if field.name.startswith("GGUF."):  # the reader's own pseudo-fields (counts, version)
                u32.add(4)
                u64.update((8, 16))
                continue
            name = field.parts[1]  # parts: name length, name bytes, ...
            names.add((name.ctypes.data - base, name.size))
            for part in field.parts:
                if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8):
                    offsets = u64 if part.dtype.itemsize == 8 else u32
                    offsets.update(part.ctypes.data - base + i * part.dtype.itemsize for i in range(part.size))
        layout = GGUFLayout(path.read_bytes(), reader.data_offset, tuple(sorted(u64)), tuple(sorted(u32)),
                            tuple(sorted(names)))
        del reader
        return layout


@st.composite
def mutated_gguf(draw: st.DrawFn) -> bytes:
    """The valid file after one to three mutations."""
    layout = gguf_file()
    out = layout.raw
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "u64", "u64", "u32", "name", "append"]))
        if kind == "flip" and out:
            out = flip_bit(out, draw(byte_positions(len(out), layout.data_start)), draw(st.integers(0, 7)))
        elif kind == "truncate":
            out = out[:draw(st.integers(0, len(out)))]
        elif kind == "u64":
            at = draw(st.sampled_from(layout.u64))
            out = out[:at] + struct.pack("<Q", draw(U64_VALUES)) + out[at + 8:]
        elif kind == "u32":
            at = draw(st.sampled_from(layout.u32))
            value = draw(st.integers(0, 40) | st.integers(0, (1 << 32) - 1))
            out = out[:at] + struct.pack("<I", value) + out[at + 4:]
        elif kind == "name":  # one key or tensor name copied over another: duplicates, other keys
            (src, n), (dst, m) = draw(st.sampled_from(layout.names)), draw(st.sampled_from(layout.names))
            out = out[:dst] + layout.raw[src:src + min(n, m)] + out[dst + min(n, m):]
        elif kind == "append":
            out = out + draw(st.binary(min_size=1, max_size=64))
    return out


def check_gguf(path: Path, raw: bytes) -> None:
    """The property: CheckpointError, or a header gguf.GGUFReader then opens."""
    import gguf

    path.unlink(missing_ok=True)
    path.write_bytes(raw)
    try:
        check_gguf_header(path)
    except CheckpointError:
        return
    reader = gguf.GGUFReader(str(path))  # must not raise: the checker passed it
    assert len(reader.tensors) <= len(raw)


def test_gguf_valid_file_passes() -> None:
    import gguf

    raw = gguf_file().raw
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        path.write_bytes(raw)
        check_gguf_header(path)
        reader = gguf.GGUFReader(str(path))
        assert [t.name for t in reader.tensors] == ["token_embd.weight", "blk.0.attn_norm.weight",
                                                   "blk.1.attn_norm.weight", "blk.0.attn_q.weight"]
        assert reader.alignment == 64 and reader.data_offset % 64 == 0
        assert reader.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "</s>", "a", "bc", ""]


def test_default_model_gguf_passes() -> None:
    from awqc.compiler.model_import import default_model_path

    check_gguf_header(default_model_path())


@pytest.mark.parametrize("profile", PROFILES)
def test_gguf_fuzz(profile: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        run_property(profile, mutated_gguf(), lambda raw: check_gguf(path, raw))


def test_gguf_loader_checks_header(tmp_path: Path) -> None:
    """Loading a GGUF refuses a damaged header before transformers or the gguf package read it."""
    from awqc.compiler.model_import import ModelImportError, load_model

    raw = gguf_file().raw
    path = tmp_path / "m.gguf"
    path.write_bytes(raw[:16] + struct.pack("<Q", 1 << 60) + raw[24:])  # kv_count
    with pytest.raises(ModelImportError, match="metadata count 1152921504606846976 cannot fit"):
        load_model(str(path))


# Hand-made headers, to check each problem gets its own message.

def g_str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def g_kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return g_str(key) + struct.pack("<I", vtype) + payload


def g_tensor(name: bytes, dims: list[int], ggml_type: int, offset: int = 0) -> bytes:
    return (g_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset))


def g_file(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", version: int = 3,
           counts: tuple[int, int] | None = None, magic: bytes = b"GGUF") -> bytes:
    """A GGUF file: header, KVs, tensor infos, padding to 32 bytes, data."""
    n_tensors, n_kvs = counts or (len(tensors), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kvs) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


U32_KV = g_kv(b"a.u32", 4, struct.pack("<I", 1))
F32_T = g_tensor(b"t", [4], 0)  # 4 floats, 16 bytes
BAD_GGUF = {
    "short": (b"GGUF\x03\0\0\0", "too short to be a GGUF file"),
    "magic": (g_file(magic=b"GGML"), "is not a GGUF file"),
    "version": (g_file(version=1), "version 1 "),
    "kv-count": (g_file([U32_KV], counts=(0, 1 << 40)), "metadata count 1099511627776 cannot fit"),
    "tensor-count": (g_file(counts=(1 << 40, 0)), "tensor count 1099511627776 cannot fit"),
    "key-length": (g_file([g_kv(b"k" * 70000, 4, b"\0" * 4)]), "metadata key at byte 24 is 70000 bytes long"),
    "key-past-end": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 100) + b"k" * 10, "needs 100 bytes but the file ends"),
    "key-utf8": (g_file([g_kv(b"\xff\xfe", 4, b"\0" * 4)]), "metadata key at byte 32 is not UTF-8"),
    "duplicate-key": (g_file([U32_KV, U32_KV]), "'a.u32' appears twice"),
    "reserved-key": (g_file([g_kv(b"GGUF.kv_count", 4, b"\0" * 4)]), "'GGUF.kv_count' appears twice"),
    "value-type": (g_file([g_kv(b"k", 13, b"\0" * 8)]), "unknown value type 13"),
    "string-past-end": (g_file([g_kv(b"k", 8, struct.pack("<Q", 1 << 50))]), "string value of 'k'"),
    "array-count": (g_file([g_kv(b"k", 9, struct.pack("<IQ", 4, 1 << 60))]),
                    "declares 1152921504606846976 elements"),
    "string-array-count": (g_file([g_kv(b"k", 9, struct.pack("<IQ", 8, 1 << 20))]), "declares 1048576 elements"),
    "array-type": (g_file([g_kv(b"k", 9, struct.pack("<IQ", 13, 0))]), "unknown element type 13"),
    "array-depth": (g_file([g_kv(b"k", 9, struct.pack("<IQ", 9, 1) * 4 + struct.pack("<IQ", 4, 0))]),
                    "nests arrays more than 3 deep"),
    "alignment-type": (g_file([g_kv(b"general.alignment", 10, struct.pack("<Q", 32))]),
                       "general.alignment has value type 10"),
    "alignment-value": (g_file([g_kv(b"general.alignment", 4, struct.pack("<I", 24))]), "24 is not a power of two"),
    "alignment-zero": (g_file([g_kv(b"general.alignment", 4, struct.pack("<I", 0))]), "0 is not a power of two"),
    "n-dims-0": (g_file(tensors=[g_tensor(b"t", [], 0) + b"\0" * 8]), "'t' has 0 dimensions"),
    "n-dims-5": (g_file(tensors=[g_tensor(b"t", [1] * 5, 0)]), "'t' has 5 dimensions"),
    "dim-zero": (g_file(tensors=[g_tensor(b"t", [4, 0], 0)]), "empty dimension"),
    "ggml-type": (g_file(tensors=[g_tensor(b"t", [4], 1000)]), "unknown ggml type 1000"),
    "removed-ggml-type": (g_file(tensors=[g_tensor(b"t", [32], 4)]), "unknown ggml type 4"),  # Q4_2, withdrawn
    "block-size": (g_file(tensors=[g_tensor(b"t", [33], 8)]), "innermost dimension 33, not a multiple of the Q8_0"),
    "huge-tensor": (g_file(tensors=[g_tensor(b"t", [1 << 32, 1 << 32, 1 << 32, 1 << 32], 0)]), "larger than the file"),
    "tensor-past-end": (g_file(tensors=[F32_T], data=b"\0" * 15), "runs past the end of the file (15 bytes"),
    "tensor-offset": (g_file(tensors=[g_tensor(b"t", [4], 0, 32)], data=b"\0" * 40), "runs past the end"),
    "tensor-unaligned": (g_file(tensors=[g_tensor(b"t", [4], 0, 4)], data=b"\0" * 64), "not a multiple of the alignment"),
    "tensor-name-utf8": (g_file(tensors=[g_tensor(b"\xc3", [4], 0)], data=b"\0" * 16), "tensor name at byte 32 is not UTF-8"),
    "duplicate-tensor": (g_file(tensors=[F32_T, g_tensor(b"t", [4], 0, 32)], data=b"\0" * 48), "same name"),
}


def test_gguf_hand_made_good_file_passes(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "ok.gguf"
    path.write_bytes(g_file([U32_KV], [F32_T], data=b"\0" * 16))
    check_gguf_header(path)
    assert len(gguf.GGUFReader(str(path)).tensors) == 1


@pytest.mark.parametrize("case", sorted(BAD_GGUF))
def test_gguf_bad_headers(case: str, tmp_path: Path) -> None:
    raw, message = BAD_GGUF[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
        check_gguf_header(path)
    assert message in str(err.value)
