"""Calibration: the compiled `calibrate` function's statistics against transformers, texts and
samples, and the errors for short text and non-finite activations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.calibrate import (CalibrationError, CalibrationStats, calibrate, calibration_samples,
                                     hf_encoder, load_samples)
from awqc.compiler.llama import export_model
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.compiler.text_data import (CALIBRATION_DIRS, DOC_ROOT, EVAL_DIRS, TextError, default_calibration_text,
                                     token_windows)
from awqc.passes.calibration_taps import add_calibration_function

from conftest import make_checkpoint

SAMPLES = [list(np.random.RandomState(i).randint(3, 300, size=48)) for i in range(3)]


@pytest.fixture(scope="module")
def tiny_stats(tiny_ckpt: Path) -> CalibrationStats:
    return calibrate(load_model(str(tiny_ckpt)), SAMPLES, gram_tokens=None, progress=False)


def _hf_linear_inputs(ckpt: Path, samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """Inputs of q_proj / o_proj / gate_proj / down_proj in transformers, keyed by awqc's fused name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    acts: dict[str, list[torch.Tensor]] = {}
    names = {"q_proj": "qkv_proj", "o_proj": "o_proj", "gate_proj": "gate_up_proj", "down_proj": "down_proj"}
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


def test_calibrate_function_drops_the_lm_head(tiny_ckpt: Path) -> None:
    model = load_model(str(tiny_ckpt))
    mod, named = export_model(model.config, "float32", get_target("host").target())
    cal, taps = add_calibration_function(mod, [n for n, _ in named], lambda n: "layers." in n)
    assert [t.consumers for t in taps][:2] == [("layers.0.self_attn.qkv_proj.weight",),
                                               ("layers.0.self_attn.o_proj.weight",)]
    text = cal["calibrate"].script()
    assert "matmul" in text and "permute_dims(embed_tokens_weight" not in text  # tied LM head gone
    assert "score" not in [gv.name_hint for gv in cal.get_global_vars()]


def test_gram_subsampling_and_save_load(tiny_ckpt: Path, tmp_path: Path) -> None:
    stats = calibrate(load_model(str(tiny_ckpt)), SAMPLES, gram_tokens=16, progress=False)
    s = stats.inputs[0]
    assert (s.n_tokens, s.n_gram_tokens) == (3 * 48, 3 * 16)
    stats.save(tmp_path / "stats.pt")
    back = CalibrationStats.load(tmp_path / "stats.pt")
    torch.testing.assert_close(back.of(s.consumers[0]).gram, s.gram)


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


def test_non_finite_activation_names_the_layer(tmp_path: Path) -> None:
    model = load_model(str(make_checkpoint(tmp_path / "ckpt", seed=7)))
    model.weights["layers.1.post_attention_layernorm.weight"][:] = 3e38  # overflows to inf in float32
    with pytest.raises(CalibrationError, match=r"input of layers\.1\.mlp\.gate_up_proj\.weight has NaN or inf"):
        calibrate(model, SAMPLES[:1], progress=False)
