"""Gemma 3 text models (`gemma3_text`: Gemma3ForCausalLM, the 270M and 1B checkpoints)."""
from .model import export_model
from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_model",
           "hf_block_weights"]
