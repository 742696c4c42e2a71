"""Gemma 2 (`gemma2`: Gemma2ForCausalLM, the 2B, 9B and 27B checkpoints)."""
from .model import export_model
from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_model",
           "hf_block_weights"]
