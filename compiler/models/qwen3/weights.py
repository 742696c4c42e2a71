"""Qwen3's weight map: Llama's, plus each block's per-head q/k norm weights."""
from __future__ import annotations

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama import weights as llama
from awqc.compiler.models.llama.weights import HF_TAPS, checkpoint_parts, embedding_scale, hf_block_weights

_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Qwen3 takes, with its shape."""
    shapes = llama.expected_shapes(cfg)
    for n in range(cfg.num_hidden_layers):
        shapes.update({f"layers.{n}.{w}": (cfg.head_dim,) for w in _QK_NORMS})
    return shapes


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Qwen3 checkpoint may hold, without the `model.` prefix."""
    return llama.checkpoint_names(cfg) + [f"layers.{n}.{w}" for n in range(cfg.num_hidden_layers) for w in _QK_NORMS]


__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "hf_block_weights"]
