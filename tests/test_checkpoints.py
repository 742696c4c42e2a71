"""Lazy checkpoint readers against transformers' own loading, and the streaming safetensors writer."""
from __future__ import annotations

import json
import math
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


def _gguf_of(model, arch: str, out: Path, extra: dict[str, np.ndarray] | None = None) -> Path:
    """A float32 GGUF of a transformers model as llama.cpp's converter lays one out for `arch`
    (tensor names from gguf's map, no q/k permutation outside llama, Gemma's norm weights stored
    as 1 + w and its soft-caps as metadata), with the default model's tokenizer (the model's vocab_size must be its 49152)."""
    import gguf

    cfg = model.config
    default = gguf.GGUFReader(str(default_model_path()))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else rope["rope_theta"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, key) is not None:
                getattr(w, f"add_{key}")(getattr(cfg, key))
    if arch == "phi3":  # llama.cpp's Phi-3 converter: the rotated dimensions, LongRoPE's factors as tensors
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings)))
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], np.float32))
    w.add_vocab_size(cfg.vocab_size)
    for field in default.fields.values():  # the tokenizer, as the default GGUF carries it
        if field.name.startswith("tokenizer.ggml."):
            value = field.contents()
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, value, kind, sub_type=sub)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        shift = 1.0 if arch in ("gemma2", "gemma3") and name.endswith("norm.weight") else 0.0
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy() + shift)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_mixture_of_experts_gguf_is_refused(tmp_path: Path) -> None:
    """llama.cpp's Mixtral GGUFs say architecture llama and stack each layer's experts as
    ffn_*_exps tensors: refused by name, not read as a dense Llama missing its MLP."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).eval()
    path = _gguf_of(hf, "llama", tmp_path / "moe.gguf", {"blk.0.ffn_gate_exps.weight": np.zeros((4, 8, 64), np.float32)})
    with pytest.raises(ModelImportError, match="is a mixture-of-experts GGUF, which awqc does not read yet"):
        load_model(str(path))


def test_phi3_gguf_reads_its_rope(tmp_path: Path) -> None:
    """A Phi-4-mini-like GGUF as llama.cpp's converter writes it (the rotated dimensions and
    LongRoPE's original context and cos/sin scale as metadata, its factors as tensors; none of
    which transformers' GGUF config reader maps): awqc's RoPE is the checkpoint's, not plain RoPE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    short, long = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], [1.0, 2.0, 4.0, 8.0, 16.0, 24.0]  # Phi-4-mini: 3/4 of 16 rotated
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "phi3", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=64,
        partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}, pad_token_id=0)).eval()
    cfg = load_model(str(_gguf_of(hf, "phi3", tmp_path / "phi3.gguf"))).config
    rope = cfg.rope_scaling
    assert rope["rope_type"] == "longrope"
    for kind, want in (("short", short), ("long", long)):  # stored as float32, as RoPE computes with them
        np.testing.assert_array_equal(np.float32(rope[f"{kind}_factor"]), np.float32(want))
    assert rope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)), rel=1e-6)
    assert cfg.max_context == 64 and cfg.max_position_embeddings == 256 and cfg.rotary_dim == 12


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gemma3_text", "gemma2"])
def test_gguf_of_another_family_reads_as_its_checkpoint(tmp_path: Path, model_type: str) -> None:
    """Qwen3 (per-head q/k norms), Phi-3 (q/k/v and gate/up fused in the file) and Gemma 2 and 3
    (norms stored as 1 + w; Gemma 2's soft-caps as metadata, here not transformers' defaults) from
    a GGUF laid out as llama.cpp's converter does: awqc's config and weights equal the
    transformers model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tied = model_type != "phi3"
    kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    if model_type in ("gemma3_text", "gemma2"):
        # transformers' Gemma tokenizer converter adds a token to the GGUF's vocabulary; llama.cpp
        # scales attention by head_dim ** -0.5 outside the 27B models
        kw.update(head_dim=16, sliding_window=32, vocab_size=49153, query_pre_attn_scalar=16)
    if model_type == "gemma2":
        kw.update(attn_logit_softcapping=20.0, final_logit_softcapping=None)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    arch = {"gemma3_text": "gemma3"}.get(model_type, model_type)
    model = load_model(str(_gguf_of(hf, arch, tmp_path / f"{model_type}.gguf")))
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == \
        (model_type, 2, 2, getattr(hf.config, "head_dim", None) or 64 // 4, tied)
    sd = {k.removeprefix("model."): v.float().numpy() for k, v in hf.state_dict().items()}
    if model_type != "phi3":
        expected = fused_reference(hf.state_dict(), cfg)
    else:  # Phi-3 stores qkv_proj and gate_up_proj already fused, as awqc does
        expected = {k: v for k, v in sd.items()}
    if model_type in ("gemma3_text", "gemma2"):
        assert cfg.attention_scale == hf.config.query_pre_attn_scalar ** -0.5
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (
            getattr(hf.config, "attn_logit_softcapping", None), getattr(hf.config, "final_logit_softcapping", None))
    if model_type in ("gemma3_text", "gemma2"):  # the file holds 1 + w in float32, so w comes back as (1 + w) - 1
        expected = {k: (v + np.float32(1)) - np.float32(1) if k.endswith("norm.weight") else v
                    for k, v in expected.items()}
    assert set(model.weights) == set(expected)
    for name, w in expected.items():
        np.testing.assert_array_equal(model.weights[name], w, err_msg=name)
