"""The Llama family's weight map: awqc's parameter names and shapes, which checkpoint tensors
each is fused from, and every tensor name a checkpoint of the family may hold."""
from __future__ import annotations

from typing import Mapping

import torch

from awqc.compiler.config import ModelConfig

# A decoder block's linears whose inputs calibration taps: transformers' module → awqc's (fused)
# weight. q/k/v share q_proj's input and gate/up share gate_proj's.
HF_TAPS = {"self_attn.q_proj": "self_attn.qkv_proj.weight", "self_attn.o_proj": "self_attn.o_proj.weight",
           "mlp.gate_proj": "mlp.gate_up_proj.weight", "mlp.down_proj": "mlp.down_proj.weight"}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Llama takes, with its shape."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        shapes.update(block_shapes(cfg, f"layers.{n}"))
    return shapes


def block_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Decoder block `p`'s parameters, with their shapes."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
              f"{p}.self_attn.qkv_proj.weight": (cfg.qkv_dim, h)}
    if cfg.attention_bias:
        shapes[f"{p}.self_attn.qkv_proj.bias"] = (cfg.qkv_dim,)
    shapes[f"{p}.self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * cfg.head_dim)
    if cfg.o_proj_bias:
        shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
    shapes[f"{p}.mlp.gate_up_proj.weight"] = (2 * i, h)
    shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
    return shapes


def checkpoint_parts(cfg: ModelConfig, name: str) -> list[str]:
    """The checkpoint tensors an awqc parameter is made of (q/k/v and gate/up are fused)."""
    if ".qkv_proj." in name:
        return [name.replace("qkv_proj", f"{x}_proj") for x in "qkv"]
    if ".gate_up_proj." in name:
        return [name.replace("gate_up_proj", f"{x}_proj") for x in ("gate", "up")]
    return [name]


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint of the family may hold (biases included), as Hugging Face
    names them without the `model.` prefix."""
    names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        names += block_checkpoint_names(f"layers.{i}")
    return names


def block_checkpoint_names(p: str) -> list[str]:
    return ([f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
            + [f"{p}.self_attn.{x}_proj.{kind}" for x in "qkvo" for kind in ("weight", "bias")]
            + [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")])


def hf_block_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A block's awqc weights as transformers' decoder layer names them (fused ones split, as views)."""
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_size
    out = {}
    for name, w in weights.items():
        local = name.removeprefix(prefix)
        if ".qkv_proj." in local:
            for x, part in zip("qkv", torch.split(w, [q, kv, kv], 0)):
                out[local.replace("qkv_proj", f"{x}_proj")] = part
        elif ".gate_up_proj." in local:
            for x, part in zip(("gate", "up"), torch.split(w, [inter, inter], 0)):
                out[local.replace("gate_up_proj", f"{x}_proj")] = part
        else:
            out[local] = w
    return out


def embedding_scale(cfg: ModelConfig) -> float:
    """What the embedding rows are multiplied by before the first block: 1, they are used as they are."""
    return 1.0
