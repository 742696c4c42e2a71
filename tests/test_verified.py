"""Load-time integrity: an artifact is hashed in full once, then only when a file changed (or on
--verify); and an artifact that cannot fit the memory available is refused before loading."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import awqc.runtime.engine as engine_module
from awqc.runtime.artifact import ArtifactError, read_manifest
from awqc.runtime.engine import Engine, check_fits, kv_cache_bytes
from awqc.runtime.verified import verify_artifact


@pytest.fixture
def art(tmp_path: Path, tiny_artifact: Path) -> Path:
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact, root)
    return root


def test_hashed_once_then_on_change(art: Path) -> None:
    manifest = read_manifest(art)
    assert verify_artifact(art, manifest) is True  # first load: every file hashed
    assert verify_artifact(art, manifest) is False  # unchanged: trusted from the record
    assert verify_artifact(art, manifest, full=True) is True  # --verify
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        verify_artifact(art, manifest)


def test_in_place_edit_keeping_mtime_needs_verify(art: Path) -> None:
    manifest = read_manifest(art)
    verify_artifact(art, manifest)
    weights = art / "weights.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:  # rewritten in place, mtime restored: only a full hash sees it
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_artifact(art, manifest) is False
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        verify_artifact(art, manifest, full=True)


def test_missing_file_still_named(art: Path) -> None:
    manifest = read_manifest(art)
    verify_artifact(art, manifest)
    (art / "lib.so").unlink()
    with pytest.raises(ArtifactError, match="lib.so is missing"):
        verify_artifact(art, manifest)


def test_too_big_for_memory_refused_before_loading(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = read_manifest(art)
    m = manifest["model"]
    assert kv_cache_bytes(manifest) == 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * m["head_dim"] * 128 * 4
    check_fits(manifest, art, 1 << 40)  # plenty
    monkeypatch.setattr(engine_module, "_available_bytes", lambda _device: 1 << 20)
    with pytest.raises(ArtifactError, match=r"needs about .* GiB .* but only 0\.0 GiB is available"):
        Engine(art)
