"""Mixtral (`mixtral`: MixtralForCausalLM): Mistral's attention with a mixture of experts as every
layer's MLP (compiler/models/moe.py)."""
from .model import export_awq_view, export_model
from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_awq_view", "export_model",
           "hf_block_weights"]
