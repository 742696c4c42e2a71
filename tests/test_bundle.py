"""`awqc bundle`: the bundle runs where neither awqc nor TVM is installed (conftest's bare_python),
and gives what the installed runtime gives."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from awqc.compiler.awq import quantize_model
from awqc.compiler.build import write_artifact
from awqc.compiler.bundle import BundleError, make_bundle
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.engine import Engine

from conftest import clean_env, make_checkpoint

RUN_ARGS = ["--prompt", "tensors flow", "--max-new-tokens", "12", "--temperature", "0"]


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle-src")
    model = load_model(str(make_checkpoint(root / "ckpt", seed=3)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), False)
    return write_artifact(root / "int4", model, get_target("host"), "float32", 128, quant=quant, method="rtn")


@pytest.fixture(scope="module")
def bundle(int4_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    make_bundle(int4_artifact, out)
    return out


def test_bare_python_has_no_tvm(bare_python: Path) -> None:
    for module in ("tvm", "tvm_ffi", "awqc", "torch"):
        proc = subprocess.run([bare_python, "-c", f"import {module}"], capture_output=True, text=True, env=clean_env(),
                              cwd=bare_python.parent)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module


def test_bundle_holds_no_compiler(bundle: Path) -> None:
    names = {p.name for p in bundle.rglob("*")}
    assert "libtvm_runtime.so" in names and "libtvm_ffi.so" in names
    assert not names & {"libtvm_compiler.so", "compiler", "passes", "schedules", "awqc_runner.cc"}
    record = json.loads((bundle / "bundle.json").read_text())
    weights = (bundle / "artifact" / "weights.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert abs(record["mib_without_weights"] - (total - weights) / 2**20) < 0.1
    assert record["mib_without_weights"] < 64
    assert record["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_bundle_runs_without_tvm_installed(bundle: Path, bare_python: Path, int4_artifact: Path) -> None:
    installed = subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "run", str(int4_artifact), *RUN_ARGS],
                               capture_output=True, text=True, check=True)
    env = {**clean_env(), "PYTHON": str(bare_python)}
    bundled = subprocess.run([bundle / "awqc", "run", bundle / "artifact", *RUN_ARGS],
                             capture_output=True, text=True, env=env)
    assert bundled.returncode == 0, bundled.stderr
    assert bundled.stdout == installed.stdout and bundled.stdout.strip()


def test_bundle_refuses_another_python(bundle: Path, tmp_path: Path) -> None:
    fake = tmp_path / "python"  # an interpreter that reports another version
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit(1)'\n")
    fake.chmod(0o755)
    proc = subprocess.run([bundle / "awqc", "run", bundle / "artifact", *RUN_ARGS], capture_output=True, text=True,
                          env={**clean_env(), "PYTHON": str(fake)})
    assert proc.returncode == 2 and "built for Python" in proc.stderr and "--tvm-ffi-wheel" in proc.stderr


def test_host_cpp_runner_matches_engine(bundle: Path, int4_artifact: Path) -> None:
    prompt = [5, 17, 99, 250, 3]
    proc = subprocess.run([bundle / "bin" / "awqc_runner", bundle / "artifact", "--prompt",
                           ",".join(map(str, prompt)), "--greedy", "6"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    got = [int(t) for t in re.search(r"^next:(.*)$", proc.stdout, re.M).group(1).split()]
    engine = Engine(int4_artifact)
    want = [int(engine.prefill(prompt).argmax())]
    for _ in range(6):
        want.append(int(engine.decode(want[-1]).argmax()))
    assert got == want


def test_bundle_errors_leave_nothing(int4_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not an artifact directory"):
        make_bundle(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(BundleError, match="already exists; pass --force"):
        make_bundle(int4_artifact, tmp_path / "taken")
    wheel = tmp_path / "apache_tvm_ffi-0.0.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    with pytest.raises(BundleError, match="the artifact needs tvm-ffi"):
        make_bundle(int4_artifact, tmp_path / "out", tvm_ffi_wheel=wheel)
    with pytest.raises(BundleError, match="is not an apache-tvm-ffi wheel"):
        make_bundle(int4_artifact, tmp_path / "out", tvm_ffi_wheel=tmp_path / "taken")
    (tmp_path / "taken" / "mine.txt").write_text("not a bundle")
    with pytest.raises(BundleError, match="is not an awqc bundle"):
        make_bundle(int4_artifact, tmp_path / "taken", force=True)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "not a bundle"
    from importlib.metadata import version
    import zipfile

    hostile = tmp_path / f"apache_tvm_ffi-{version('apache-tvm-ffi')}-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(hostile, "w") as z:
        z.writestr("tvm_ffi/__init__.py", "")
        z.writestr("tvm_ffi/../../escaped.py", "")
    with pytest.raises(BundleError, match="outside its package"):
        make_bundle(int4_artifact, tmp_path / "out", tvm_ffi_wheel=hostile)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["taken", wheel.name, hostile.name])


def test_cli_bundle_reports_sizes(int4_artifact: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "bundle", str(int4_artifact), "-o",
                           str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"MiB without the weights", proc.stderr) and (tmp_path / "b" / "awqc").is_file()
    again = subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "bundle", str(int4_artifact), "-o",
                            str(tmp_path / "b")], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    forced = subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "bundle", str(int4_artifact), "-o",
                             str(tmp_path / "b"), "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr  # an earlier bundle is replaced
