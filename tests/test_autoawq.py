"""AutoAWQ GEMM interop: the packing order, a bit-exact round trip, an independent reference
dequantizer, and checkpoints that do not match their config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from awqc.compiler.autoawq import (AutoAWQError, load_autoawq_model, pack_columns, read_autoawq, unpack_columns,
                                   write_autoawq)
from awqc.compiler.awq import rtn
from awqc.compiler.cli import main
from awqc.compiler.model_import import load_model
from awqc.passes.quantizer import QuantScheme

from conftest import TEXT, make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(make_checkpoint(tmp_path_factory.mktemp("aa") / "ckpt", seed=11, attention_bias=True,
                                          tie_word_embeddings=False)))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    qw = rtn(model, QuantScheme(group_size=32))
    return write_autoawq(tmp_path_factory.mktemp("aa") / "awq", model.config, qw, model.tokenizer)


def test_packing_order() -> None:
    # Columns 0..7 hold the values 0..7: nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i].
    word = pack_columns(np.arange(8)[None]).view(np.uint32)[0, 0]
    assert word == 0x75316420
    v = np.random.RandomState(0).randint(0, 16, size=(5, 24))
    np.testing.assert_array_equal(unpack_columns(pack_columns(v)), v)


def _reference_dequant(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """AutoAWQ's dequantization written independently: shift out the 8 nibbles of each word, put
    them back in column order (nibble i belongs to column ORDER[i]), then (q - z) * s; gives W^T [K, N]."""
    def unpack(x: np.ndarray) -> np.ndarray:
        nib = np.stack([(x.view(np.uint32) >> (4 * i)) & 15 for i in range(8)], -1)  # [R, C/8, 8]
        inverse = np.argsort([0, 2, 4, 6, 1, 3, 5, 7])  # column c sits at nibble inverse[c]
        return nib[:, :, inverse].reshape(x.shape[0], -1).astype(np.float32)

    z = np.repeat(unpack(qzeros), group, 0)
    s = np.repeat(scales.astype(np.float32), group, 0)
    return (unpack(qweight) - z) * s


def test_round_trip_bit_exact(model, exported: Path, tmp_path: Path) -> None:
    qw = rtn(model, QuantScheme(group_size=32))
    cfg, back = read_autoawq(exported)
    assert cfg == model.config and back.scheme == qw.scheme
    assert set(back.quantized) == set(qw.quantized) and set(back.floats) == set(qw.floats)
    for name, (q, scale, zero) in qw.quantized.items():
        q2, scale2, zero2 = back.quantized[name]
        assert torch.equal(q2, q) and torch.equal(zero2, zero), name
        assert torch.equal(scale2, scale.half().float()), name  # AutoAWQ stores fp16 scales
    again = write_autoawq(tmp_path / "again", cfg, back)
    a, b = load_file(str(exported / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_matches_reference_dequantization(exported: Path) -> None:
    t = load_file(str(exported / "model.safetensors"))
    _, back = read_autoawq(exported)
    deq = back.dequantized()
    p = "model.layers.1.self_attn"
    ref = np.concatenate([_reference_dequant(t[f"{p}.{x}_proj.qweight"], t[f"{p}.{x}_proj.qzeros"],
                                             t[f"{p}.{x}_proj.scales"], 32).T for x in "qkv"], 0)
    np.testing.assert_allclose(deq["layers.1.self_attn.qkv_proj.weight"].numpy(), ref, rtol=1e-6, atol=1e-7)
    assert t[f"{p}.q_proj.qweight"].dtype == np.int32 and t[f"{p}.q_proj.scales"].dtype == np.float16


def test_shapes_that_do_not_match_the_config(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((exported / "config.json").read_text())
    cfg["intermediate_size"] = 64  # the checkpoint's MLP has 96
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(exported / "model.safetensors")), str(bad / "model.safetensors"))
    with pytest.raises(AutoAWQError, match=r"tensor layers\.0\.mlp\.gate_proj\.qweight has shape \(64, 12\) "
                                           r"but the checkpoint's config implies \(64, 8\)"):
        read_autoawq(bad)


def test_unsupported_quant_configs(exported: Path, tmp_path: Path) -> None:
    for change, message in [({"version": "gemv"}, "version 'gemv' is not supported"),
                            ({"bits": 8}, "8-bit AWQ checkpoints are not supported"),
                            ({"zero_point": False}, "zero_point=false is not supported")]:
        d = tmp_path / change.__repr__().replace(" ", "").replace("'", "").strip("{}").replace(":", "-")
        d.mkdir()
        cfg = json.loads((exported / "config.json").read_text())
        cfg["quantization_config"].update(change)
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(AutoAWQError, match=message):
            read_autoawq(d)


def test_eval_reads_an_autoawq_checkpoint(exported: Path, model, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    loaded, _ = load_autoawq_model(exported)
    deq = rtn(model, QuantScheme(group_size=32)).dequantized()
    w = "layers.0.mlp.down_proj.weight"
    np.testing.assert_allclose(loaded.weights[w], deq[w].numpy(), rtol=2e-3, atol=1e-6)  # fp16 scales
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(TEXT * 20))
    assert main(["eval", "--model", str(exported), "--text", str(text), "--windows", "1", "--window-len", "32",
                 "--quiet"]) == 0
    assert "| float | – |" in capsys.readouterr().out


@pytest.mark.parametrize("model_type,kw", [
    ("llama", dict(attention_bias=True)), ("mistral", dict(sliding_window=48)), ("qwen2", {}),
    ("qwen3", dict(head_dim=24)), ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Phi-4-mini's kind: partial RoPE and LongRoPE
    ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.75,
                  original_max_position_embeddings=64, rope_scaling={
        "type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.3], "long_factor": [1.0, 2, 4, 8, 16, 32]})),
    ("gemma3_text", dict(head_dim=32, sliding_window=48, query_pre_attn_scalar=24, rope_scaling={
        "rope_type": "linear", "factor": 4.0}, rope_local_base_freq=20000.0)),
    ("gemma2", dict(head_dim=32, sliding_window=48, query_pre_attn_scalar=24, attn_logit_softcapping=40.0,
                    final_logit_softcapping=None)),
])
def test_config_json_round_trips(model_type: str, kw: dict) -> None:
    """The config.json written beside AutoAWQ weights (and given to transformers' layers in
    calibration) reads back as the same model, for every family."""
    from transformers import AutoConfig

    from awqc.compiler.autoawq import hf_config
    from awqc.compiler.config import config_from_hf
    from awqc.compiler.models import FAMILIES

    hf = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              **kw).to_dict()
    cfg = config_from_hf({**hf, "architectures": [FAMILIES[model_type][0]]})
    assert config_from_hf(hf_config(cfg)) == cfg
    assert model_type != "mistral" or cfg.sliding_window == 48


def test_phi3_round_trips_in_autoawqs_fused_layout(tmp_path: Path) -> None:
    """AutoAWQ's Phi-3 layout quantizes the checkpoint's own fused qkv_proj and gate_up_proj: awqc
    writes them so (checked with the independent dequantizer) and reads them back bit-exact."""
    from awqc.compiler.awq import quantize_model

    model = load_model(str(make_checkpoint(tmp_path / "ckpt", model_type="phi3", pad_token_id=0,
                                           tie_word_embeddings=False)))
    qw = quantize_model(model, "rtn", QuantScheme(group_size=32))
    out = write_autoawq(tmp_path / "awq", model.config, qw, model.tokenizer)
    t = load_file(str(out / "model.safetensors"))
    p = "model.layers.0"
    assert {f"{p}.self_attn.qkv_proj.qweight", f"{p}.mlp.gate_up_proj.qweight"} <= set(t)
    assert not any(".q_proj." in k or ".gate_proj." in k for k in t)
    w = model.weights["layers.0.self_attn.qkv_proj.weight"]
    deq = _reference_dequant(t[f"{p}.self_attn.qkv_proj.qweight"], t[f"{p}.self_attn.qkv_proj.qzeros"],
                             t[f"{p}.self_attn.qkv_proj.scales"], 32).T
    assert deq.shape == w.shape and np.abs(deq - w).max() < 0.6 * np.abs(w).max() / 15 * 2  # within RTN's step
    cfg, back = read_autoawq(out)
    assert cfg == model.config
    for name, (q, scale, zero) in qw.quantized.items():
        q2, scale2, zero2 = back.quantized[name]
        assert torch.equal(q2, q) and torch.equal(zero2, zero) and torch.equal(scale2, scale.half().float()), name


@pytest.mark.parametrize("model_type,kw", [
    ("qwen3", dict(head_dim=24)),  # per-head q/k norms
    ("gemma2", dict(head_dim=32, attn_logit_softcapping=30.0)),  # four (1 + w) norms per block
    ("gemma3_text", dict(head_dim=32, sliding_window=48)),  # and per-head q/k norms
])
def test_families_with_more_norms_round_trip(model_type: str, kw: dict, tmp_path: Path) -> None:
    """Every norm of the family is written beside the quantized linears and read back (none is
    dropped for the names Llama has), and the checkpoint loads as the model it was written from."""
    model = load_model(str(make_checkpoint(tmp_path / "ckpt", model_type=model_type, tie_word_embeddings=False, **kw)))
    qw = rtn(model, QuantScheme(group_size=32))
    out = write_autoawq(tmp_path / "awq", model.config, qw, model.tokenizer)
    norms = {k for k in model.weights if "norm" in k}
    assert {"layers.0.self_attn.q_norm.weight", "layers.1.post_feedforward_layernorm.weight"} & norms
    assert {f"model.{k}" for k in norms} <= set(load_file(str(out / "model.safetensors")))
    cfg, back = read_autoawq(out)
    assert cfg == model.config and set(back.floats) == set(qw.floats)
    for name, w in qw.floats.items():
        assert torch.equal(back.floats[name], w.half().float()), name  # stored as fp16
    for name, (q, scale, zero) in qw.quantized.items():
        q2, scale2, zero2 = back.quantized[name]
        assert torch.equal(q2, q) and torch.equal(zero2, zero) and torch.equal(scale2, scale.half().float()), name
    loaded, _ = load_autoawq_model(out)
    assert set(loaded.weights) == set(model.weights)
