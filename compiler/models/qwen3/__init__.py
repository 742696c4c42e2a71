"""Qwen3 (dense): Llama with per-head q/k RMSNorm."""
from .model import export_model
from .weights import checkpoint_names, checkpoint_parts, expected_shapes

__all__ = ["checkpoint_names", "checkpoint_parts", "expected_shapes", "export_model"]
