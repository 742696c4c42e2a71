"""Phi-3's weight map: Llama's parameters, stored fused in the checkpoint already (qkv_proj,
gate_up_proj), so each awqc parameter is one checkpoint tensor under its own name."""
from __future__ import annotations

from typing import Mapping

import torch

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama.weights import embedding_scale, expected_shapes

# transformers' Phi3DecoderLayer linears whose inputs calibration taps → the awqc weight fed
HF_TAPS = {m: f"{m}.weight" for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                           "mlp.down_proj")}


def checkpoint_parts(cfg: ModelConfig, name: str) -> list[str]:
    return [name]


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Phi-3 checkpoint holds, without the `model.` prefix."""
    names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.self_attn.qkv_proj.weight", f"{p}.self_attn.o_proj.weight",
                  f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight"]
    return names


def hf_block_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A block's awqc weights as transformers' Phi3DecoderLayer names them: the same, unprefixed."""
    return {name.removeprefix(prefix): w for name, w in weights.items()}


__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "hf_block_weights"]
