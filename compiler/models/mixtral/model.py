"""Mixtral: the Llama definition (Mistral's attention, sliding window included) whose MLPs are
mixtures of experts."""
from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.targets import get_target
from awqc.compiler.models.llama.model import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, export
from awqc.compiler.models.moe import MoE, awq_view


class MoEDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: ModelConfig, dtype: str, layer: int) -> nn.Module:
        return MoE(cfg, dtype) if layer in cfg.moe_layers else LlamaMLP(cfg, dtype)


class MixtralForCausalLM(LlamaForCausalLM):
    layer = MoEDecoderLayer


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(MixtralForCausalLM(cfg, dtype, target, separate_head))


def export_awq_view(cfg: ModelConfig) -> tuple[Any, list[tuple[str, Any]]]:
    """The float32 host graph AWQ finds its groups in: one linear per expert (moe.awq_view)."""
    return export(awq_view(MixtralForCausalLM)(cfg, "float32", get_target("host").target()))
