"""The output path never loses data: -o is checked before any work, the artifact is moved into
place by an atomic rename that fails if something appeared there meanwhile, and --force replaces
only an awqc artifact, never the user's files or the model's own input."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import awqc.compiler.build as build
from awqc.compiler.cli import main


def compile_cli(model: Path | str, out: Path, *extra: str) -> int:
    return main(["compile", "--model", str(model), "--target", "host", "-o", str(out), "--context-window", "64",
                 *extra])


def leftovers(out: Path) -> list[str]:
    """Staging or swapped-out directories beside out."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def user_dir(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    return path


def during_compile(monkeypatch: pytest.MonkeyPatch, action) -> None:
    """Run `action` after the start-of-compile checks, while the library is being compiled."""
    real = build.compile_library

    def compile_then_act(*args, **kwargs):
        result = real(*args, **kwargs)
        action()
        return result

    monkeypatch.setattr(build, "compile_library", compile_then_act)


def test_existing_output_needs_force(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    out = user_dir(tmp_path / "out")
    assert compile_cli(tiny_ckpt, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data" and not leftovers(out)


def test_force_refuses_what_is_not_an_artifact(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    out = user_dir(tmp_path / "out")
    assert compile_cli(tiny_ckpt, out, "--force") == 2
    assert "not an awqc artifact" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data" and not leftovers(out)


def test_force_replaces_an_artifact(tmp_path: Path, tiny_ckpt: Path, tiny_artifact: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(tiny_artifact, out)
    (out / "lib.so").write_bytes(b"old")  # marks the old copy
    assert compile_cli(tiny_ckpt, out, "--force") == 0
    assert (out / "lib.so").read_bytes() != b"old" and not leftovers(out)


def test_force_never_replaces_the_model(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    assert compile_cli(ckpt, ckpt, "--force") == 2
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert compile_cli(ckpt, tmp_path, "--force") == 2  # -o holding the model
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_symlink_output_refused(tmp_path: Path, tiny_ckpt: Path, tiny_artifact: Path,
                                capsys: pytest.CaptureFixture) -> None:
    real = tmp_path / "real"
    shutil.copytree(tiny_artifact, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert compile_cli(tiny_ckpt, link, "--force") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and (real / "manifest.json").is_file() and not leftovers(link)


def test_directory_appearing_during_compile_is_kept(tmp_path: Path, tiny_ckpt: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    during_compile(monkeypatch, lambda: user_dir(out))
    assert compile_cli(tiny_ckpt, out) == 2
    assert "appeared while compiling" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data" and not leftovers(out)


def test_directory_appearing_during_forced_compile_is_kept(tmp_path: Path, tiny_ckpt: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    during_compile(monkeypatch, lambda: user_dir(out))
    assert compile_cli(tiny_ckpt, out, "--force") == 2
    assert (out / "keep.txt").read_text() == "user data" and not leftovers(out)


def test_racing_compile_loses_cleanly(tmp_path: Path, tiny_ckpt: Path, tiny_artifact: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A second compile that finishes first wins; the later one errors and leaves it whole."""
    out = tmp_path / "out"
    during_compile(monkeypatch, lambda: shutil.copytree(tiny_artifact, out))
    assert compile_cli(tiny_ckpt, out) == 2
    assert "appeared while compiling" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())
    assert not leftovers(out)


@pytest.mark.parametrize("name, message", [("sub/..", "does not name a new directory"),
                                           ("x" * 250, "too long"),
                                           ("file/out", "cannot write the artifact")])
def test_bad_output_names(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture,
                          name: str, message: str) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    assert compile_cli(tiny_ckpt, tmp_path / name) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_full_disk_leaves_nothing(tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "weights.safetensors")

    monkeypatch.setattr(build, "_write_weights", full)
    out = tmp_path / "out"
    assert compile_cli(tiny_ckpt, out) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and not leftovers(out)


@pytest.mark.parametrize("window, message", [("0", "must be a positive"), ("100000000", "max_position_embeddings")])
def test_context_window_range(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture,
                              window: str, message: str) -> None:
    out = tmp_path / "out"
    assert main(["compile", "--model", str(tiny_ckpt), "-o", str(out), "--context-window", window]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_sigterm_during_compile_leaves_nothing(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Killed while writing the artifact (its staging directory exists): nothing is left."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", str(tiny_ckpt),
                             "-o", str(out), "--context-window", "64"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    def staging() -> list[Path]:
        return list(out.parent.glob(f".{out.name}.tmp-*"))

    while not staging() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert staging(), "the compile ended before its staging directory appeared"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    assert not out.exists()
    assert not leftovers(out), (sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")),
                                proc.stderr.read()[-3000:])


def test_interrupt_just_after_the_staging_mkdir_leaves_nothing(tmp_path: Path, tiny_ckpt: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrowest window the SIGTERM test can hit: the directory exists, nothing else happened yet."""
    real = build.make_staging_dir

    def made_then_interrupted(path: Path) -> None:
        real(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "make_staging_dir", made_then_interrupted)
    out = tmp_path / "out"
    assert compile_cli(tiny_ckpt, out) == 130
    assert not out.exists() and not leftovers(out)


def test_interrupt_during_the_writability_probe_leaves_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from awqc.compiler.output import check_output

    def interrupted(self: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rmdir", interrupted)  # the probe is made; the signal lands before it goes
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        check_output(out, False, [])
    assert not leftovers(out)


def test_same_inputs_give_identical_bytes(tmp_path: Path, tiny_ckpt: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert compile_cli(tiny_ckpt, a) == 0 and compile_cli(tiny_ckpt, b) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _compile_process(ckpt: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", str(ckpt),
                             "-o", str(out), "--context-window", "64"], stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_sigterm_at_any_phase_leaves_nothing(tmp_path: Path, tiny_ckpt: Path, delay: float) -> None:
    """Killed while importing, loading the model, or compiling: nothing at -o, nothing beside it."""
    out = tmp_path / "out"
    proc = _compile_process(tiny_ckpt, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    if code == 0:  # finished before the signal: then the artifact is whole
        assert (out / "manifest.json").is_file()
    else:
        assert code in (128 + signal.SIGTERM, -signal.SIGTERM), proc.stderr.read()[-2000:]
        assert not out.exists()
    assert not leftovers(out)


def test_two_real_compiles_racing(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Two processes compiling to one -o: one artifact, complete; the other a clear error."""
    from awqc.runtime.artifact import read_manifest, verify_files

    out = tmp_path / "out"
    procs = [_compile_process(tiny_ckpt, out) for _ in range(2)]
    codes = sorted(p.wait(300) for p in procs)
    errors = "".join(p.stderr.read() for p in procs)
    assert codes == [0, 2], errors[-2000:]
    assert "already exists" in errors or "appeared while compiling" in errors
    verify_files(out, read_manifest(out))
    assert not leftovers(out)
