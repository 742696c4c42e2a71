"""AWQ scale and clip passes: the Gram loss, graph-derived groups, float equivalence, and AWQ beating
round-to-nearest where activations have salient channels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op, spec
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from awqc.compiler.awq import awq_quantize, rtn, torch_weights
from awqc.compiler.calibrate import calibrate
from awqc.compiler.evaluate import FloatEngine
from awqc.compiler.models.llama import export_model
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.passes.awq_clip import diagonal_blocks, group_errors, search_layer_clip
from awqc.passes.awq_scale import (NonFiniteError, ScaleResult, apply_scales, attention_qk_rows, fake_quantize_,
                                   SecondMoment, find_scaling_groups, group_loss, loss_rows, search_group,
                                   unscaled_channels)
from awqc.passes.quantizer import QuantScheme, fake_quantize

from conftest import logit_error, make_checkpoint, rel_err, with_salient_channels


def _salient_activations(t: int = 2048, k: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 30.0  # a few input channels with large activations, as in LLMs
    return x


class _Stats:
    """Calibration statistics of explicit activations, keyed by weight name."""

    def __init__(self, xs: dict[str, torch.Tensor]):
        from awqc.compiler.calibrate import InputStats

        self.by = {n: InputStats((n,), x.abs().mean(0), SecondMoment(gram=x.T @ x / x.shape[0]), x.shape[0],
                                 x.shape[0])
                   for n, x in xs.items()}

    def of(self, name: str):
        return self.by[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by


# ------------------------------------------------------------------------------------------ loss
def test_gram_loss_equals_direct_output_error() -> None:
    x = _salient_activations()
    w = torch.randn(96, 128) * 0.05
    s = torch.rand(128) + 0.5
    scheme = QuantScheme(group_size=32)
    direct = ((x @ (fake_quantize(w * s, scheme) / s - w).T) ** 2).sum(1).mean()
    gram = x.T @ x / x.shape[0]
    assert group_loss(w, SecondMoment(gram=gram), s, scheme) == pytest.approx(float(direct), rel=1e-4)


def test_second_moment_as_rows_equals_the_gram() -> None:
    """Held as token rows (fewer tokens than features), the loss and the clip's diagonal blocks are
    those of the Gram the rows make."""
    x = _salient_activations(t=96)
    rows, gram = SecondMoment(rows=x / 96 ** 0.5), SecondMoment(gram=x.T @ x / 96)
    w = torch.randn(40, 128) * 0.05
    s = torch.rand(128) + 0.5
    scheme = QuantScheme(group_size=32)
    direct = ((x @ (fake_quantize(w * s, scheme) / s - w).T) ** 2).sum(1).mean()
    assert rows.rank == 96 and gram.rank == 128
    assert group_loss(w, rows, s, scheme) == pytest.approx(float(direct), rel=1e-4)
    torch.testing.assert_close(diagonal_blocks(rows, 32), diagonal_blocks(gram, 32), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        SecondMoment()


def test_loss_rows_sample_only_large_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loss_rows(1536, 576, 576) is None  # the default model's largest layer: every row
    rows = loss_rows(22016, 4096, 2048)  # a 7B gate/up projection at 16 samples
    assert rows is not None and len(rows) == (1 << 33) // (4096 * 2048)
    assert bool((rows[1:] > rows[:-1]).all()) and int(rows[-1]) < 22016
    assert torch.equal(rows, loss_rows(22016, 4096, 2048))  # seeded: the same rows every run


def test_search_on_sampled_rows_still_finds_the_salient_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced to sample (a tiny budget), the search measures its loss on the sampled rows only —
    the loss it reports is the direct output error of those rows — and still protects the channels."""
    from awqc.passes import awq_scale
    from awqc.passes.awq_scale import Consumer, ScalingGroup

    monkeypatch.setattr(awq_scale, "SEARCH_MACS", 300 * 128 * 128)
    x = _salient_activations()
    w = torch.randn(1024, 128) * 0.05
    scheme = QuantScheme(group_size=32)
    group = ScalingGroup("norm.weight", "norm", (), np.arange(128), [Consumer("fc.weight", np.arange(128))])
    res = search_group(group, {"fc.weight": w}, _Stats({"fc.weight": x}), scheme, lambda n: True)
    rows = loss_rows(1024, 128, 128)
    assert len(rows) == 300
    ws = w[rows]
    direct = ((x @ (fake_quantize(ws * res.scales, scheme) / res.scales - ws).T) ** 2).sum(1).mean()
    assert res.loss == pytest.approx(float(direct), rel=1e-3)
    assert res.alpha > 0 and res.loss < 0.7 * res.rtn_loss


@pytest.mark.parametrize("symmetric", [False, True])
def test_in_place_fake_quantize_is_the_quantizer(symmetric: bool) -> None:
    w = torch.randn(48, 128) * 0.1
    scheme = QuantScheme(group_size=64, symmetric=symmetric)
    clip = torch.rand(48, 2) * 0.5 + 0.5
    assert torch.equal(fake_quantize_(w.clone(), scheme), fake_quantize(w, scheme))
    assert torch.equal(fake_quantize_(w.clone(), scheme, clip), fake_quantize(w, scheme, clip))


def test_clip_error_by_group_blocks_equals_direct() -> None:
    x = _salient_activations(k=64)
    w = torch.randn(8, 64)
    scheme = QuantScheme(group_size=32)
    err = group_errors(w, diagonal_blocks(SecondMoment(gram=x.T @ x / x.shape[0]), 32), scheme, 0.8)
    e = (fake_quantize(w, scheme, torch.full((8, 2), 0.8)) - w).reshape(8, 2, 32)
    direct = torch.stack([((x[:, 32 * g:32 * g + 32] @ e[:, g].T) ** 2).mean(0) for g in range(2)], 1)
    torch.testing.assert_close(err, direct, rtol=1e-4, atol=1e-6)


def test_clip_search_never_worse_and_keeps_frozen_rows() -> None:
    torch.manual_seed(0)  # not whatever the tests before left in the global generator
    x = _salient_activations(k=64)
    w = torch.randn(16, 64)
    w[0, 5] = 12.0  # an outlier weight: shrinking that group's range pays off
    gram = SecondMoment(gram=x.T @ x / x.shape[0])
    scheme = QuantScheme(group_size=32)
    frozen = np.zeros(16, bool)
    frozen[8:] = True
    clip = search_layer_clip(w, gram, scheme, None, frozen)
    blocks = diagonal_blocks(gram, 32)
    assert bool((group_errors(w, blocks, scheme, clip) <= group_errors(w, blocks, scheme, 1.0) + 1e-9).all())
    assert float(clip[0, 0]) < 1.0
    assert bool((clip[8:] == 1.0).all())


def test_search_beats_rtn_with_salient_channels() -> None:
    from awqc.passes.awq_scale import Consumer, ScalingGroup

    x = _salient_activations()
    w = torch.randn(64, 128) * 0.05
    group = ScalingGroup("norm.weight", "norm", (), np.arange(128), [Consumer("fc.weight", np.arange(128))])
    res = search_group(group, {"fc.weight": w}, _Stats({"fc.weight": x}), QuantScheme(group_size=32),
                       lambda n: True)
    assert res.alpha > 0
    assert res.loss < 0.7 * res.rtn_loss


# ------------------------------------------------------------------------------------------ groups
@pytest.fixture(scope="module")
def tiny_bias_model(tmp_path_factory: pytest.TempPathFactory):
    """GQA, q/k/v and o_proj biases, untied LM head: every kind of edit the scale pass makes."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("awq") / "ckpt", seed=3, attention_bias=True,
                           tie_word_embeddings=False)
    return load_model(str(ckpt))


def _groups(model):
    mod, named = export_model(model.config, "float32", get_target("host").target())
    names = [n for n, _ in named]
    return find_scaling_groups(mod["score"], names), attention_qk_rows(mod["score"], names)


def test_groups_of_the_llama_graph(tiny_bias_model) -> None:
    groups, qk = _groups(tiny_bias_model)
    cfg = tiny_bias_model.config
    found = {(g.producer, tuple(c.weight for c in g.consumers)) for g in groups}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        assert (f"{p}.input_layernorm.weight", (f"{p}.self_attn.qkv_proj.weight",)) in found
        assert (f"{p}.post_attention_layernorm.weight", (f"{p}.mlp.gate_up_proj.weight",)) in found
        assert (f"{p}.self_attn.qkv_proj.weight", (f"{p}.self_attn.o_proj.weight",)) in found
        assert (f"{p}.mlp.gate_up_proj.weight", (f"{p}.mlp.down_proj.weight",)) in found
    # The final norm feeds the LM head: a group, which the search skips when the head stays float.
    assert ("norm.weight", ("lm_head.weight",)) in found
    assert len(groups) == 4 * cfg.num_hidden_layers + 1
    by = {g.producer: g for g in groups}
    v = by["layers.0.self_attn.qkv_proj.weight"]
    q_rows = cfg.num_attention_heads * cfg.head_dim
    np.testing.assert_array_equal(v.channels, np.arange(q_rows + cfg.kv_dim, q_rows + 2 * cfg.kv_dim))
    assert v.extra == ("layers.0.self_attn.qkv_proj.bias",)
    # GQA: value head j feeds query heads j*g .. j*g+g-1, so o_proj column (h, d) reads value channel (h // g, d)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    cols = v.consumers[0].columns.reshape(cfg.num_attention_heads, cfg.head_dim)
    for h in range(cfg.num_attention_heads):
        np.testing.assert_array_equal(cols[h], np.arange(cfg.head_dim) + (h // g) * cfg.head_dim)
    up = by["layers.0.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(up.channels, np.arange(cfg.intermediate_size, 2 * cfg.intermediate_size))
    np.testing.assert_array_equal(qk["layers.0.self_attn.qkv_proj.weight"],
                                  np.arange(cfg.qkv_dim) < q_rows + cfg.kv_dim)


def test_scaled_float_model_logits_match(tiny_bias_model) -> None:
    """Arbitrary scales (not just searched ones) folded into every group leave the compiled float
    model's logits unchanged."""
    groups, _ = _groups(tiny_bias_model)
    gen = torch.Generator().manual_seed(0)
    results = {i: ScaleResult(torch.rand(len(g.channels), generator=gen) * 4 + 0.25, 0.5, 0.0, 0.0)
               for i, g in enumerate(groups)}
    weights = torch_weights(tiny_bias_model)
    scaled = apply_scales(weights, groups, results)
    assert not torch.equal(scaled["layers.0.self_attn.qkv_proj.bias"], weights["layers.0.self_attn.qkv_proj.bias"])
    fe = FloatEngine(tiny_bias_model, context_window=128)
    ids = list(np.random.RandomState(0).randint(3, 300, size=60))
    ref = fe.use(None).score(ids)
    got = fe.use(scaled).score(ids)
    assert rel_err(got, ref) < 2e-5
    assert torch.equal(weights["layers.0.input_layernorm.weight"],
                       torch.from_numpy(tiny_bias_model.weights["layers.0.input_layernorm.weight"]))  # not mutated


# -- a differently built model: renamed modules, separate q/k/v and gate/up, no pre-attention norm,
#    a GELU MLP ---------------------------------------------------------------------------------------
H, NH, NKV, HD, FF = 32, 4, 2, 8, 48


class _Attn(nn.Module):
    def __init__(self):
        self.wq = nn.Linear(H, NH * HD, bias=False)
        self.wk = nn.Linear(H, NKV * HD, bias=False)
        self.wv = nn.Linear(H, NKV * HD, bias=True)
        self.proj = nn.Linear(NH * HD, H, bias=False)

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.concat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        o = kv.attention_with_fused_qkv(layer, op.reshape(qkv, (b, s, NH + 2 * NKV, HD)), NH, sm_scale=HD ** -0.5)
        return self.proj(op.reshape(o, (b, s, NH * HD)))


class _SwiGLU(nn.Module):
    def __init__(self):
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(op.silu(self.w1(x)) * self.w3(x))


class _GeluMLP(nn.Module):
    def __init__(self):
        self.fc_in = nn.Linear(H, FF, bias=True)
        self.fc_out = nn.Linear(FF, H, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(op.gelu(self.fc_in(x)))


class _Block(nn.Module):
    """Block 0: norm-free attention input, SwiGLU. Block 1: renamed norms, GELU MLP."""

    def __init__(self, kind: int):
        self.kind = kind
        self.mixer = _Attn()
        self.ln_ffn = nn.RMSNorm(H, -1, 1e-5, bias=False)
        if kind == 1:
            self.ln_mix = nn.RMSNorm(H, -1, 1e-5, bias=False)
        self.ffn = _SwiGLU() if kind == 0 else _GeluMLP()

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        x = x + self.mixer(x if self.kind == 0 else self.ln_mix(x), kv, layer)
        return x + self.ffn(self.ln_ffn(x))


class _OddModel(nn.Module):
    def __init__(self):
        self.tok = nn.Embedding(64, H)
        self.blocks = nn.ModuleList([_Block(0), _Block(1)])
        self.out_norm = nn.RMSNorm(H, -1, 1e-5, bias=False)
        self.head = nn.Linear(H, 64, bias=False)

    def score(self, input_ids: Tensor, kv: PagedKVCache):
        x = self.tok(input_ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, kv, i)
        return self.head(self.out_norm(x)), kv


def test_groups_of_a_differently_built_model() -> None:
    mod, named = _OddModel().export_tvm(spec={"score": {
        "input_ids": spec.Tensor([1, "seq_len"], "int32"), "kv": spec.Object(object_type=PagedKVCache),
        "$": {"param_mode": "packed", "effect_mode": "none"}}})
    names = [n for n, _ in named]
    groups = find_scaling_groups(mod["score"], names)
    found = {g.producer: sorted(c.weight for c in g.consumers) for g in groups}
    assert found == {
        # block 0: no norm before attention (the embedding also feeds the residual): no input group
        "blocks.0.mixer.wv.weight": ["blocks.0.mixer.proj.weight"],  # through concat + attention
        "blocks.0.ln_ffn.weight": ["blocks.0.ffn.w1.weight", "blocks.0.ffn.w3.weight"],
        "blocks.0.ffn.w3.weight": ["blocks.0.ffn.w2.weight"],  # w3 is the linear side of silu(w1)*w3
        "blocks.1.ln_mix.weight": ["blocks.1.mixer.wk.weight", "blocks.1.mixer.wq.weight",
                                   "blocks.1.mixer.wv.weight"],
        "blocks.1.mixer.wv.weight": ["blocks.1.mixer.proj.weight"],
        "blocks.1.ln_ffn.weight": ["blocks.1.ffn.fc_in.weight"],
        # fc_in -> fc_out goes through GELU: not linear in the channel, left alone
        "out_norm.weight": ["head.weight"],
    }
    by = {g.producer: g for g in groups}
    assert by["blocks.0.mixer.wv.weight"].extra == ("blocks.0.mixer.wv.bias",)
    assert len(by["blocks.0.mixer.wv.weight"].channels) == NKV * HD


class _NormFeedsResidual(nn.Module):
    """A block whose normalized output is also its residual (x = h + mlp(h), h = norm(x)): the
    norm's channels reach the MLP and a residual add."""

    def __init__(self):
        self.tok = nn.Embedding(64, H)
        self.norm = nn.RMSNorm(H, -1, 1e-5, bias=False)
        self.ffn = _SwiGLU()
        self.head = nn.Linear(H, 64, bias=False)

    def score(self, input_ids: Tensor, kv: PagedKVCache):
        h = self.norm(self.tok(input_ids))
        return self.head(h + self.ffn(h)), kv


def test_channels_that_cannot_be_scaled_are_named() -> None:
    """AWQ refuses nothing silently: a norm whose output also feeds a residual add is reported
    (producer, how many channels, what they reach) and gets no group; the families' graphs have
    none (their norms feed only linears; q/k channels reach no linear)."""
    mod, named = _NormFeedsResidual().export_tvm(spec={"score": {
        "input_ids": spec.Tensor([1, "seq_len"], "int32"), "kv": spec.Object(object_type=PagedKVCache),
        "$": {"param_mode": "packed", "effect_mode": "none"}}})
    names = [n for n, _ in named]
    assert unscaled_channels(mod["score"], names) == [
        f"norm.weight: {H} of its {H} channels that feed ffn.w1.weight, ffn.w3.weight also reach relax.add, "
        "so AWQ leaves them unscaled"]
    assert "norm.weight" not in {g.producer for g in find_scaling_groups(mod["score"], names)}
    odd, odd_named = _OddModel().export_tvm(spec={"score": {
        "input_ids": spec.Tensor([1, "seq_len"], "int32"), "kv": spec.Object(object_type=PagedKVCache),
        "$": {"param_mode": "packed", "effect_mode": "none"}}})
    assert unscaled_channels(odd["score"], [n for n, _ in odd_named]) == []


# ------------------------------------------------------------------------------------------ end to end
def test_awq_beats_rtn_on_a_model_with_salient_channels(tmp_path: Path) -> None:
    model = with_salient_channels(load_model(str(make_checkpoint(tmp_path / "ckpt", seed=5))))
    rs = np.random.RandomState(0)
    samples = [list(rs.randint(3, 300, size=64)) for _ in range(8)]
    stats = calibrate(model, samples, progress=False)
    scheme = QuantScheme(group_size=32)
    res = awq_quantize(model, scheme, stats, progress=False)
    assert all(r.loss <= r.rtn_loss for r in res.scales.values())
    assert len(res.clip) == 4 * model.config.num_hidden_layers

    error = logit_error(FloatEngine(model, context_window=128), [list(rs.randint(3, 300, size=64)) for _ in range(3)])
    rtn_err = error(rtn(model, scheme).dequantized())
    assert error(res.scale_only().dequantized()) < 0.8 * rtn_err
    assert error(res.weights.dequantized()) < 0.8 * rtn_err


def test_nan_weight_is_named(tiny_bias_model) -> None:
    import copy

    model = copy.copy(tiny_bias_model)
    model.weights = dict(model.weights)
    bad = model.weights["layers.1.mlp.down_proj.weight"].copy()
    bad[0, 0] = np.nan
    model.weights["layers.1.mlp.down_proj.weight"] = bad
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        awq_quantize(model, QuantScheme(group_size=32), _Stats({}), progress=False)


def test_large_layers_are_searched_in_row_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clip search and duo's weight magnitudes go through big layers (a 128k-row head) in row
    chunks to bound memory; the answer is the one of the layer searched whole."""
    from awqc.passes import awq_clip
    from awqc.passes.awq_scale import _relative_magnitude

    torch.manual_seed(1)
    x = _salient_activations(k=64)
    w = torch.randn(40, 64)
    moment = SecondMoment(gram=x.T @ x / x.shape[0])
    scheme = QuantScheme(group_size=32)
    whole = search_layer_clip(w, moment, scheme, None)
    whole_rel = _relative_magnitude(w, 32)
    monkeypatch.setattr(awq_clip, "CHUNK_ELEMENTS", 7 * 64)  # 7 rows at a time, the last chunk short
    assert torch.equal(search_layer_clip(w, moment, scheme, None), whole)
    torch.testing.assert_close(_relative_magnitude(w, 32, chunk=7 * 64), whole_rel)
    g = w.abs().view(40, 2, 32)
    torch.testing.assert_close(whole_rel, (g / (g.amax(-1, keepdim=True) + 1e-6)).view(40, 64).mean(0))


def test_block_loss_search_measures_the_attention_and_mlp_outputs(tiny_ckpt: Path) -> None:
    """With a calibration probe, a norm's scales are chosen on the attention (MLP) output: the
    loss the search reports for its choice is the error of transformers' own attention (MLP)
    output with the scaled, quantized, unscaled-back weights; linear → linear groups keep the Gram."""
    from awqc.compiler.awq import awq_graph, awq_block
    from awqc.compiler.calibrate import BlockCalibrator, CalibrationStats
    from awqc.compiler.model_import import block_params
    from awqc.passes.awq_scale import _column_scales, effective_weight

    from conftest import hf_submodule_outputs

    model = load_model(str(tiny_ckpt))
    rs = np.random.RandomState(0)
    samples = [list(rs.randint(3, 300, size=48)) for _ in range(3)]
    weights = {n: torch.from_numpy(model.weights[n]) for n in block_params(model.config, 0)}
    inputs, probe = BlockCalibrator(model, samples, gram_tokens=None).block(0, weights, probe_samples=3)
    stats = CalibrationStats(inputs, 3, 48, {}, probe)
    func, names = awq_graph(model)
    groups = [g for g in find_scaling_groups(func, names) if g.producer in weights]
    scheme = QuantScheme(group_size=32)
    res = awq_block(weights, [n for n in weights if weights[n].ndim == 2], groups, attention_qk_rows(func, names),
                    stats, scheme)
    float_out = hf_submodule_outputs(tiny_ckpt, samples, {})
    cfg = model.config
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_size
    splits = {"self_attn": (["q_proj", "k_proj", "v_proj"], [q, kv, kv]), "mlp": (["gate_proj", "up_proj"], [inter] * 2)}
    checked = 0
    for i, g in enumerate(groups):
        r = res.scales[i]
        if g.kind != "norm":  # v → o, up → down: the Gram loss of the consumer's output
            w = weights[g.consumers[0].weight]
            assert r.loss == pytest.approx(group_loss(w, stats.of(g.consumers[0].weight).moment,
                                                      _column_scales(r.scales, g.consumers[0].columns), scheme),
                                           rel=1e-5)
            continue
        (c,) = g.consumers
        module = "self_attn" if "qkv_proj" in c.weight else "mlp"
        new = effective_weight(weights[c.weight], _column_scales(r.scales, c.columns), scheme)
        parts, sizes = splits[module]
        out = hf_submodule_outputs(tiny_ckpt, samples, {f"{module}.{p}.weight": t
                                                        for p, t in zip(parts, torch.split(new, sizes))})[module]
        assert r.loss == pytest.approx(float((out - float_out[module]).square().sum(-1).mean()), rel=1e-4)
        checked += 1
    assert checked == 2
