"""Qwen3: the Llama definition with q and k RMS-normalized per head (over head_dim, one weight
vector each shared by all heads) after their projection and before RoPE."""
from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama.model import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, export


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, dtype: str):
        super().__init__(cfg, dtype)
        self.q_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.k_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def norm_qk(self, qkv: Tensor) -> Tensor:
        nq, nkv = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        q, k, v = op.split(qkv, [nq, nq + nkv], axis=2)
        return op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer = Qwen3DecoderLayer


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(Qwen3ForCausalLM(cfg, dtype, target, separate_head))
