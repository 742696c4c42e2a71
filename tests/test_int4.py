"""Int4 lowering: packed weights, dequant-fused kernels, end to end against the fake-quant reference."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from awqc.compiler.build import write_artifact
from awqc.compiler.awq import quantize_model
from awqc.compiler.cli import main
from awqc.compiler.models.llama import export_model
from awqc.compiler.model_import import load_model
from awqc.compiler.pipeline import relax_pipeline
from awqc.compiler.targets import get_target
from awqc.passes.quantize_linear import quantize_linear, quantized_param_names
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.engine import Engine
from awqc.schedules.layouts import get_layout
from awqc.schedules.tuning import record_for
from awqc.schedules.w4_kernels import pack_k8, unpack_k8

from conftest import make_checkpoint, rel_err


def test_pack_k8_by_hand() -> None:
    q = np.arange(16, dtype=np.uint8).reshape(1, 16) % 16
    packed = pack_k8(q)
    assert packed.tolist() == [[0x76543210, 0xFEDCBA98]]
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(7, 64), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_k8(pack_k8(q)), q)


@pytest.fixture(scope="module")
def quantized_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An int4 artifact and a float artifact of the same weights, dequantized (fake-quant)."""
    root = tmp_path_factory.mktemp("int4")
    model = load_model(str(make_checkpoint(root / "ckpt", seed=3, intermediate_size=128)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), quantize_head=False)
    int4 = write_artifact(root / "int4", model, get_target("host"), "float32", 128, quant=quant, method="rtn")
    fake = dataclasses.replace(model, weights={k: v.numpy() for k, v in quant.dequantized().items()})
    ref = write_artifact(root / "fake", fake, get_target("host"), "float32", 128)
    return int4, ref


def test_int4_artifact_matches_fake_quant_reference(quantized_pair: tuple[Path, Path]) -> None:
    int4, ref = (Engine(p) for p in quantized_pair)
    ids = list(np.random.RandomState(4).randint(3, 300, size=50))
    assert rel_err(int4.score(ids), ref.score(ids)) < 1e-5
    assert list(int4.generate(ids, 8)) == list(ref.generate(ids, 8))
    int4.reset(), ref.reset()
    a, b = int4.prefill(ids), ref.prefill(ids)
    for _ in range(4):
        token = int(b.argmax())
        a, b = int4.decode(token), ref.decode(token)
        assert rel_err(a, b) < 1e-5


def test_manifest_names_the_layout(quantized_pair: tuple[Path, Path]) -> None:
    info = Engine(quantized_pair[0]).manifest["quantization"]
    # the host's layout: its tuning record's (schedules/records/), else the default
    assert info["layout"] == record_for(get_target("host")).layout
    assert info["scheme"] == "w4g32" and info["method"] == "rtn"
    assert "layers.0.mlp.down_proj.weight" in info["quantized"]
    assert "embed_tokens.weight" not in info["quantized"]


def test_no_float_weight_matrix_materialized(tiny_ckpt: Path) -> None:
    model = load_model(str(tiny_ckpt))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), quantize_head=False)
    spec = get_target("host")
    mod, named = export_model(model.config, "float32", spec.target())
    names = [n for n, _ in named]
    mod = quantize_linear(mod, names, set(quant.quantized), 32)
    lowered = relax_pipeline(spec)(mod)
    text = lowered.script()
    weight_shapes = {tuple(model.weights[n].shape) for n in quant.quantized}
    weight_sizes = {a * b for a, b in weight_shapes}
    # No Relax tensor of a weight's [N, K] float shape, and no TIR buffer of that many floats.
    for n, k in weight_shapes:
        assert not re.search(rf"R\.Tensor\(\({n}, {k}\), dtype=\"float", text), (n, k)
    static_allocs = re.findall(r"alloc_buffer\(\(([\d, ]+)\)", text)
    assert static_allocs  # the check below must have something to look at
    for shape in static_allocs:
        assert np.prod([int(d) for d in shape.split(",") if d.strip()]) not in weight_sizes, shape
    assert "w4_gemv" in text and "w4_gemm" in text
    assert len(quantized_param_names(names, set(quant.quantized))) == len(names) + 2 * len(quant.quantized)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_group_size_that_does_not_divide_a_layer(method: str, tiny_ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["compile", "--model", str(tiny_ckpt), "--quant", f"{method}-w4g128", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"layer layers\.0\.\S+ has 64 input features, not a multiple of group size 128; "
                     r"group sizes that divide it: 64, 32", err), err
    assert "calibrate" not in err  # AWQ refuses before calibrating
    assert not out.exists()


def test_unknown_quant_method(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compile", "--model", str(tiny_ckpt), "--quant", "gptq-w4g64", "-o", str(tmp_path / "o")]) == 2
    assert "unknown quantization method 'gptq'" in capsys.readouterr().err


def test_runtime_refuses_unknown_layout(tmp_path: Path, quantized_pair: tuple[Path, Path]) -> None:
    import json
    import shutil

    from awqc.runtime.artifact import ArtifactError, write_manifest

    art = tmp_path / "art"
    shutil.copytree(quantized_pair[0], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["quantization"]["layout"] = "neon-interleaved-v9"
    write_manifest(art, manifest)  # re-sealed: as if built so, not edited
    with pytest.raises(ArtifactError, match="layout 'neon-interleaved-v9'"):
        Engine(art)


def test_quantized_tied_head_matches_fake_quant(tmp_path: Path, tiny_ckpt: Path) -> None:
    model = load_model(str(tiny_ckpt))
    assert model.config.tie_word_embeddings
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32), quantize_head=True)
    assert "lm_head.weight" in quant.quantized and "embed_tokens.weight" in quant.floats
    int4 = Engine(write_artifact(tmp_path / "q", model, get_target("host"), "float32", 64, quant=quant, method="rtn"))
    # Reference: untied float model whose head is the dequantized copy, embedding untouched.
    deq = {k: v.numpy() for k, v in quant.dequantized().items()}
    untied = dataclasses.replace(model.config, tie_word_embeddings=False)
    ref = Engine(write_artifact(tmp_path / "f", dataclasses.replace(model, config=untied, weights=deq),
                                get_target("host"), "float32", 64))
    ids = list(np.random.RandomState(5).randint(3, 300, size=20))
    assert rel_err(int4.score(ids), ref.score(ids)) < 1e-5
    assert not np.allclose(deq["lm_head.weight"], deq["embed_tokens.weight"])  # the head really is quantized


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_compile_matches_its_fake_quant_reference(tmp_path: Path, method: str) -> None:
    """`awqc compile --quant awq-...` calibrates, searches and lowers; the artifact equals the float
    model run on the same AWQ weights dequantized (recomputed here from the saved statistics)."""
    from awqc.compiler.calibrate import CalibrationSettings, calibration_stats

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, intermediate_size=128)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and token{i % 13}." for i in range(800)))
    out, stats_file = tmp_path / "awq", tmp_path / "stats.safetensors"
    assert main(["compile", "--model", str(ckpt), "--quant", f"{method}-w4g32", "--calib-text", str(text),
                 "--calib-samples", "3", "--calib-seq-len", "32", "--calib-stats", str(stats_file),
                 "--context-window", "128", "-o", str(out)]) == 0
    engine = Engine(out)
    assert engine.manifest["quantization"]["method"] == method
    model = load_model(str(ckpt))
    stats = calibration_stats(model, CalibrationSettings(text, 3, 32, cache=stats_file), progress=False)
    assert stats.seconds == {}  # read from the compile's cache, not recomputed
    quant = quantize_model(model, method, QuantScheme(group_size=32), stats=stats)
    rtn = quantize_model(model, "rtn", QuantScheme(group_size=32)).dequantized()
    assert any(not torch.equal(w, rtn[n]) for n, w in quant.dequantized().items())  # AWQ changed the weights
    if method == "awq+gptq":  # the same grid as AWQ's, other levels
        awq = quantize_model(model, "awq", QuantScheme(group_size=32), stats=stats).quantized
        assert all(torch.equal(quant.quantized[n][1], awq[n][1]) for n in awq)
        assert any(not torch.equal(quant.quantized[n][0], awq[n][0]) for n in awq)
    fake = dataclasses.replace(model, weights={k: v.numpy() for k, v in quant.dequantized().items()})
    ref = Engine(write_artifact(tmp_path / "fake", fake, get_target("host"), "float32", 128))
    ids = list(np.random.RandomState(6).randint(3, 300, size=40))
    assert rel_err(engine.score(ids), ref.score(ids)) < 1e-5


def test_block_loss_compile_matches_its_fake_quant_reference(tmp_path: Path) -> None:
    """`--awq-loss block` searches other scales than the default loss, and its artifact equals the
    float model run on the same weights dequantized (searched again here, block by block)."""
    from awqc.compiler.awq import awq_graph, quantized_blocks
    from awqc.compiler.build import QuantConfig
    from awqc.compiler.calibrate import CalibrationSettings

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, intermediate_size=128)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and token{i % 13}." for i in range(800)))
    out = tmp_path / "awq"
    assert main(["compile", "--model", str(ckpt), "--quant", "awq-w4g32", "--awq-loss", "block",
                 "--awq-loss-samples", "3", "--calib-text", str(text), "--calib-samples", "3", "--calib-seq-len", "32",
                 "--context-window", "128", "-o", str(out)]) == 0
    model = load_model(str(ckpt))
    func, names = awq_graph(model)

    def weights(probe_samples: int) -> dict[str, torch.Tensor]:
        quant = QuantConfig(QuantScheme(group_size=32), "awq", False, CalibrationSettings(text, 3, 32, probe_samples=probe_samples))
        parts = list(quantized_blocks(model, quant, func, names, progress=False))
        return {n: w for p in parts for n, w in p.dequantized().items()}

    block, linear = weights(3), weights(0)
    assert any(not torch.equal(w, linear[n]) for n, w in block.items())
    fake = dataclasses.replace(model, weights={k: v.numpy() for k, v in block.items()})
    ref = Engine(write_artifact(tmp_path / "fake", fake, get_target("host"), "float32", 128))
    ids = list(np.random.RandomState(6).randint(3, 300, size=40))
    assert rel_err(Engine(out).score(ids), ref.score(ids)) < 1e-5


@pytest.mark.parametrize("group", [32, 64, 128])
def test_bits_per_weight_is_what_the_layout_stores(group: int) -> None:
    """A 4-bit weight, plus a float16 scale and a 4-bit zero per group: 4.625 / 4.3125 / 4.15625
    by hand, and the bytes the k8 layout packs a [64, 1024] weight into."""
    scheme = QuantScheme(group_size=group)
    assert scheme.bits_per_weight == {32: 4.625, 64: 4.3125, 128: 4.15625}[group]
    n, k = 64, 1024
    rng = np.random.default_rng(0)
    packed = get_layout("k8").pack(rng.integers(0, 16, (n, k), dtype=np.uint8),
                                   rng.random((n, k // group), dtype=np.float32), rng.integers(0, 16, (n, k // group)))
    assert 8 * sum(a.nbytes for a in packed) / (n * k) == scheme.bits_per_weight
