"""Gemma 2, as transformers' modeling_gemma2 computes it: Gemma 3's blocks (compiler/models/gemma3)
without the per-head q/k norms, with one RoPE base in every layer, sliding and full-attention
layers alternating, and two soft-caps, cap * tanh(x / cap): on the attention scores (inside the
CPU attention kernels, passes/cpu_attention.py) and on the final logits (in the graph). TVM's CUDA
attention kernels take no soft-cap, so a CUDA target is refused for a model that sets one
(compiler/models/llama/model.py's `export`)."""
from __future__ import annotations

from typing import Any

from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.gemma3.model import Gemma3Attention, Gemma3DecoderLayer, Gemma3ForCausalLM
from awqc.compiler.models.llama.model import export


class Gemma2Attention(Gemma3Attention):
    qk_norm = False


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    attention = Gemma2Attention


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    layer = Gemma2DecoderLayer


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(Gemma2ForCausalLM(cfg, dtype, target, separate_head))
