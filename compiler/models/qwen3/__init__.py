"""Qwen3 (dense): Llama with per-head q/k RMSNorm."""
from .model import export_model
from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_model",
           "hf_block_weights"]
