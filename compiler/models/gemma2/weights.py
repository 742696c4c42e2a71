"""Gemma 2's weight map: Gemma 3's without the per-head q/k norms (norm weights stay w, applied as
1 + w)."""
from __future__ import annotations

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.gemma3 import weights as gemma3
from awqc.compiler.models.gemma3.weights import embedding_scale
from awqc.compiler.models.llama.weights import checkpoint_parts, hf_block_weights

HF_TAPS = gemma3.HF_TAPS
_QK_NORMS = (".self_attn.q_norm.weight", ".self_attn.k_norm.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Gemma 2 takes, with its shape."""
    return {k: v for k, v in gemma3.expected_shapes(cfg).items() if not k.endswith(_QK_NORMS)}


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Gemma 2 checkpoint may hold, without the `model.` prefix."""
    return [n for n in gemma3.checkpoint_names(cfg) if not n.endswith(_QK_NORMS)]


__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "hf_block_weights"]
