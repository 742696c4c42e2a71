"""The Llama family, defined once as a Relax model (tvm.relax.frontend.nn).

q/k/v and gate/up projections are stored fused (`qkv_proj`, `gate_up_proj`) so a decode step
reads each layer's input once per fused matrix; `fuse_hf_weights` builds them from a checkpoint.
Attention and RoPE run inside TVM's paged KV cache, so prefill and decode share one cache.
"""
from __future__ import annotations

from typing import Any

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op, spec
from tvm.relax.frontend.nn.core import wrap_nested
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from awqc.passes.cpu_attention import use_cpu_attention_kernels, use_cpu_rope, use_cpu_sliding_window

from awqc.compiler.config import ModelConfig, UnsupportedModelError


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_dim, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias,
                                dtype=dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        c = self.cfg
        b, s, _ = x.shape
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        qkv = self.norm_qk(op.reshape(self.qkv_proj(x), (b, s, heads, c.head_dim)))
        o = kv.attention_with_fused_qkv(layer_id, qkv, c.num_attention_heads, sm_scale=c.attention_scale)
        return self.o_proj(op.reshape(o, (b, s, c.num_attention_heads * c.head_dim)))

    def norm_qk(self, qkv: Tensor) -> Tensor:
        """[b, s, heads, head_dim] q/k/v before RoPE: as they are (Qwen3 normalizes q and k here)."""
        return qkv


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention = LlamaAttention  # a family that changes only attention overrides this

    def __init__(self, cfg: ModelConfig, dtype: str, layer: int):
        eps = cfg.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False, dtype=dtype)
        self.self_attn = self.attention(cfg, dtype)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False, dtype=dtype)
        self.mlp = self.make_mlp(cfg, dtype, layer)

    def make_mlp(self, cfg: ModelConfig, dtype: str, layer: int) -> nn.Module:
        """Layer `layer`'s MLP (a mixture-of-experts family's is experts in its MoE layers)."""
        return LlamaMLP(cfg, dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


def _last_token(x: Tensor) -> Tensor:
    def compute(t: te.Tensor) -> te.Tensor:
        b, s, d = t.shape
        return te.compute((b, 1, d), lambda i, _, k: t[i, s - 1, k], name="last_token")

    return op.tensor_expr_op(compute, "last_token", [x])


class LlamaForCausalLM(nn.Module):
    layer = LlamaDecoderLayer
    rope_mode = RopeMode.NORMAL  # the KV cache applies RoPE to q and k

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, separate_head: bool = False):
        # separate_head: give a tied LM head its own parameter, so it can be quantized while
        # the embedding lookup stays float.
        self.cfg, self.dtype, self.target = cfg, dtype, target
        self.tied = cfg.tie_word_embeddings and not separate_head
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([self.layer(cfg, dtype, i) for i in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        if not self.tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def embed(self, input_ids: Tensor) -> Tensor:
        # mode "clip": a token id past the vocabulary reads the last row instead of memory outside
        # the table (TVM's default "fast" mode does no bounds check, and warns so at every compile)
        return wrap_nested(relax.op.take(self.embed_tokens.weight._expr, input_ids._expr, axis=0, mode="clip"), "take")

    def _hidden(self, input_ids: Tensor, kv: PagedKVCache) -> Tensor:
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv, i)
        return self.norm(x)

    def _logits(self, x: Tensor) -> Tensor:
        if self.tied:
            logits = op.matmul(x, op.permute_dims(self.embed_tokens.weight))
        else:
            logits = self.lm_head(x)
        return logits.astype("float32") if self.dtype != "float32" else logits

    def prefill(self, input_ids: Tensor, kv: PagedKVCache):
        """Append a chunk of tokens to the cache; logits of the last one."""
        return self._logits(_last_token(self._hidden(input_ids, kv))), kv

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        """Append one token to the cache; its logits."""
        return self._logits(self._hidden(input_ids, kv)), kv

    def score(self, input_ids: Tensor, kv: PagedKVCache):
        """Append a chunk of tokens to the cache; logits at every position (evaluation)."""
        return self._logits(self._hidden(input_ids, kv)), kv

    def create_tir_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var) -> PagedKVCache:
        c = self.cfg
        rope_scale, rope_scaling = _tvm_rope(c.rope_scaling)
        kinds = attention_kinds(c)
        return TIRPagedKVCache(
            attn_kind=kinds if c.sliding_layers else "mha", layer_sliding_window_size=c.sliding_window or 1,
            max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, len(kinds)]), num_hidden_layers=len(kinds),
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0, rope_mode=self.rope_mode, rope_scale=rope_scale,
            rope_theta=c.rope_theta, rope_scaling=rope_scaling, rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim, enable_disaggregation=False, dtype=self.dtype, target=self.target)


def attention_kinds(cfg: ModelConfig) -> list[str]:
    """The KV cache's attention kind per layer: "mha_sliding" layers see only the last
    sliding_window positions of the cache. TVM 0.27's cache allocates the staging buffers of its
    fused-qkv attention only when some layer is "mha", so a model whose every layer slides (Mistral)
    gets one extra full-attention layer that no forward pass uses (one layer's KV pages of memory)."""
    kinds = ["mha_sliding" if i in cfg.sliding_layers else "mha" for i in range(cfg.num_hidden_layers)]
    return kinds if "mha" in kinds else kinds + ["mha"]


def _tvm_rope(scaling: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Map a config's RoPE scaling onto the paged KV cache's (position scale, scaling dict)."""
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return 1.0 / float(scaling["factor"]), {}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return 1.0, {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
    return 1.0, {}


def export_spec() -> dict[str, Any]:
    def step(seq_len: int | str) -> dict[str, Any]:
        # A fresh dict per function: export_tvm consumes the "$" entry.
        return {"input_ids": spec.Tensor([1, seq_len], "int32"), "kv": spec.Object(object_type=PagedKVCache),
                "$": {"param_mode": "packed", "effect_mode": "none"}}

    return {
        "prefill": step("seq_len"),
        "decode": step(1),
        "score": step("seq_len"),
        "create_tir_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int,
                                      "prefill_chunk_size": int, "page_size": int,
                                      "$": {"param_mode": "none", "effect_mode": "none"}},
    }


def export_model(cfg: ModelConfig, dtype: str, target: Target,
                 separate_head: bool = False) -> tuple[Any, list[tuple[str, Any]]]:
    """The Relax IRModule of the model and its parameter list (name, nn.Parameter) in call order."""
    return export(LlamaForCausalLM(cfg, dtype, target, separate_head))


def export(model: LlamaForCausalLM) -> tuple[Any, list[tuple[str, Any]]]:
    """export_model for a model of this family or one derived from it."""
    cfg, target = model.cfg, model.target
    if cfg.attn_logit_softcapping is not None and target.kind.name != "llvm":
        raise UnsupportedModelError(
            f"this model soft-caps its attention scores (attn_logit_softcapping {cfg.attn_logit_softcapping}, as "
            f"Gemma 2 does), which awqc's {target.kind.name} attention kernels (TVM's) do not compute; compile "
            "it for a CPU target (host, x86-avx2, arm-neon, ...)")
    if cfg.num_experts and target.kind.name != "llvm":
        raise UnsupportedModelError(
            f"mixture-of-experts models ({cfg.model_type}) compile for CPU targets only so far (their expert "
            f"kernels are not scheduled for {target.kind.name}); compile for host, x86-avx2, arm-neon, ...")
    mod, params = model.export_tvm(spec=export_spec())
    if target.kind.name == "llvm":  # the KV cache's CPU kernels are serial scalar loops: parallel ones
        softcap = cfg.attn_logit_softcapping
        mod = use_cpu_attention_kernels(mod, softcap)
        mod = use_cpu_rope(mod, cfg.rope_theta, *_tvm_rope(cfg.rope_scaling))
        if cfg.sliding_layers:
            mod = use_cpu_sliding_window(mod, cfg.sliding_window, softcap)
    return mod, params
