"""Every compiled model family matches transformers on tiny random checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from awqc.compiler.build import write_artifact
from awqc.compiler.cli import main
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.runtime.engine import Engine

from conftest import hf_logits, make_checkpoint, rel_err

VARIANTS = {
    "llama-gqa-tied": dict(model_type="llama"),
    "llama-mha-untied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=False),
    "llama-attention-bias": dict(model_type="llama", attention_bias=True),
    "qwen2-qkv-bias": dict(model_type="qwen2", tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", sliding_window=None, head_dim=16),
    # per-head q/k RMSNorm; head_dim 24 is not hidden / heads, as in Qwen3's own configs
    "qwen3-qk-norm": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False),
    # q/k/v and gate/up fused in the checkpoint itself
    "phi3-fused-checkpoint": dict(model_type="phi3", pad_token_id=0),
    # LongRoPE (Phi-3.5-mini's kind): per-pair short factors and the cos/sin scale sqrt(1 + ln 4 / ln 128)
    "phi3-longrope": dict(model_type="phi3", pad_token_id=0, max_position_embeddings=512,
                          original_max_position_embeddings=128, rope_scaling={
                              "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                              "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 40.0]}),
    # Phi-4-mini's kind: RoPE on the first half of each head only (transformers' partial_rotary_factor),
    # with LongRoPE factors for those 4 pairs
    "phi3-partial-longrope": dict(model_type="phi3", pad_token_id=0, partial_rotary_factor=0.5,
                                  max_position_embeddings=512, original_max_position_embeddings=128, rope_scaling={
                                      "type": "longrope", "short_factor": [1.0, 1.4, 2.1, 3.3],
                                      "long_factor": [1.0, 4.0, 16.0, 40.0]}),
    "phi3-partial": dict(model_type="phi3", pad_token_id=0, partial_rotary_factor=0.75, head_dim=16),
    "llama3-rope": dict(model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear-rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # (1 + w) norms, four per block and per-head q/k; tanh GeGLU; scaled embeddings; its own
    # attention scale; sliding layers (the default 4096 window, wider than this context) on RoPE
    # base 10^4 and full layers on 10^6 with linear scaling; untied head, attention biases
    "gemma3": dict(model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=24, num_hidden_layers=3,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   tie_word_embeddings=False, attention_bias=True, rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Gemma 3 without q/k norms, sliding and full layers alternating, soft-capped attention scores
    # and final logits (caps small enough that these random scores and logits reach them)
    # mixtures of experts: router softmax, top-2 of 4 experts renormalized, stacked expert weights
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    # Qwen3-MoE: q/k norms, top-3 of 5 without renormalizing, its own expert width, layer 1 dense
    "qwen3-moe": dict(model_type="qwen3_moe", num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32,
                      norm_topk_prob=False, head_dim=16, mlp_only_layers=[1]),
    "gemma2": dict(model_type="gemma2", head_dim=32, query_pre_attn_scalar=24, num_hidden_layers=3,
                   tie_word_embeddings=False, attn_logit_softcapping=0.25, final_logit_softcapping=2.0),
}


def assert_matches_transformers(engine: Engine, ckpt: Path, ids: list[int], n_decode: int) -> None:
    """The logits of every prompt position, the prompt's last after a prefill, and n_decode greedy
    steps equal transformers' within 1e-4, with the same tokens."""
    ref_prompt, ref_steps, ref_tokens = hf_logits(ckpt, ids, n_decode=n_decode)
    assert rel_err(engine.score(ids), ref_prompt) < 1e-4
    engine.reset()
    logits = engine.prefill(ids)
    assert rel_err(logits, ref_prompt[-1]) < 1e-4
    for step in range(n_decode):
        token = int(logits.argmax())
        assert token == ref_tokens[step]
        logits = engine.decode(token)
        assert rel_err(logits, ref_steps[step]) < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_transformers(name: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=hash(name) % 1000, **VARIANTS[name])
    art = write_artifact(tmp_path / "art", load_model(str(ckpt)), get_target("host"), "float32", context_window=128)
    assert_matches_transformers(Engine(art), ckpt, list(np.random.RandomState(1).randint(3, 300, size=40)), 4)


def test_longrope_past_the_original_window_uses_the_long_factors(tmp_path: Path) -> None:
    """An artifact compiled for a context past original_max_position_embeddings (128 here) rotates
    by LongRoPE's long factors at every position, as llama.cpp picks them: a 150-token prompt and
    decode steps after it equal transformers', which uses the long factors once the sequence is
    longer than the original window."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=12, **VARIANTS["phi3-partial-longrope"])
    art = write_artifact(tmp_path / "art", load_model(str(ckpt)), get_target("host"), "float32", context_window=256)
    assert_matches_transformers(Engine(art), ckpt, list(np.random.RandomState(3).randint(3, 300, size=150)), 4)


def test_chunked_prefill_equals_one_chunk(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    ids = list(np.random.RandomState(2).randint(3, 300, size=100))
    whole = engine.score(ids)
    engine.prefill_chunk = 16  # force several chunks through the same cache
    assert rel_err(engine.score(ids), whole) < 1e-5


SLIDING_WINDOW = 20  # past a 16-token page, so the window starts mid-page


@pytest.mark.parametrize("model_type,overrides", [
    ("mistral", {}),  # every layer slides
    ("qwen2", dict(use_sliding_window=True, max_window_layers=1)),  # layer 0 full, layer 1 sliding
    # Gemma 3's pattern (every 2nd layer full here) and its two RoPE bases
    ("gemma3_text", dict(sliding_window_pattern=2, head_dim=32, query_pre_attn_scalar=48)),
    # Gemma 2: every 2nd layer full, soft-capped scores in every attention kernel (a later prefill
    # chunk's full layers read the cache through awqc's paged prefill kernel)
    ("gemma2", dict(head_dim=32, num_hidden_layers=3, attn_logit_softcapping=0.25, final_logit_softcapping=2.0)),
])
def test_sliding_window_attention_matches_transformers_past_its_window(
        model_type: str, overrides: dict, tmp_path: Path) -> None:
    """A prompt of several windows (prefilled in window-sized chunks) and decode steps past it: the
    logits are transformers', whose mask keeps each query's keys within its window."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=9, model_type=model_type, sliding_window=SLIDING_WINDOW,
                           tie_word_embeddings=False, **overrides)
    out = tmp_path / "art"
    assert main(["compile", "--model", str(ckpt), "--target", "host", "-o", str(out), "--context-window", "128"]) == 0
    engine = Engine(out)
    assert engine.prefill_chunk == SLIDING_WINDOW
    assert_matches_transformers(engine, ckpt, list(np.random.RandomState(2).randint(3, 300, size=3 * SLIDING_WINDOW + 7)),
                                30)

