"""Qwen3-MoE: Qwen3 (per-head q/k norms) whose MLPs are mixtures of experts, except in the dense
layers (`mlp_only_layers`, `decoder_sparse_step`)."""
from __future__ import annotations

from typing import Any

from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.targets import get_target
from awqc.compiler.models.llama.model import LlamaForCausalLM, export
from awqc.compiler.models.mixtral.model import MoEDecoderLayer
from awqc.compiler.models.moe import awq_view
from awqc.compiler.models.qwen3.model import Qwen3Attention


class Qwen3MoeDecoderLayer(MoEDecoderLayer):
    attention = Qwen3Attention


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer = Qwen3MoeDecoderLayer


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(Qwen3MoeForCausalLM(cfg, dtype, target, separate_head))


def export_awq_view(cfg: ModelConfig) -> tuple[Any, list[tuple[str, Any]]]:
    """The float32 host graph AWQ finds its groups in: one linear per expert (moe.awq_view)."""
    return export(awq_view(Qwen3MoeForCausalLM)(cfg, "float32", get_target("host").target()))
