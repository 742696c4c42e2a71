"""AWQ on each family beyond Llama: it finds the groups of the family's graph, scales fold
without changing its function, calibration runs transformers' own layer of the family, and the
int4 artifact equals its fake-quant reference. (Float logits against transformers: test_model.py.)"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.awq import awq_graph, awq_quantize, awq_weights, quantize_model, rtn
from awqc.compiler.build import write_artifact
from awqc.compiler.calibrate import calibrate
from awqc.compiler.evaluate import FloatEngine
from awqc.compiler.model_import import load_model
from awqc.compiler.models.moe import stack_experts
from awqc.compiler.targets import get_target
from awqc.passes.awq_scale import ScaleResult, apply_scales, find_scaling_groups, unscaled_channels
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.engine import Engine

from conftest import logit_error, make_checkpoint, rel_err, with_salient_channels

FAMILIES = {
    # per-head q/k RMSNorm between the projections and RoPE
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False, attention_bias=True),
    # q/k/v and gate/up fused in the checkpoint
    "phi3": dict(model_type="phi3", pad_token_id=0, tie_word_embeddings=False),
    # (1 + w) norms; a second norm after attention and after the MLP; sliding and full layers
    "gemma3": dict(model_type="gemma3_text", head_dim=32, tie_word_embeddings=False, sliding_window=24,
                   layer_types=["sliding_attention", "full_attention"]),
    # Gemma 3's blocks without q/k norms; soft-capped attention scores and logits
    "gemma2": dict(model_type="gemma2", head_dim=32, tie_word_embeddings=False, sliding_window=24,
                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    # mixtures of experts: one norm feeds the router and every expert's gate/up; a dense layer (1)
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, head_dim=16, mlp_only_layers=[1], tie_word_embeddings=False),
}
# transformers' name of the norm before the MLP (Gemma's post_attention_layernorm normalizes the
# attention output before its residual add: it feeds no linear)
MLP_NORM = {"qwen3": "post_attention_layernorm", "phi3": "post_attention_layernorm",
            "gemma3": "pre_feedforward_layernorm", "gemma2": "pre_feedforward_layernorm",
            "mixtral": "post_attention_layernorm", "qwen3_moe": "post_attention_layernorm"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=11, **FAMILIES[request.param])
    return load_model(str(ckpt))


def _name(model) -> str:
    return next(k for k, v in FAMILIES.items() if v["model_type"] == model.config.model_type)


def _groups(model):
    return find_scaling_groups(*awq_graph(model))


def test_groups_are_the_architectures(model) -> None:
    """From the definitions in transformers (modeling_qwen3, modeling_phi3, modeling_gemma2/3): per
    layer, input_layernorm feeds q/k/v, the MLP's norm feeds gate/up, v feeds o_proj, up feeds
    down_proj; the final norm feeds the untied head. In an MoE layer (modeling_mixtral,
    modeling_qwen3_moe) the MLP's norm feeds the router and every expert's gate/up, and each
    expert's up feeds its own down. q_norm/k_norm sit between q/k and RoPE and
    Gemma's post-norms before residual adds, so they feed no linear and start no group. Gemma's
    norms scale by 1 + w: their groups fold with offset 1, the others with 0."""
    groups = _groups(model)
    assert unscaled_channels(*awq_graph(model)) == []  # no channel that feeds a linear is lost
    found = {(g.producer, tuple(c.weight for c in g.consumers)) for g in groups}
    gemma = model.config.model_type in ("gemma2", "gemma3_text")
    assert {g.producer: g.offset for g in groups if g.kind == "norm"} == {
        producer: 1.0 if gemma else 0.0 for producer, _ in found if "norm" in producer}
    expected = {("norm.weight", ("lm_head.weight",))}
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        expected |= {(f"{p}.input_layernorm.weight", (f"{p}.self_attn.qkv_proj.weight",)),
                     (f"{p}.self_attn.qkv_proj.weight", (f"{p}.self_attn.o_proj.weight",))}
        norm = f"{p}.{MLP_NORM[_name(model)]}.weight"
        if i in cfg.moe_layers:
            experts = [f"{p}.mlp.experts.{e}" for e in range(cfg.num_experts)]
            expected |= {(norm, (f"{p}.mlp.router.weight", *(f"{x}.gate_up_proj.weight" for x in experts)))}
            expected |= {(f"{x}.gate_up_proj.weight", (f"{x}.down_proj.weight",)) for x in experts}
        else:
            expected |= {(norm, (f"{p}.mlp.gate_up_proj.weight",)),
                         (f"{p}.mlp.gate_up_proj.weight", (f"{p}.mlp.down_proj.weight",))}
    assert found == expected


def test_scales_fold_without_changing_the_model(model) -> None:
    """Arbitrary scales in every group: the compiled float model's logits stay the same (a scale
    on q or k rows would not survive their RMSNorm; none is applied there)."""
    groups = _groups(model)
    gen = torch.Generator().manual_seed(0)
    results = {i: ScaleResult(torch.rand(len(g.channels), generator=gen) * 4 + 0.25, 0.5, 0.0, 0.0)
               for i, g in enumerate(groups)}
    scaled = stack_experts(model.config, apply_scales(awq_weights(model), groups, results))
    fe = FloatEngine(model, context_window=128)
    ids = list(np.random.RandomState(0).randint(3, 300, size=60))
    assert rel_err(fe.use(scaled).score(ids), fe.use(None).score(ids)) < 2e-5


def test_awq_beats_rtn_and_its_int4_artifact_is_its_fake_quant(model, tmp_path: Path) -> None:
    model = with_salient_channels(model)
    rs = np.random.RandomState(0)
    stats = calibrate(model, [list(rs.randint(3, 300, size=64)) for _ in range(8)], progress=False)
    scheme = QuantScheme(group_size=32)
    res = awq_quantize(model, scheme, stats, progress=False)
    held_out = [list(rs.randint(3, 300, size=64)) for _ in range(3)]
    error = logit_error(FloatEngine(model, context_window=128), held_out)
    assert error(res.weights.dequantized()) < 0.8 * error(rtn(model, scheme).dequantized())

    quant = quantize_model(model, "awq", scheme, stats=stats)
    int4 = Engine(write_artifact(tmp_path / "int4", model, get_target("host"), "float32", 128, quant=quant,
                                 method="awq"))
    fake = dataclasses.replace(model, weights={k: v.numpy() for k, v in quant.dequantized().items()})
    ref_engine = Engine(write_artifact(tmp_path / "fake", fake, get_target("host"), "float32", 128))
    ids = held_out[0]
    assert rel_err(int4.score(ids), ref_engine.score(ids)) < 1e-5
    assert list(int4.generate(ids, 6)) == list(ref_engine.generate(ids, 6))
