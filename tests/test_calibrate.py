"""Calibration: the block-by-block statistics against transformers' whole model, the statistics
cache, texts and samples, and the errors for short text and non-finite activations."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.calibrate import (BlockCalibrator, CalibrationError, CalibrationSettings, CalibrationStats, calibrate,
                                     calibration_samples, calibration_stats, hf_encoder, load_samples)
from awqc.compiler.model_import import block_params, load_model
from awqc.compiler.text_data import (CALIBRATION_DIRS, DOC_ROOT, EVAL_DIRS, TextError, default_calibration_text,
                                     token_windows)

from conftest import hf_submodule_outputs, make_checkpoint

SAMPLES = [list(np.random.RandomState(i).randint(3, 300, size=48)) for i in range(3)]


@pytest.fixture(scope="module")
def tiny_stats(tiny_ckpt: Path) -> CalibrationStats:
    return calibrate(load_model(str(tiny_ckpt)), SAMPLES, gram_tokens=None, progress=False)


def _hf_linear_inputs(ckpt: Path, samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """Inputs of q_proj / o_proj / gate_proj / down_proj in transformers, keyed by awqc's fused name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    acts: dict[str, list[torch.Tensor]] = {}
    names = {"q_proj": "qkv_proj", "o_proj": "o_proj", "gate_proj": "gate_up_proj", "down_proj": "down_proj",
             "qkv_proj": "qkv_proj", "gate_up_proj": "gate_up_proj"}  # Phi-3 fuses them in the checkpoint
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in names:
            key = name.removeprefix("model.").replace(leaf, names[leaf]) + ".weight"
            mod.register_forward_hook(lambda m, inp, out, key=key: acts.setdefault(key, []).append(inp[0][0]))
    with torch.no_grad():
        for s in samples:
            model(torch.tensor([s]))
    return {k: torch.cat(v) for k, v in acts.items()}


def test_statistics_match_transformers(tiny_ckpt: Path, tiny_stats: CalibrationStats) -> None:
    acts = _hf_linear_inputs(tiny_ckpt, SAMPLES)
    assert len(acts) == 8 and len(tiny_stats.inputs) == 8
    for name, x in acts.items():
        s = tiny_stats.of(name)
        assert s.n_tokens == s.n_gram_tokens == 3 * 48
        torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_statistics_past_a_sliding_window_match_transformers(tmp_path: Path) -> None:
    """Samples longer than Mistral's window: each block attends within it, as transformers does."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=4, model_type="mistral", sliding_window=20)
    stats = calibrate(load_model(str(ckpt)), SAMPLES, gram_tokens=None, progress=False)
    for name, x in _hf_linear_inputs(ckpt, SAMPLES).items():
        torch.testing.assert_close(stats.of(name).abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.of(name).gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_statistics_with_phi4_mini_rope_match_transformers(tmp_path: Path) -> None:
    """Partial RoPE with LongRoPE factors (Phi-4-mini's kind): calibration's blocks rotate as
    transformers does (a different rotation shows in layer 1's inputs)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, model_type="phi3", pad_token_id=0, partial_rotary_factor=0.5,
                           max_position_embeddings=512, original_max_position_embeddings=128, rope_scaling={
                               "type": "longrope", "short_factor": [1.0, 1.4, 2.1, 3.3],
                               "long_factor": [1.0, 4.0, 16.0, 40.0]})
    stats = calibrate(load_model(str(ckpt)), SAMPLES, gram_tokens=None, progress=False)
    acts = _hf_linear_inputs(ckpt, SAMPLES)
    assert len(acts) == 8
    for name, x in acts.items():
        torch.testing.assert_close(stats.of(name).abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type,overrides", [
    ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention"])),
    ("gemma2", dict(attn_logit_softcapping=0.25, final_logit_softcapping=2.0)),
])
def test_gemma_statistics_match_transformers(model_type: str, overrides: dict, tmp_path: Path) -> None:
    """Gemma: embeddings times sqrt(hidden), (1 + w) norms around attention and MLP, a sliding
    layer narrower than the samples, and (Gemma 2) soft-capped attention scores, as transformers
    computes them."""
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=6, model_type=model_type, head_dim=32, sliding_window=20,
                           tie_word_embeddings=False, **overrides)
    stats = calibrate(load_model(str(ckpt)), SAMPLES, gram_tokens=None, progress=False)
    acts = _hf_linear_inputs(ckpt, SAMPLES)
    assert len(acts) == 8
    for name, x in acts.items():
        torch.testing.assert_close(stats.of(name).abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.of(name).gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type,kw", [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("qwen3_moe", dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                       head_dim=16, mlp_only_layers=[1])),
])
def test_expert_statistics_match_transformers(model_type: str, kw: dict, tmp_path: Path) -> None:
    """Each expert's gate/up input is the MoE block's input on the tokens transformers' router
    sent to it, and its down input that expert's SiLU(gate) * up on them (transformers' own
    routing and expert weights, hooked at its experts module); a dense layer's taps as usual."""
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=8, model_type=model_type, tie_word_embeddings=False, **kw)
    stats = calibrate(load_model(str(ckpt)), SAMPLES, gram_tokens=None, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    acts: dict[str, list[torch.Tensor]] = {}

    def routed(module, args, i):
        x, index = args[0], args[1]
        for e in range(module.gate_up_proj.shape[0]):
            xe = x[(index == e).any(-1)]
            gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
            p = f"layers.{i}.mlp.experts.{e}"
            acts.setdefault(f"{p}.gate_up_proj.weight", []).append(xe)
            acts.setdefault(f"{p}.down_proj.weight", []).append(module.act_fn(gate) * up)

    moe = load_model(str(ckpt)).config.moe_layers
    for i in moe:
        hf.model.layers[i].mlp.experts.register_forward_pre_hook(lambda m, args, i=i: routed(m, args, i))
    with torch.no_grad():
        for sample in SAMPLES:
            hf(torch.tensor([sample]))
    for name, xs in acts.items():
        x = torch.cat(xs)
        if len(x) == 0:
            assert name not in stats  # an expert no token chose has no statistics
            continue
        assert stats.of(name).n_tokens == len(x)
        torch.testing.assert_close(stats.of(name).abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.of(name).gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    dense = [i for i in range(2) if i not in moe]
    for i in dense:  # Qwen3-MoE's dense layer keeps its MLP taps
        assert f"layers.{i}.mlp.gate_up_proj.weight" in stats and f"layers.{i}.mlp.down_proj.weight" in stats


def test_gram_subsampling(tiny_ckpt: Path) -> None:
    """With gram_tokens, the Gram is exactly that of the rows the calibrator drew from each sample."""
    model = load_model(str(tiny_ckpt))
    cal = BlockCalibrator(model, SAMPLES, gram_tokens=16)
    stats, _ = cal.block(0, {n: torch.from_numpy(model.weights[n]) for n in block_params(model.config, 0)})
    acts = _hf_linear_inputs(tiny_ckpt, SAMPLES)  # every sample's tokens, in order
    rows = torch.cat([r + 48 * b for b, r in enumerate(cal._rows)])
    assert len(stats) == 4
    for s in stats:
        assert (s.n_tokens, s.n_gram_tokens) == (3 * 48, 3 * 16)
        xs = acts[s.consumers[0]][rows]
        assert s.moment.rows is not None  # 48 tokens, fewer than the 64 or 96 features: kept as rows
        torch.testing.assert_close(s.gram, xs.T @ xs / xs.shape[0], rtol=1e-4, atol=1e-5)


def test_gram_rows_turn_into_the_gram_past_the_width(tiny_ckpt: Path) -> None:
    """Two batches of samples: the first's rows fit under the width and are kept, the second's
    do not, and the Gram is then the sum over both."""
    samples = [list(np.random.RandomState(10 + i).randint(3, 300, size=48)) for i in range(12)]
    model = load_model(str(tiny_ckpt))
    cal = BlockCalibrator(model, samples, gram_tokens=6)  # 8 × 6 = 48 rows, then 12 × 6 = 72
    stats, _ = cal.block(0, {n: torch.from_numpy(model.weights[n]) for n in block_params(model.config, 0)})
    acts = _hf_linear_inputs(tiny_ckpt, samples)
    rows = torch.cat([r + 48 * b for b, r in enumerate(cal._rows)])
    for s in stats:
        k = s.abs_mean.shape[0]
        assert (s.moment.rows is not None) == (72 <= k)
        xs = acts[s.consumers[0]][rows]
        torch.testing.assert_close(s.gram, xs.T @ xs / 72, rtol=1e-4, atol=1e-5)


def test_probe_loss_is_the_submodules_output_error(tiny_ckpt: Path) -> None:
    """BlockProbe.loss with q/k/v (or gate/up) replaced equals the error of transformers' own
    attention (MLP) output with those weights, on the same tokens; other submodules stay float."""
    model = load_model(str(tiny_ckpt))
    weights = {n: torch.from_numpy(model.weights[n]) for n in block_params(model.config, 0)}
    _, probe = BlockCalibrator(model, SAMPLES, gram_tokens=None).block(0, weights, probe_samples=3)
    qkv, gate_up = "layers.0.self_attn.qkv_proj.weight", "layers.0.mlp.gate_up_proj.weight"
    assert probe.module([qkv]) == "self_attn" and probe.module([gate_up]) == "mlp"
    assert probe.module([qkv, gate_up]) is None and probe.module(["layers.0.input_layernorm.weight"]) is None
    float_out = hf_submodule_outputs(tiny_ckpt, SAMPLES, {})
    gen = torch.Generator().manual_seed(0)
    q, kv = model.config.num_attention_heads * model.config.head_dim, model.config.kv_dim
    for name, module, parts in ((qkv, "self_attn", [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                                    ("self_attn.v_proj.weight", kv)]),
                                (gate_up, "mlp", [("mlp.gate_proj.weight", model.config.intermediate_size),
                                                  ("mlp.up_proj.weight", model.config.intermediate_size)])):
        new = weights[name] + 0.05 * torch.randn(weights[name].shape, generator=gen)
        split = dict(zip([n for n, _ in parts], torch.split(new, [k for _, k in parts])))
        out = hf_submodule_outputs(tiny_ckpt, SAMPLES, split)[module]
        expected = float((out - float_out[module]).square().sum(-1).mean())
        assert expected > 0
        assert probe.loss(module, {name: new}) == pytest.approx(expected, rel=1e-4)
        assert probe.loss(module, {name: weights[name]}) == pytest.approx(0.0, abs=1e-10)


def test_probe_keeps_batches_spread_over_the_samples(tiny_ckpt: Path) -> None:
    cal = BlockCalibrator(load_model(str(tiny_ckpt)), [SAMPLES[0]] * 40, gram_tokens=None)  # 5 batches of 8
    assert cal.probe_batches(0) == set()
    assert cal.probe_batches(8) == {0}
    assert cal.probe_batches(16) == {0, 16}  # batches 0 and 2 of 5
    assert cal.probe_batches(17) == {0, 8, 24}
    assert cal.probe_batches(1000) == {0, 8, 16, 24, 32}


CALIB_TEXT = " ".join(["compilers turn programs into machine code and the quick brown fox jumps"] * 30)


@pytest.mark.parametrize("gram_tokens", [8, None])  # 32 tokens: held as rows; 128: as the Gram
def test_statistics_cache_round_trip(tiny_ckpt: Path, tmp_path: Path, gram_tokens: int | None) -> None:
    model = load_model(str(tiny_ckpt))
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    settings = CalibrationSettings(tmp_path / "calib.txt", n_samples=4, seq_len=32, gram_tokens=gram_tokens,
                                   cache=tmp_path / "stats.safetensors")
    first = calibration_stats(model, settings, progress=False)
    assert settings.cache.is_file() and not list(tmp_path.glob(".stats*"))
    again = calibration_stats(model, settings, progress=False)  # read back, not recomputed
    assert again.seconds == {}
    for s in first.inputs:
        read = again.of(s.consumers[0])
        torch.testing.assert_close(read.gram, s.gram)
        assert (read.moment.rows is None) == (s.moment.rows is None) == (gram_tokens is None)
        assert read.n_gram_tokens == s.n_gram_tokens == 4 * (gram_tokens or 32)


def test_statistics_cache_of_other_settings_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_ckpt))
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    settings = CalibrationSettings(tmp_path / "calib.txt", n_samples=4, seq_len=32, cache=tmp_path / "stats.st")
    calibration_stats(model, settings, progress=False)
    for other in (dict(n_samples=3), dict(seq_len=16), dict(gram_tokens=None)):
        with pytest.raises(CalibrationError, match="made for another model"):
            calibration_stats(model, dataclasses.replace(settings, **other), progress=False)
    other_model = load_model(str(make_checkpoint(tmp_path / "other", seed=3)))
    with pytest.raises(CalibrationError, match="made for another model"):
        calibration_stats(other_model, settings, progress=False)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_statistics_cache_refused(tiny_ckpt: Path, tmp_path: Path, damage: str) -> None:
    model = load_model(str(tiny_ckpt))
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    settings = CalibrationSettings(tmp_path / "calib.txt", n_samples=4, seq_len=32, cache=tmp_path / "stats.st")
    calibration_stats(model, settings, progress=False)
    data = settings.cache.read_bytes()
    settings.cache.write_bytes({"empty": b"", "garbage": b"\x07" * 4096, "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(CalibrationError, match="calibration cache"):
        calibration_stats(model, settings, progress=False)


def test_short_text_names_the_minimum(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_ckpt))
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    with pytest.raises(TextError, match=r"shorter than one sample of 512 tokens; give at least 512 tokens"):
        load_samples(model, short, n_samples=4, seq_len=512)


def test_fewer_samples_than_asked_uses_what_fits(tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    model = load_model(str(tiny_ckpt))
    text = " ".join(["compilers turn programs into machine code"] * 40)
    n_tokens = len(hf_encoder(model.tokenizer)(text))
    samples = calibration_samples(hf_encoder(model.tokenizer), text, n_samples=1000, seq_len=16)
    assert len(samples) == n_tokens // 16 and all(len(s) == 16 for s in samples)
    assert "fewer than the 1000 asked" in capsys.readouterr().err


def test_windows_are_spread_and_disjoint() -> None:
    w = token_windows(list(range(100)), 10, 3)
    assert [x[0] for x in w] == [0, 30, 60]
    assert len(token_windows(list(range(100)), 10, None)) == 10


@pytest.mark.skipif(not (DOC_ROOT / "library").is_dir(), reason="python3.11-doc is not installed")
def test_default_texts_are_disjoint() -> None:
    assert not set(CALIBRATION_DIRS) & set(EVAL_DIRS)
    files = {d: {p.name for p in (DOC_ROOT / d).glob("**/*.rst.txt")} for d in CALIBRATION_DIRS + EVAL_DIRS}
    assert all(files.values())
    assert len(default_calibration_text()) > 1_000_000  # ~7 MB: far more than 128 x 512 tokens


def _shares_text(a: str, b: str, width: int = 60) -> int:
    """How many of a's width-character pieces of words (every width-th, at least half letters: not a
    rule of ====) occur in b, whitespace normalized."""
    a, b = " ".join(a.split()), " ".join(b.split())
    pieces = {b[i:i + width] for i in range(len(b) - width)}
    return sum(p in pieces and 2 * sum(c.isalpha() for c in p) >= width
               for p in (a[i:i + width] for i in range(0, len(a) - width, width)))


def test_prose_calibration_shares_nothing_with_the_evaluation_texts() -> None:
    from awqc.compiler.text_data import FORTUNES_ROOT, eval_domain_text, fortunes_prose

    prose = fortunes_prose()
    assert len(prose) > 1_000_000 and "\n%\n" not in prose
    for domain in ("jargon", "python-docs"):
        assert _shares_text(prose, eval_domain_text(domain)) == 0, domain
    # the files left out are the ones that quote the Jargon File (science: one fortune)
    jargon = eval_domain_text("jargon")
    assert all(_shares_text((FORTUNES_ROOT / f"{name}.u8").read_text(errors="replace"), jargon, 40) > 0
               for name in ("computers", "cookie", "definitions", "science"))


def test_default_samples_are_half_library_half_prose() -> None:
    from awqc.compiler.text_data import fortunes_prose

    def encode(s: str) -> list[int]:  # one token per character: windows are text positions
        return [ord(c) for c in s]

    samples = calibration_samples(encode, None, n_samples=5, seq_len=300)
    library, prose = default_calibration_text(), fortunes_prose()
    text = ["".join(map(chr, ids)) for ids in samples]
    assert [t in library for t in text] == [True, True, True, False, False]
    assert all(t in prose for t in text[3:])


def test_non_finite_activation_names_the_layer(tmp_path: Path) -> None:
    model = load_model(str(make_checkpoint(tmp_path / "ckpt", seed=7)))
    model = dataclasses.replace(model, weights=dict(model.weights))
    model.weights["layers.1.post_attention_layernorm.weight"][:] = 3e38  # overflows to inf in float32
    with pytest.raises(CalibrationError, match=r"input of layers\.1\.mlp\.gate_up_proj\.weight has NaN or inf"):
        calibrate(model, SAMPLES[:1], progress=False)
