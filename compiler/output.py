"""The artifact's output path: checked before any work, written as a temporary sibling, and moved
into place by one atomic rename that never replaces anything but an awqc artifact.

Checking `-o` once at the start is not enough: a compile runs for minutes, and a directory can
appear at `-o` meanwhile (the user's, or a second compile's). So the final step is Linux's
renameat2 with RENAME_NOREPLACE (fails if `-o` exists) or, with --force, RENAME_EXCHANGE (swaps
the new artifact in, then checks that what it swapped out is an awqc artifact, and swaps back if
it is not). Elsewhere a plain rename after a check is the fallback.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable

from awqc.runtime.artifact import FORMAT, MANIFEST

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NAME_MAX = 255
_TMP_SUFFIX = ".tmp-4194304-xxxxxxxx"  # what staging_path adds to ".NAME": the largest pid, 8 hex digits


class OutputError(ValueError):
    """The output path cannot be written, or holds something awqc must not replace."""


class OutputExistsError(OutputError, FileExistsError):
    """The output path exists and --force was not given (or it is not an awqc artifact)."""


def is_artifact(path: Path) -> bool:
    """A real directory (not a link) whose manifest says it is an awqc artifact."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail before any work if `out` cannot be written or must not be replaced.

    `inputs` are the files and directories the compile reads (the model, calibration text or
    cache): `-o` may not be one of them or hold one. The parent is created if missing, and a
    temporary directory is made and removed there to prove it is writable."""
    if out.name in ("", ".", ".."):
        raise OutputError(f"-o {out} does not name a new directory; give a path such as dist/model")
    if len(f".{out.name}{_TMP_SUFFIX}".encode()) > _NAME_MAX:
        raise OutputError(f"-o name {out.name[:40]}... is too long ({len(out.name.encode())} bytes; at most "
                          f"{_NAME_MAX - len(_TMP_SUFFIX) - 1}); choose a shorter name")
    target = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == target or target in src.parents:
            raise OutputError(f"-o {out} is or holds the compile's input {src}; write the artifact elsewhere")
    if out.is_symlink():
        raise OutputError(f"-o {out} is a symbolic link; awqc neither writes through nor replaces links, "
                          "give the real path")
    if out.exists():
        if not force:
            raise OutputExistsError(f"output path {out} already exists; choose another path or pass --force")
        if not is_artifact(out):
            raise OutputExistsError(f"output path {out} exists and is not an awqc artifact; --force replaces only "
                                    "artifacts, so remove it yourself or choose another path")
    parent = target.parent
    probe = _sibling(out, "probe")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        try:
            probe.mkdir()
            probe.rmdir()
        except BaseException:  # a SIGTERM between the two (not a finally: the signal could cut that short)
            shutil.rmtree(probe, ignore_errors=True)
            raise
    except OSError as err:
        raise OutputError(f"cannot write the artifact in {parent}: {err.strerror}; choose another -o") from None


def staging_path(out: Path) -> Path:
    """Where the artifact is staged beside `out` (same filesystem, so the final rename is atomic); not
    yet made. The caller makes it with make_staging_dir inside the try that removes it, so a SIGTERM
    landing just after the mkdir cannot leave it behind (mkdtemp returns the name only after making
    it, and a signal between the two escapes every cleanup). The pid in the name means a directory
    already there can only be a killed compile's leftover."""
    return _sibling(out, "tmp")


def _sibling(out: Path, kind: str) -> Path:
    return out.resolve().parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700)
    except OSError as err:
        raise OutputError(f"cannot write the artifact in {path.parent}: {err.strerror}") from None


def install(staged: Path, out: Path, force: bool) -> None:
    """Move the finished `staged` directory to `out` atomically. Without `force`, fails if `out`
    exists; with it, replaces only an awqc artifact. `staged` is gone afterwards either way
    (moved into place, or removed by the caller on error)."""
    if _rename(staged, out, _RENAME_NOREPLACE):
        return
    if not force:
        raise OutputExistsError(f"{out} appeared while compiling (another compile, or a directory made there); "
                                "it was left as it is and the new artifact discarded; choose another -o")
    if not is_artifact(out):
        raise OutputExistsError(f"{out} is no longer an awqc artifact; --force replaces only artifacts, so it was "
                                "left as it is and the new artifact discarded")
    if not _exchange(staged, out):  # no atomic swap here: a checked rename is the best there is
        old = staged.with_name(staged.name + ".old")
        os.rename(out, old)
        os.rename(staged, out)
        shutil.rmtree(old)
        return
    # `staged` now holds what was at `out`; it was an artifact a moment ago, so check again.
    if not is_artifact(staged):
        _exchange(staged, out)
        raise OutputExistsError(f"{out} changed while being replaced and is not an awqc artifact; it was left as "
                                "it is and the new artifact discarded")
    shutil.rmtree(staged)


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """0, or the errno of renameat2(src, dst, flags); ENOSYS where the C library lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return errno.ENOSYS
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """Rename src to dst unless dst exists (True if renamed, False if dst exists)."""
    err = _renameat2(src, dst, flags)
    if err == 0:
        return True
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a filesystem without the flag
        raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False if this system cannot."""
    err = _renameat2(a, b, _RENAME_EXCHANGE)
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    if err:
        raise OSError(err, os.strerror(err), str(b))
    return True
