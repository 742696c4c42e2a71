"""The model families awqc compiles, by config.json's `model_type`.

A family is one package here exposing:
- `export_model(cfg, dtype, target, separate_head)` → (Relax IRModule, parameter list), its
  `tvm.relax.frontend.nn` definition;
- `expected_shapes(cfg)` → every awqc parameter name and shape;
- `checkpoint_parts(cfg, name)` → the checkpoint tensors an awqc parameter is fused or stacked from;
- `checkpoint_names(cfg)` → every tensor name a checkpoint of the family may hold;
- `hf_block_weights(cfg, weights, prefix)` → a block's awqc weights under the names of
  transformers' decoder layer, and `HF_TAPS` (that layer's linears whose inputs calibration taps
  → the awqc weight each feeds): calibration runs transformers' own layer for its family.
Import, calibration, AWQ and the build read these instead of naming parameters themselves.
Families are imported when first asked for: config validation needs only the tables below.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# model_type → (the transformers class of that name, the package here that defines it)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "llama"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ARCHITECTURES = tuple(arch for arch, _ in FAMILIES.values())


def family(model_type: str) -> ModuleType:
    """The package defining `model_type` (a validated config's, so it is in FAMILIES)."""
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type][1]}")
