"""The manifest's schema: every key the runtime reads, with its type and range, checked before
any of it is used, so a damaged or hand-edited manifest is an ArtifactError naming the key,
never a KeyError or TypeError deep in the engine."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_CONTEXT = 1 << 20
_NONE = type(None)

# key -> type (or tuple of types) of the top level and of the nested objects the runtime reads
_TOP = {"format": str, "awqc_version": str, "tvm_version": str, "target": dict, "model": dict, "source": str,
        "dtype": str, "quantization": (dict, _NONE), "context_window": int, "prefill_chunk": int,
        "params": list, "tokenizer": dict, "files": dict, "manifest_sha256": str}
_TARGET = {"name": str, "arch": str, "device": str}
_TOKENIZER = {"eos_token_ids": list, "bos_token_id": (int, _NONE), "bos_token": str, "eos_token": str,
              "chat_template": (str, _NONE)}
_QUANT = {"method": (str, _NONE), "scheme": str, "bits": int, "group_size": int, "symmetric": bool,
          "layout": str, "quantized": list}


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest with a missing or mistyped key, an out-of-range size, or a file entry
    that is not a plain relative path inside the artifact."""
    from .artifact import ArtifactError

    def fail(problem: str) -> None:
        raise ArtifactError(f"{path}: {problem}; the manifest is damaged, recompile the artifact")

    def check_keys(obj: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        for key, types in schema.items():
            if key not in obj:
                fail(f"{where}{key!r} is missing")
            value = obj[key]
            if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
                fail(f"{where}{key!r} is a boolean")
            if not isinstance(value, types):
                fail(f"{where}{key!r} has the wrong type ({type(value).__name__})")

    check_keys(manifest, _TOP, "")
    if "generation" in manifest:  # sampling defaults (artifacts before it have none)
        _check_generation(manifest["generation"], fail)
    check_keys(manifest["target"], _TARGET, "target.")
    check_keys(manifest["tokenizer"], _TOKENIZER, "tokenizer.")
    if manifest["quantization"] is not None:
        check_keys(manifest["quantization"], _QUANT, "quantization.")
    window, chunk = manifest["context_window"], manifest["prefill_chunk"]
    if not 1 <= window <= _MAX_CONTEXT:
        fail(f"context_window {window} is outside 1..{_MAX_CONTEXT}")
    if not 1 <= chunk <= window:
        fail(f"prefill_chunk {chunk} is outside 1..context_window")
    eos = manifest["tokenizer"]["eos_token_ids"]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
        fail("tokenizer.eos_token_ids holds something other than token ids")
    params = manifest["params"]
    if not params or not all(isinstance(p, str) for p in params) or len(set(params)) != len(params):
        fail("params must be a non-empty list of distinct names")
    for rel, digest in manifest["files"].items():
        if not _is_plain_relative(rel):
            fail(f"file entry {rel!r} is not a relative path inside the artifact")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            fail(f"file entry {rel!r} has no sha256")


def _check_generation(gen: Any, fail) -> None:
    from .sampling import LLAMA_CPP_DEFAULTS, SamplingParams

    if not isinstance(gen, dict) or not isinstance(gen.get("source"), str):
        fail("generation is not an object with a source")
    values = {k: gen.get(k) for k in LLAMA_CPP_DEFAULTS}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        fail("generation holds a missing or non-numeric sampling default")
    try:
        SamplingParams(**{**values, "top_k": int(values["top_k"])})
    except ValueError as err:
        fail(f"generation: {err}")


def _is_plain_relative(rel: str) -> bool:
    """A POSIX path below the artifact root: not absolute, no '..', '.', empty parts or NUL."""
    if not rel or "\0" in rel or "\\" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not PurePosixPath(rel).is_absolute()
