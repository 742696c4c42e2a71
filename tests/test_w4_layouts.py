"""Int4 packing layouts (schedules/layouts.py), their scheduled CPU kernels against numpy, and the
tuning records that choose a target's layout and knobs (schedules/tuning.py, `awqc tune`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from awqc.compiler.build import w4_backend
from awqc.compiler.cli import main
from awqc.compiler.targets import get_target
from awqc.passes.quantizer import QuantizedWeights, QuantScheme
from awqc.runtime.artifact import KNOWN_LAYOUTS
from awqc.schedules import tuning
from awqc.schedules.layouts import (DTYPES, K8, InterleavedLayout, choose_layout, get_layout, layout_names, pack_scales,
                                   pack_zeros, unpack_zeros)
from awqc.schedules.w4_cpu import GemmKnobs, GemvKnobs, cpu_scheduler

LAYOUTS = [K8, InterleavedLayout(4, 4), InterleavedLayout(8, 8), InterleavedLayout(8, 1), InterleavedLayout(16, 2)]


def quantized(n: int, k: int, group: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    s = (rng.random((n, k // group)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    z = rng.integers(0, 16, (n, k // group)).astype(np.float32)
    return q, s, z


# ------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_pack_unpack_round_trip(layout) -> None:
    q, s, z = quantized(32, 256, 32)
    packed = layout.pack(q, s, z)
    assert [a.shape for a in packed] == layout.shapes(32, 256, 32)
    assert [a.dtype.name for a in packed] == list(DTYPES)
    for got, want in zip(layout.unpack(*packed), (q, s, z)):
        np.testing.assert_array_equal(got, want)


def test_interleaved_by_hand() -> None:
    """i8r1: in each 64-column block, word l nibble j is column 8j + l; i8r2: the two rows of a
    tile alternate block by block, and their scales sit side by side per group."""
    q = (np.arange(64) // 8).astype(np.uint8)[None, :]  # column c holds its nibble index c // 8
    words, _, _ = InterleavedLayout(8, 1).pack(q, np.ones((1, 1), np.float32), np.ones((1, 1), np.float32))
    assert words.tolist() == [[0x76543210] * 8]
    q2 = np.stack([np.full(128, 1, np.uint8), np.full(128, 2, np.uint8)])
    s2 = np.array([[10, 11], [20, 21]], np.float32)
    w2, s2p, _ = InterleavedLayout(8, 2).pack(q2, s2, np.zeros_like(s2))
    assert w2.shape == (1, 32)
    assert w2[0, :8].tolist() == [0x11111111] * 8 and w2[0, 8:16].tolist() == [0x22222222] * 8
    assert s2p.tolist() == [[10, 20, 11, 21]]


def test_zero_points_by_hand() -> None:
    """Zero c of a row is nibble c % 8 of word c // 8; 9 groups (576 / 64) pad the second word."""
    z = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 15], [0] * 8 + [9]], np.float32)
    words = pack_zeros(z)
    assert words.dtype == np.uint32 and words.tolist() == [[0x87654321, 0xF], [0, 9]]
    np.testing.assert_array_equal(unpack_zeros(words, 9), z)
    for bad in (np.array([[16.0]]), np.array([[-1.0]]), np.array([[2.5]])):
        with pytest.raises(ValueError, match="integers in \\[0, 15\\]"):
            pack_zeros(bad)
    assert pack_scales(np.array([[0.5, 1e-3]], np.float32)).dtype == np.float16
    with pytest.raises(ValueError, match="outside float16's range"):
        pack_scales(np.array([[1e5]], np.float32))


def test_bits_per_weight() -> None:
    """4 bits per weight + a float16 scale and a 4-bit zero per group: 4.16 at g128, 4.31 at g64."""
    for group, bpw in ((128, 4 + 20 / 128), (64, 4 + 20 / 64)):
        for layout in LAYOUTS:
            packed = layout.pack(*quantized(64, 1024, group))
            assert sum(a.nbytes for a in packed) * 8 / (64 * 1024) == bpw


def test_layout_names_match_the_runtimes() -> None:
    assert sorted(layout_names()) == sorted(KNOWN_LAYOUTS)
    cc = (Path(__file__).parents[1] / "runtime" / "cpp" / "awqc_runner.cc").read_text()
    start = cc.index("kKnownLayouts = {")
    listed = cc[start:cc.index("};", start)]
    assert sorted(name for name in layout_names() if f'"{name}"' in listed) == sorted(layout_names())
    assert get_layout("i8r4") == InterleavedLayout(8, 4)
    with pytest.raises(ValueError, match="unknown int4 layout 'x9'"):
        get_layout("x9")


def test_unsupported_shape_falls_back_to_k8() -> None:
    wide = InterleavedLayout(16, 8)
    assert choose_layout(wide, [(64, 512), (128, 1024)], 64) == wide
    assert choose_layout(wide, [(64, 512), (128, 576)], 64) == K8  # 576 is not a multiple of 128
    assert choose_layout(wide, [(60, 512)], 64) == K8  # 60 rows do not fill tiles of 8
    with pytest.raises(ValueError, match="cannot hold"):
        wide.pack(*quantized(8, 576, 64))


# ------------------------------------------------------------------------------------ kernels
def run_kernel(layout, k: int, n: int, group: int, rows: int | None, m: int, dtype: str = "float32",
               **knobs) -> float:
    """Relative error of the scheduled kernel against float64 numpy."""
    schedule = cpu_scheduler(layout, **knobs)
    func = schedule(layout.kernel(k, n, group, dtype, rows), group, rows)
    assert "T.parallel" in func.script() and "T.vectorized" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host").target())
    q, s, z = quantized(n, k, group, seed=k + n)
    s, z = s.astype(dtype), z.astype(dtype)
    x = np.random.default_rng(n).standard_normal((m, k)).astype(dtype)
    y = tvm.runtime.tensor(np.zeros((m, n), dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *layout.pack(q, s, z))], y)
    w = (q - np.repeat(z.astype(np.float64), group, 1)) * np.repeat(s.astype(np.float64), group, 1)
    ref = x.astype(np.float64) @ w.T
    return float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows, m", [(1, 1), (None, 13)], ids=["gemv", "gemm"])
def test_kernel_matches_numpy(layout, group: int, rows: int | None, m: int) -> None:
    k, n = 512, 48
    assert run_kernel(layout, k, n, group, rows, m) < 1e-5


@pytest.mark.parametrize("rows, m", [(1, 1), (None, 5)], ids=["gemv", "gemm"])
def test_kernel_float16_activations(rows: int | None, m: int) -> None:
    assert run_kernel(InterleavedLayout(8, 4), 256, 32, 64, rows, m, "float16") < 2e-3


@pytest.mark.parametrize("m", [8, 6, 2])
def test_gemm_with_static_rows(m: int) -> None:
    """A static row count: padded to the register tile only when it does not divide."""
    assert run_kernel(InterleavedLayout(8, 4), 256, 32, 64, m, m, gemm=lambda k, n: GemmKnobs(mr=4)) < 1e-5


def test_kernel_knobs_keep_numerics() -> None:
    layout = InterleavedLayout(8, 2)
    assert run_kernel(layout, 384, 40, 64, 1, 1, gemv=lambda k, n: GemvKnobs(unroll_steps=False)) < 1e-5
    odd = GemmKnobs(mr=6, nr=3, block_rows=12, lanes=16)  # 40 rows: nr falls back to a divisor
    assert run_kernel(layout, 384, 40, 64, None, 7, gemm=lambda k, n: odd) < 1e-5


# ------------------------------------------------------------------------------ tuning records
def write(path: Path, record: tuning.TuningRecord, **overrides) -> Path:
    data = {**record.to_json(), **overrides}
    path.write_text(json.dumps(data))
    return path


def test_record_round_trip_and_defaults(tmp_path: Path) -> None:
    spec = get_target("host")
    record = tuning.default_record(spec)
    record.layout = "i4r2"
    record.gemv["576x960"] = GemvKnobs(unroll_steps=False)
    record.gemm["576x960"] = GemmKnobs(mr=6, nr=2, block_rows=48, lanes=8)
    path = tuning.save_record(record, tmp_path / "r.json")
    loaded = tuning.load_record(spec, path)
    assert loaded.layout == "i4r2"
    assert loaded.gemv_knobs(576, 960) == GemvKnobs(unroll_steps=False)
    assert loaded.gemm_knobs(576, 960).mr == 6
    assert loaded.gemm_knobs(4096, 4096) == GemmKnobs()  # a shape it lacks: the defaults
    assert tuning.load_record(spec, tmp_path / "none.json") is None


def test_record_for_another_target_is_refused(tmp_path: Path) -> None:
    avx2 = tuning.default_record(get_target("x86-avx2"))
    path = write(tmp_path / "r.json", avx2)
    with pytest.raises(tuning.TuningRecordError, match="tuned for target x86-avx2.*awqc tune --target arm-neon"):
        tuning.load_record(get_target("arm-neon"), path)
    host = get_target("host")
    same_name_other_cpu = write(tmp_path / "h.json", tuning.default_record(host),
                                tvm_target={**host.tvm_target, "mcpu": "other-cpu"})
    with pytest.raises(tuning.TuningRecordError, match="other-cpu"):
        tuning.load_record(host, same_name_other_cpu)


def test_record_for_another_tvm_version_is_refused(tmp_path: Path) -> None:
    spec = get_target("x86-avx2")
    path = write(tmp_path / "r.json", tuning.default_record(spec), tvm_version="0.19.0")
    with pytest.raises(tuning.TuningRecordError, match=r"TVM 0\.19\.0, but this is TVM"):
        tuning.load_record(spec, path)


def test_damaged_record_is_refused(tmp_path: Path) -> None:
    spec = get_target("x86-avx2")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(tuning.TuningRecordError, match="not valid JSON"):
        tuning.load_record(spec, bad)
    with pytest.raises(tuning.TuningRecordError, match="not an awqc tuning record"):
        tuning.load_record(spec, write(tmp_path / "f.json", tuning.default_record(spec), format="other/1"))
    with pytest.raises(tuning.TuningRecordError, match="damaged"):
        tuning.load_record(spec, write(tmp_path / "l.json", tuning.default_record(spec), layout="q9"))


def shapes(quant: QuantizedWeights) -> list[tuple[int, int]]:
    return [tuple(q.shape) for q, _, _ in quant.quantized.values()]


def test_build_uses_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile packs in the record's layout (k8 when a weight does not fit it) and uses its knobs."""
    spec = get_target("x86-avx2")
    quant = QuantizedWeights(QuantScheme(group_size=64), {
        "a.weight": (torch.zeros(64, 512, dtype=torch.uint8), torch.ones(64, 8), torch.zeros(64, 8))}, {})
    monkeypatch.setattr(tuning, "RECORDS_DIR", tmp_path)
    assert w4_backend(spec, quant.scheme, shapes(quant)).layout == tuning.default_layout(spec)  # no record: defaults
    record = tuning.default_record(spec)
    record.layout = "i16r2"
    tuning.save_record(record, tuning.record_path(spec, tmp_path))
    assert w4_backend(spec, quant.scheme, shapes(quant)).layout == InterleavedLayout(16, 2)
    odd = dataclasses.replace(quant, quantized={
        "a.weight": (torch.zeros(64, 576, dtype=torch.uint8), torch.ones(64, 9), torch.zeros(64, 9))})
    assert w4_backend(spec, odd.scheme, shapes(odd)).layout == K8
    assert w4_backend(get_target("cuda-sm80"), quant.scheme, shapes(quant)).layout == K8  # the CUDA kernels read k8


def test_awqc_tune_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec.json"
    assert main(["tune", "--target", "host", "--shapes", "tiny", "--quick", "--group", "32", "-o", str(out)]) == 0
    record = tuning.load_record(get_target("host"), out)
    assert record.layout in layout_names() and record.machine
    assert set(record.gemv) == set(record.gemm) == {"256x128"}
    assert record.measured["gemv"]["256x128"]["GBps"] > 0
    assert "layout" in capsys.readouterr().err


def test_awqc_tune_refuses_a_foreign_target(capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--target", "arm-neon", "--shapes", "tiny"]) == 2
    assert "run `awqc tune` on the device itself" in capsys.readouterr().err
    assert main(["tune", "--shapes", "4096by4096"]) == 2
    assert "cannot parse shape" in capsys.readouterr().err
