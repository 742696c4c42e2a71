"""Phi-3 / Phi-3.5-mini: the Llama computation (RMSNorm, SiLU-gated MLP, GQA, no biases) with
q/k/v and gate/up fused in the checkpoint itself, and LongRoPE (model.py)."""
from .model import export_model

from .weights import (HF_TAPS, checkpoint_names, checkpoint_parts, embedding_scale, expected_shapes,
                      hf_block_weights)

__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "export_model",
           "hf_block_weights"]
