"""Gemma 3's weight map: Llama's, plus per block the q/k norms and the norms before and after
the MLP (Gemma's post_attention_layernorm normalizes the attention output, where Llama's of the
same name normalizes the MLP input). Norm weights stay as the checkpoint holds them (w, applied
as 1 + w)."""
from __future__ import annotations

import math

import numpy as np

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama import weights as llama
from awqc.compiler.models.llama.weights import checkpoint_parts, hf_block_weights

_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "pre_feedforward_layernorm.weight",
          "post_feedforward_layernorm.weight")

HF_TAPS = llama.HF_TAPS


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Gemma 3 takes, with its shape."""
    shapes = llama.expected_shapes(cfg)
    for n in range(cfg.num_hidden_layers):
        shapes[f"layers.{n}.self_attn.q_norm.weight"] = shapes[f"layers.{n}.self_attn.k_norm.weight"] = (cfg.head_dim,)
        shapes[f"layers.{n}.pre_feedforward_layernorm.weight"] = (cfg.hidden_size,)
        shapes[f"layers.{n}.post_feedforward_layernorm.weight"] = (cfg.hidden_size,)
    return shapes


def embedding_scale(cfg: ModelConfig) -> float:
    """Gemma multiplies the embedding rows by sqrt(hidden_size), rounded to float32 as transformers
    does in a float32 model (the graph's constant is rounded to the weights' dtype)."""
    return float(np.float32(math.sqrt(cfg.hidden_size)))


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Gemma 3 checkpoint may hold, without the `model.` prefix."""
    return llama.checkpoint_names(cfg) + [f"layers.{n}.{w}" for n in range(cfg.num_hidden_layers) for w in _NORMS]


__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "hf_block_weights"]
