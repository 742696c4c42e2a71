"""Qwen3-MoE (`qwen3_moe`: Qwen3MoeForCausalLM, Qwen3-30B-A3B's kind): Qwen3's attention with
mixtures of experts as the MLPs of its MoE layers (compiler/models/moe.py)."""
from .model import export_awq_view, export_model
from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_awq_view", "export_model",
           "hf_block_weights"]
