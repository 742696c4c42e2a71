"""Mixtral's weight map: Llama's attention and norms; per layer a router [E, H] and the experts
stacked (`experts.gate_up_proj.weight` [E, 2I, H], `experts.down_proj.weight` [E, H, I]) from the
checkpoint's `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up)
and `w2` (down)."""
from __future__ import annotations

from typing import Mapping

import torch

from awqc.compiler.config import ModelConfig
from awqc.compiler.models.llama import weights as llama
from awqc.compiler.models.llama.weights import embedding_scale
from awqc.compiler.models import moe
from awqc.compiler.models.moe import CheckpointNames, with_experts

HF_TAPS = llama.HF_TAPS
NAMES = CheckpointNames(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Mixtral takes, with its shape."""
    return with_experts(cfg, llama.expected_shapes(cfg))


def checkpoint_parts(cfg: ModelConfig, name: str) -> list[str]:
    return NAMES.parts(cfg, name) or llama.checkpoint_parts(cfg, name)


def checkpoint_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a Mixtral checkpoint may hold, without the `model.` prefix."""
    return NAMES.checkpoint_names(cfg, llama.checkpoint_names(cfg))


def hf_block_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A block's awqc weights as transformers' MixtralDecoderLayer names them."""
    return moe.hf_block_weights(cfg, weights, prefix, llama.hf_block_weights)


__all__ = ["HF_TAPS", "checkpoint_names", "checkpoint_parts", "embedding_scale", "expected_shapes", "hf_block_weights"]
