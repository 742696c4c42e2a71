"""Phi-3 in Relax: Llama's computation; with LongRoPE (Phi-3 128k, Phi-3.5-mini, Phi-4-mini) or a
partial rotation (Phi-4-mini rotates 3/4 of each head) RoPE moves into the graph
(compiler/models/rope.py), because per-frequency factors and a cos/sin scale are not among the KV
cache's RoPE kinds."""
from __future__ import annotations

from typing import Any

from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.target import Target

from awqc.compiler.config import ModelConfig
from awqc.compiler.models import llama
from awqc.compiler.models.llama.model import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, export
from awqc.compiler.models.rope import inverse_frequencies, rope


class GraphRopeAttention(LlamaAttention):
    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, positions: Tensor) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        nq, nkv = c.num_attention_heads, c.num_key_value_heads
        q, k, v = op.split(op.reshape(self.qkv_proj(x), (b, s, nq + 2 * nkv, c.head_dim)), [nq, nq + nkv], axis=2)
        # LongRoPE: the short factors, or the long ones in an artifact whose context passes the
        # original window (config.for_context_window)
        longrope = c.rope_scaling if c.rope_scaling.get("rope_type") == "longrope" else {}
        factors = longrope.get("long_factor" if longrope.get("long_context") else "short_factor")
        inv_freq = inverse_frequencies(c.rotary_dim or c.head_dim, c.rope_theta, factors)
        q, k = (rope(t, positions, inv_freq, longrope.get("attention_factor", 1.0)) for t in (q, k))
        o = kv.attention_with_fused_qkv(layer_id, op.concat([q, k, v], dim=2), nq, sm_scale=c.attention_scale)
        return self.o_proj(op.reshape(o, (b, s, nq * c.head_dim)))


class GraphRopeDecoderLayer(LlamaDecoderLayer):
    attention = GraphRopeAttention

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, positions: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class GraphRopeForCausalLM(LlamaForCausalLM):
    layer = GraphRopeDecoderLayer
    rope_mode = RopeMode.NONE  # RoPE is in the graph

    def _hidden(self, input_ids: Tensor, kv: PagedKVCache) -> Tensor:
        b, s = input_ids.shape
        x = self.embed(input_ids)
        positions = kv.get_query_positions(b * s)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv, i, positions)
        return self.norm(x)


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    if cfg.rope_scaling.get("rope_type") != "longrope" and cfg.rotary_dim is None:
        return llama.export_model(cfg, dtype, target, separate_head)
    return export(GraphRopeForCausalLM(cfg, dtype, target, separate_head))
