"""Load-time integrity that stays cheap at scale: every file of an artifact is hashed once, and
the result is remembered with each file's size, modification time and inode; later loads hash
again only when one of those changed (or with `--verify`). Hashing a 4 GB int4 artifact takes
seconds on every `awqc run` otherwise.

The record lives in the user's own cache ($AWQC_CACHE_DIR, else $XDG_CACHE_HOME/awqc, else
~/.cache/awqc). It detects replaced, resized or rewritten files; a change made in place that
restores the old mtime is caught only by `--verify` (SECURITY.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .artifact import manifest_digest, verify_files

_RECORD = "verified.json"


def cache_dir() -> Path:
    if os.environ.get("AWQC_CACHE_DIR"):
        return Path(os.environ["AWQC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "awqc"


def _signature(root: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    out = {}
    for rel in manifest["files"]:
        st = (root / rel).lstat()
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    return out


def _key(root: Path, manifest: dict[str, Any]) -> str:
    return hashlib.sha256(f"{root.resolve()}\0{manifest_digest(manifest)}".encode()).hexdigest()


def _read_record() -> dict[str, Any]:
    try:
        record = json.loads((cache_dir() / _RECORD).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: everything is hashed again
    return record if isinstance(record, dict) else {}


def verify_artifact(root: Path, manifest: dict[str, Any], full: bool = False) -> bool:
    """verify_files(root, manifest), skipped when this artifact was verified before and no file
    changed since (unless `full`). True if the files were hashed now."""
    key = _key(root, manifest)
    try:
        signature = _signature(root, manifest)
    except OSError:
        signature = None  # a file is missing: verify_files names it
    record = _read_record()
    if not full and signature is not None and record.get(key) == signature:
        return False
    verify_files(root, manifest)
    if signature is not None:
        _remember(record, key, signature)
    return True


def _remember(record: dict[str, Any], key: str, signature: dict[str, list[int]]) -> None:
    record[key] = signature
    path = cache_dir() / _RECORD
    try:  # best effort: a read-only home only costs the next load a full check
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{_RECORD}.{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass
