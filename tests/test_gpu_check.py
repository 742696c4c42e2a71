"""bench/gpu: the prepared GPU check rehearsed on this CPU (prepare.py --dry-run, then run.sh), so
the device minutes go to measuring: every part runs from the bundle's runtime-only TVM, the
emulated CUDA kernels agree with numpy, the tiny model with its host build, and a wrong kernel
output is reported as a failure."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import clean_env

REPO = Path(__file__).resolve().parents[1]
PARTS = ("kernel_correctness", "tiny_model", "copy_bandwidth", "gemv", "gemm", "decode")


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-check")
    subprocess.run([sys.executable, REPO / "bench" / "gpu" / "prepare.py", "--dry-run", "-o", root / "payload",
                    "--work", root / "work"], check=True, capture_output=True, cwd=root)
    return root / "payload"


def test_dry_run_measures_every_part(payload: Path, tmp_path: Path) -> None:
    proc = subprocess.run([REPO / "bench" / "gpu" / "run.sh", payload, tmp_path], capture_output=True, text=True,
                          env={**clean_env(), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    meta = json.loads((payload / "payload.json").read_text())
    assert [p for p in PARTS if not isinstance(record[p], list) and "error" in record[p]] == []
    checks = record["kernel_correctness"]
    # every kind at every odd shape: the GEMV at one row, both GEMMs at each row count
    assert checks["failed"] == 0 and checks["passed"] == len(meta["checks"]) == 5 * (3 + 2 * 3)
    assert record["tiny_model"]["ok"] and record["tiny_model"]["argmax_equal"] == 9
    assert [(r["k"], r["n"]) for r in record["gemv"]] == [tuple(s) for s in meta["timing_shapes"]]
    assert len(record["gemm"]) == len(meta["timing_shapes"]) * len(meta["gemm_rows"])
    assert all(record["decode"][e]["tok_s"] > 0 for e in ("llama7b-w4", "llama7b-f16", "torch_eager"))
    assert "| llama7b-w4 |" in (tmp_path / "gpu.md").read_text()
    # what travels to the device: no weights of the big models, well under the 64 MiB a call carries
    assert not list(payload.glob("llama7b-*/weights.safetensors"))
    assert sum(f.stat().st_size for f in payload.rglob("*") if f.is_file()) < 64 << 20


def test_wrong_kernel_output_fails(payload: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_device", REPO / "bench" / "gpu" / "device.py")
    device = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device)
    bad = tmp_path / "payload"
    bad.mkdir()
    for name in ("payload.json", "tiny.npz"):
        (bad / name).symlink_to(payload / name)
    (bad / "kernels").mkdir()
    (bad / "kernels" / "lib.so").symlink_to(payload / "kernels" / "lib.so")
    data = dict(np.load(payload / "kernels" / "check.npz"))
    data["576x960_g64/ref7"] = data["576x960_g64/ref7"] * 1.01  # 1% off: above the fp16 tolerance
    np.savez(bad / "kernels" / "check.npz", **data)
    result = device.check_kernels(device.Check(bad, tmp_path / "out"))
    failed = sorted(c["kernel"] for c in result["checks"] if not c["ok"])
    assert failed == ["gemm_576x960_g64", "mma_576x960_g64"] and result["failed"] == 2


def test_run_refuses_another_python(payload: Path, tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit(1)'\n")
    fake.chmod(0o755)
    proc = subprocess.run([REPO / "bench" / "gpu" / "run.sh", payload, tmp_path / "out"], capture_output=True,
                          text=True, env={**clean_env(), "PYTHON": str(fake)})
    assert proc.returncode == 2 and "built for Python" in proc.stderr


def test_prepare_refuses_a_directory_that_is_not_a_payload(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, REPO / "bench" / "gpu" / "prepare.py", "--dry-run", "-o", tmp_path / "mine",
                           "--work", tmp_path / "work"], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a GPU payload" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
