"""Gemma 3 (text): the Llama pieces with Gemma's differences, as transformers' modeling_gemma3
computes them:

* RMSNorm scales by (1 + w): the checkpoint's w stays the parameter and `1 + w` is in the graph,
  where the AWQ pass folds its scales into w as (1 + w) / s - 1;
* four norms per block: the attention and MLP outputs are normalized again before each residual
  add; per-head q/k norms before RoPE (as Qwen3);
* GeGLU MLP with tanh GELU; embeddings times sqrt(hidden_size); attention logits scaled by
  query_pre_attn_scalar ** -0.5;
* sliding layers use their own RoPE base (rope_local_theta). TVM's KV cache has one RoPE base, so
  RoPE is applied here, in the graph, at the cache's query positions, and the cache is given none.
"""
from __future__ import annotations

import math
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama.model import LlamaForCausalLM, export
from awqc.compiler.models.rope import inverse_frequencies, rope


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return op.rms_norm(x, self.weight + 1.0, axes=-1, epsilon=self.eps)


class Gemma3Attention(nn.Module):
    qk_norm = True  # per-head RMSNorm of q and k before RoPE (Gemma 2 has none)

    def __init__(self, cfg: ModelConfig, dtype: str, layer: int):
        self.cfg, self.layer = cfg, layer
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_dim, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias,
                                dtype=dtype)
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        nq, nkv = c.num_attention_heads, c.num_key_value_heads
        qkv = op.reshape(self.qkv_proj(x), (b, s, nq + 2 * nkv, c.head_dim))
        q, k, v = op.split(qkv, [nq, nq + nkv], axis=2)
        theta = c.layer_rope_theta(self.layer)
        # linear RoPE scaling applies to the full-attention layers only (the sliding ones have none)
        scale = 1.0 if theta != c.rope_theta or not c.rope_scaling else 1.0 / c.rope_scaling["factor"]
        inv_freq = inverse_frequencies(c.head_dim, theta, position_scale=scale)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (rope(t, positions, inv_freq) for t in (q, k))
        o = kv.attention_with_fused_qkv(self.layer, op.concat([q, k, v], dim=2), nq, sm_scale=c.attention_scale)
        return self.o_proj(op.reshape(o, (b, s, nq * c.head_dim)))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    attention = Gemma3Attention

    def __init__(self, cfg: ModelConfig, dtype: str, layer: int):
        def norm() -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = self.attention(cfg, dtype, layer)
        self.mlp = Gemma3MLP(cfg, dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, positions: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv, positions))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer = Gemma3DecoderLayer
    rope_mode = RopeMode.NONE  # RoPE is in the graph (per-layer bases)

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, separate_head: bool = False):
        self.cfg, self.dtype, self.target = cfg, dtype, target
        self.tied = cfg.tie_word_embeddings and not separate_head
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([self.layer(cfg, dtype, i) for i in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not self.tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def _hidden(self, input_ids: Tensor, kv: PagedKVCache) -> Tensor:
        b, s = input_ids.shape
        x = self.embed(input_ids)
        # transformers rounds sqrt(hidden) to the weights' dtype before multiplying
        x = x * math.sqrt(self.cfg.hidden_size)
        positions = kv.get_query_positions(b * s)
        for layer in self.layers:
            x = layer(x, kv, positions)
        return self.norm(x)

    def _logits(self, x: Tensor) -> Tensor:
        logits = super()._logits(x)
        cap = self.cfg.final_logit_softcapping  # Gemma 2's (Gemma 3 checkpoints set none)
        return logits if cap is None else op.tanh(logits / cap) * cap


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(Gemma3ForCausalLM(cfg, dtype, target, separate_head))
