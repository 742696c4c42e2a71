"""awqc deploy / awqc profile through a TVM RPC server on loopback, and their errors."""
from __future__ import annotations

import json
import platform
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from awqc.compiler.awq import quantize_model
from awqc.compiler.cli import main
from awqc.compiler.remote import (Endpoint, KernelStat, Profile, RemoteModel, classify, open_session, parse_endpoint,
                                  kernel_role, linear_roles, peak_for, roofline_figure)
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.artifact import ArtifactError, write_manifest
from awqc.runtime.engine import Engine

from conftest import make_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny int4 artifact for this machine."""
    from awqc.compiler.build import write_artifact
    from awqc.compiler.model_import import load_model
    from awqc.compiler.targets import get_target

    root = tmp_path_factory.mktemp("remote")
    model = load_model(str(make_checkpoint(root / "ckpt", seed=5, intermediate_size=128)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), quantize_head=False)
    return write_artifact(root / "int4", model, get_target("host"), "float32", 128, quant=quant, method="rtn")


@pytest.fixture(scope="module")
def rpc_server():
    """A TVM RPC server on loopback (its own process), as on a device."""
    from tvm import rpc

    server = rpc.Server(host="127.0.0.1", port=9190, port_end=9390, silent=True)
    yield f"127.0.0.1:{server.port}"
    server.terminate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_decodes_like_the_local_engine(int4_artifact: Path, rpc_server: str,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["deploy", str(int4_artifact), "--rpc", rpc_server, "--prompt", "the quick brown fox",
                 "--max-new-tokens", "6"]) == 0
    assert "deployed" in capsys.readouterr().out
    sess = open_session(rpc_server, timeout=10)
    remote = RemoteModel(sess, int4_artifact)
    local = Engine(int4_artifact)
    ids = local.encode("the quick brown fox")
    local.eos_token_ids = set()
    expected = list(local.generate(ids, 6))
    remote.manifest["tokenizer"]["eos_token_ids"] = []
    assert remote.generate(ids, 6)[0] == expected
    local.reset(), remote.reset()
    np.testing.assert_allclose(remote.step("prefill", ids), local.prefill(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["rpc", "local"])
def test_profile_table_and_roofline(int4_artifact: Path, rpc_server: str, tmp_path: Path, where: str,
                                    capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "profile.png"
    args = ["profile", str(int4_artifact), "--steps", "2", "-o", str(png)]
    args += ["--rpc", rpc_server] if where == "rpc" else []
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("w4_gemv")]
    assert len(rows) == 4  # qkv, o, gate_up, down, each called once per layer (2 layers)
    assert all(r[1] == "int4" and r[2] == "2" and r[-2].endswith("%") for r in rows)  # GB/s and % of roof
    assert sorted(r[-1] for r in rows) == ["down", "gate_up", "o", "qkv"]  # named by role from the shapes
    roles = {line.split()[0] for line in out.splitlines()[4:] if line and not line.startswith(("w4_", "kernel"))}
    assert {"qkv", "o", "gate_up", "down", "attention"} <= roles
    assert "GB/s" in out and "measured" in out
    if where == "local":
        assert "compute peak" in out and "torch float32 GEMM" in out
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert main([*args, "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert {r["role"] for r in prof["roles"]} >= {"qkv", "o", "gate_up", "down"}
    assert sum(k["us_per_step"] for k in prof["kernels"]) <= prof["instrumented_us"] + 1e-6


def test_roles_from_shapes() -> None:
    model = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
             "head_dim": 64, "vocab_size": 49152}
    roles = linear_roles(model)
    assert roles == {(576, 960): "qkv", (576, 576): "o", (576, 3072): "gate_up", (1536, 576): "down",
                     (576, 49152): "lm_head"}
    x, y = {"dtype": "float32", "shape": [1, 1536]}, {"dtype": "float32", "shape": [1, 576]}
    q = {"dtype": "uint32", "shape": [72, 8, 192]}  # a tiled layout: N is not a dimension of it
    assert kernel_role("w4_gemv_1536x576_g64", [x, q, q, q, y], roles) == "down"
    w = {"dtype": "float32", "shape": [49152, 576]}
    assert kernel_role("NT_matmul", [x, w, {"dtype": "float32", "shape": [1, 49152]}], roles) == "lm_head"
    assert kernel_role("fused_rms_norm1", [x, x], roles) == "norm"
    assert kernel_role("batch_decode_paged_kv_cpu", [x], roles) == "attention"
    assert kernel_role("fused_rope", [x], roles) == "rope"
    mha = dict(model, num_key_value_heads=9, hidden_size=576 * 3 // 3)
    assert linear_roles(dict(mha, intermediate_size=288))[(576, 576)] == "o/gate_up"  # shared shape: both


def test_roofline_axes_are_labelled() -> None:
    kernels = [KernelStat("w4_gemv_576x960_g64", "int4", 30, 300.0, 9_000_000, 33_000_000),
               KernelStat("NT_matmul", "matmul", 1, 400.0, 56_000_000, 56_000_000)]
    fig = roofline_figure(Profile("cuda-sm90", "cuda:0", 4, 900.0, 1100.0, kernels, 3350.0, "data sheet", 989.0))
    ax = fig.axes[0]
    assert "arithmetic intensity" in ax.get_xlabel() and "FLOP/byte" in ax.get_xlabel().replace(" per byte", "/byte")
    assert "GFLOP/s" in ax.get_ylabel() and ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_kernel_bytes_from_shapes() -> None:
    x, y = {"dtype": "float16", "shape": [1, 576]}, {"dtype": "float16", "shape": [1, 960]}
    q, s = {"dtype": "uint32", "shape": [960, 72]}, {"dtype": "float16", "shape": [960, 9]}
    kind, nbytes, flops = classify("w4_gemv_576x960_g64", [x, q, s, s, y])
    assert (kind, nbytes, flops) == ("int4", 960 * 576 // 2 + 2 * 960 * 9 * 2, 2 * 576 * 960)
    w = {"dtype": "float32", "shape": [320, 64]}
    assert classify("NT_matmul", [{"dtype": "float32", "shape": [1, 1, 64]}, w, None,
                                  {"dtype": "float32", "shape": [1, 1, 320]}]) == ("matmul", 320 * 64 * 4, 2 * 320 * 64)
    assert classify("rms_norm", [x, x]) == ("other", 0, 0)


def test_deploy_through_a_tracker(int4_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9400, port_end=9600, silent=True)
    server = rpc.Server(host="127.0.0.1", port=9600, port_end=9800, tracker_addr=("127.0.0.1", tracker.port),
                        key="awqc-test", silent=True)
    try:
        time.sleep(1)  # the server registers with the tracker
        assert main(["deploy", str(int4_artifact), "--tracker", f"127.0.0.1:{tracker.port}", "--key", "awqc-test",
                     "--max-new-tokens", "2"]) == 0
        assert "deployed" in capsys.readouterr().out
        # no server with that key: the tracker queues the request forever; --timeout bounds it
        assert main(["deploy", str(int4_artifact), "--tracker", f"127.0.0.1:{tracker.port}", "--key", "no-such",
                     "--timeout", "2"]) == 2
        assert "did not answer within 2 s" in capsys.readouterr().err
    finally:
        server.terminate()
        tracker.terminate()


# ------------------------------------------------------------------------------ bad input
def test_unreachable_server_fails_fast(int4_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.perf_counter()
    assert main(["deploy", str(int4_artifact), "--rpc", f"127.0.0.1:{free_port()}", "--timeout", "3"]) == 2
    assert time.perf_counter() - t0 < 3
    assert "cannot reach the RPC server at 127.0.0.1" in capsys.readouterr().err


def test_silent_server_times_out(int4_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    """A peer that accepts the connection but never speaks RPC: bounded by --timeout, no hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    try:
        t0 = time.perf_counter()
        assert main(["profile", str(int4_artifact), "--rpc", f"127.0.0.1:{listener.getsockname()[1]}",
                     "--timeout", "1.5"]) == 2
        assert time.perf_counter() - t0 < 10
        assert "did not answer within 1.5 s" in capsys.readouterr().err
    finally:
        for s in held:
            s.close()
        listener.close()


def test_bad_addresses_and_options(int4_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert parse_endpoint("10.0.0.2:9090") == Endpoint("10.0.0.2", 9090)
    for bad in ("nonsense", "host:", ":9090", "host:99999"):
        with pytest.raises(ValueError, match="expects HOST:PORT"):
            parse_endpoint(bad)
    assert main(["deploy", str(int4_artifact), "--rpc", "nonsense"]) == 2
    assert "--rpc expects HOST:PORT" in capsys.readouterr().err
    assert main(["deploy", str(int4_artifact)]) == 2
    assert "needs --rpc" in capsys.readouterr().err
    assert main(["deploy", str(int4_artifact), "--tracker", "127.0.0.1:9190"]) == 2
    assert "--tracker needs --key" in capsys.readouterr().err
    assert main(["deploy", str(int4_artifact), "--rpc", "127.0.0.1:1", "--timeout", "0"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


def test_unknown_arch(int4_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["profile", str(int4_artifact), "--arch", "sm_99"]) == 2
    err = capsys.readouterr().err
    assert "unknown --arch 'sm_99'" in err and "sm_90" in err and "--bandwidth" in err
    assert peak_for("sm_90")[0] == "h100-sxm" and peak_for("orin-nano-8gb")[1] == 68.0


@pytest.fixture
def fake_cuda_artifact(int4_artifact: Path, tmp_path: Path) -> Path:
    """The host artifact relabelled as a cuda-sm90 one (re-sealed, as a real build for that target would be)."""
    art = tmp_path / "cuda"
    shutil.copytree(int4_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"].update({"name": "cuda-sm90", "device": "cuda", "arch": platform.machine()})
    write_manifest(art, manifest)  # re-sealed: as if built so, not edited
    return art


def test_cuda_artifact_on_this_cpu_only_host(fake_cuda_artifact: Path, rpc_server: str,
                                             capsys: pytest.CaptureFixture) -> None:
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    msg = "this artifact targets cuda-sm90 but no CUDA device is available; compile with --target host"
    assert main(["profile", str(fake_cuda_artifact)]) == 2
    assert msg in capsys.readouterr().err
    with pytest.raises(ArtifactError, match=msg):
        Engine(fake_cuda_artifact)
    assert main(["deploy", str(fake_cuda_artifact), "--rpc", rpc_server]) == 2
    assert "this artifact targets cuda-sm90 but the RPC server has no CUDA device" in capsys.readouterr().err
