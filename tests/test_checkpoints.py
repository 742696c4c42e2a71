"""Lazy checkpoint readers against transformers' own loading, and the streaming safetensors writer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.cli import main
from awqc.compiler.model_import import ModelImportError, default_model_path, load_model
from awqc.compiler.tensor_file import SafetensorsWriter
from awqc.runtime.artifact import load_safetensors

from conftest import make_checkpoint


def fused_reference(state: dict[str, torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """transformers' state dict under awqc's names, q/k/v and gate/up concatenated here."""
    sd = {k.removeprefix("model."): v.float().numpy() for k, v in state.items()}
    out = {}
    for i in range(cfg.num_hidden_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        out[f"{a}.qkv_proj.weight"] = np.concatenate([sd.pop(f"{a}.{x}_proj.weight") for x in "qkv"])
        out[f"{m}.gate_up_proj.weight"] = np.concatenate([sd.pop(f"{m}.{x}_proj.weight") for x in ("gate", "up")])
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {**sd, **out}


def test_default_gguf_reads_as_transformers_loads_it() -> None:
    """Dequantized tensor by tensor, q/k rows un-permuted: equal to transformers' whole-file load."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = load_model("default")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    expected = fused_reference(ref.state_dict(), model.config)
    assert set(model.weights) == set(expected)
    for name in ["embed_tokens.weight", "norm.weight", "layers.0.self_attn.qkv_proj.weight",
                 "layers.29.mlp.gate_up_proj.weight", "layers.7.mlp.down_proj.weight",
                 "layers.3.post_attention_layernorm.weight"]:
        np.testing.assert_array_equal(model.weights[name], expected[name], err_msg=name)


def test_bf16_checkpoint_read_lazily(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", attention_bias=True)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16)
    hf.save_pretrained(str(ckpt))  # bf16 on disk
    model = load_model(str(ckpt))
    expected = fused_reference(hf.state_dict(), model.config)
    expected.update({f"layers.{i}.self_attn.qkv_proj.bias": np.concatenate(
        [expected.pop(f"layers.{i}.self_attn.{x}_proj.bias") for x in "qkv"]) for i in range(2)})
    assert set(model.weights) == set(expected)
    for name, w in expected.items():
        np.testing.assert_array_equal(model.weights[name], w, err_msg=name)


def test_weight_shape_mismatch_named(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["compile", "--model", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    assert "gate_proj.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16,
                                     b"not a gguf file at all"])
def test_damaged_gguf_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelImportError, match="m.gguf"):
        load_model(str(path))


def test_streaming_writer_round_trip(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((5, 3)).astype(np.float32), "a.qweight": rng.integers(
        0, 2**32, (4, 2), dtype=np.uint32), "c": np.arange(7, dtype=np.float16), "empty": np.zeros((0, 4), np.int8)}
    paths = []
    for k in range(2):
        path = tmp_path / f"w{k}.safetensors"
        w = SafetensorsWriter(path, list(tensors), {"format": "test"})
        for name in ["c", "a.qweight", "empty", "b.weight"]:  # any order
            w.write(name, tensors[name])
        w.close()
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # deterministic
    for loaded in (load_file(str(paths[0])), load_safetensors(paths[0])):
        assert set(loaded) == set(tensors)
        for name, a in tensors.items():
            np.testing.assert_array_equal(loaded[name], a)
            assert loaded[name].dtype == a.dtype


def test_streaming_writer_refuses_incomplete(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "w.safetensors", ["a", "b"])
    w.write("a", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="never written: b"):
        w.close()
    with pytest.raises(ValueError, match="not expected"):
        SafetensorsWriter(tmp_path / "x.safetensors", ["a"]).write("z", np.zeros(1, np.float32))
