"""Llama, Mistral (full attention) and Qwen2: one definition, their differences (biases) read
from the config."""
from .model import export_model
from .weights import checkpoint_names, checkpoint_parts, expected_shapes

__all__ = ["checkpoint_names", "checkpoint_parts", "expected_shapes", "export_model"]
