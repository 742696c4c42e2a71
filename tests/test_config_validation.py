"""config_from_hf refuses every bad config.json field with an UnsupportedModelError naming it, and
reads a valid one the way transformers does."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from awqc.compiler.config import ModelConfig, UnsupportedModelError, check_vocab, config_from_hf

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def hf_dict(model_type: str = "llama", **kw: Any) -> dict[str, Any]:
    """config.json as transformers writes it (transformers 5: RoPE in rope_parameters)."""
    from transformers import AutoConfig

    d = AutoConfig.for_model(model_type, **{**TINY, **kw}).to_dict()
    d["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                           "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[model_type]]
    return json.loads(json.dumps(d))  # exactly what a config.json round trip gives


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return hf_dict()


def set_(key: str, value: Any) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        d[key] = value
    return f


def drop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def rope(**params: Any) -> Callable[[dict], None]:
    """Replace rope_parameters (keeping transformers' theta) with the given keys."""
    def f(d: dict) -> None:
        d["rope_parameters"] = {"rope_theta": 10000.0, **params}
    return f


def both(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        for g in fs:
            g(d)
    return f


# (mutation of the valid base, substrings the message must contain)
BAD = {
    "layers-negative": (set_("num_hidden_layers", -1), ["num_hidden_layers", "-1", "from 1 to"]),
    "layers-zero": (set_("num_hidden_layers", 0), ["num_hidden_layers", "0"]),
    "layers-huge": (set_("num_hidden_layers", 10**6), ["num_hidden_layers", "1000000"]),
    "heads-zero": (set_("num_attention_heads", 0), ["num_attention_heads", "0"]),
    "heads-float": (set_("num_attention_heads", 4.0), ["num_attention_heads", "4.0", "integer"]),
    "vocab-string": (set_("vocab_size", "320"), ["vocab_size", "'320'", "integer"]),
    "vocab-huge": (set_("vocab_size", 2**30), ["vocab_size", str(2**30)]),
    "vocab-missing": (drop("vocab_size"), ["lacks the required field 'vocab_size'"]),
    "hidden-bool": (set_("hidden_size", True), ["hidden_size", "True", "integer"]),
    "hidden-huge": (set_("hidden_size", 10**6), ["hidden_size", "1000000"]),
    "intermediate-fraction": (set_("intermediate_size", 96.5), ["intermediate_size", "96.5"]),
    "intermediate-null": (set_("intermediate_size", None), ["intermediate_size", "None"]),
    "kv-heads-zero": (set_("num_key_value_heads", 0), ["num_key_value_heads", "0"]),
    "kv-heads-not-divisor": (set_("num_key_value_heads", 3), ["num_attention_heads 4", "num_key_value_heads 3"]),
    "head-dim-odd": (set_("head_dim", 15), ["head_dim", "15", "even"]),
    "head-dim-negative": (set_("head_dim", -16), ["head_dim", "-16"]),
    "hidden-not-multiple": (both(set_("head_dim", None), set_("hidden_size", 66)),
                            ["hidden_size 66", "num_attention_heads 4", "head_dim"]),
    "max-pos-zero": (set_("max_position_embeddings", 0), ["max_position_embeddings", "0"]),
    "max-pos-huge": (set_("max_position_embeddings", 2**40), ["max_position_embeddings"]),
    "eps-nan": (set_("rms_norm_eps", float("nan")), ["rms_norm_eps", "nan", "finite number > 0"]),
    "eps-negative": (set_("rms_norm_eps", -1e-6), ["rms_norm_eps", "-1e-06"]),
    "eps-string": (set_("rms_norm_eps", "1e-6"), ["rms_norm_eps", "'1e-6'"]),
    "eps-bool": (set_("rms_norm_eps", True), ["rms_norm_eps", "True"]),
    "eps-too-big-for-float": (set_("rms_norm_eps", 10**400), ["rms_norm_eps", "finite number"]),
    "theta-zero": (rope(rope_type="default", rope_theta=0), ["rope_parameters.rope_theta", "0"]),
    "theta-inf-top-level": (set_("rope_theta", float("inf")), ["'rope_theta'", "inf"]),
    "theta-string": (rope(rope_type="default", rope_theta="1e4"), ["rope_theta", "'1e4'"]),
    "bos-past-vocab": (set_("bos_token_id", 320), ["bos_token_id", "320", "0 to 319"]),
    "bos-list": (set_("bos_token_id", [1]), ["bos_token_id", "[1]"]),
    "eos-negative": (set_("eos_token_id", -1), ["eos_token_id", "-1"]),
    "eos-list-past-vocab": (set_("eos_token_id", [2, 999]), ["eos_token_id", "[2, 999]", "list"]),
    "eos-string": (set_("eos_token_id", "2"), ["eos_token_id", "'2'"]),
    "tie-string": (set_("tie_word_embeddings", "false"), ["tie_word_embeddings", "'false'", "true or false"]),
    "attention-bias-int": (set_("attention_bias", 1), ["attention_bias", "1", "true or false"]),
    "mlp-bias-string": (set_("mlp_bias", "no"), ["mlp_bias", "'no'"]),
    "linear-factor-zero": (rope(rope_type="linear", factor=0), ["rope_parameters.factor", "0"]),
    "linear-factor-nan": (rope(rope_type="linear", factor=float("nan")), ["rope_parameters.factor", "nan"]),
    "linear-factor-missing": (rope(rope_type="linear"), ["lacks factor"]),
    "llama3-low-missing": (rope(**{k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
                           ["rope_parameters", "lacks low_freq_factor"]),
    "llama3-orig-missing": (rope(**{k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}),
                            ["lacks original_max_position_embeddings"]),
    "llama3-high-below-low": (rope(**{**LLAMA3, "high_freq_factor": 1.0}),
                              ["rope_parameters.high_freq_factor", "greater than low_freq_factor"]),
    "llama3-orig-zero": (rope(**{**LLAMA3, "original_max_position_embeddings": 0}),
                         ["rope_parameters.original_max_position_embeddings", "0"]),
    "rope-type-unsupported": (rope(rope_type="yarn", factor=2.0), ["'yarn' is not supported"]),
    "rope-type-number": (rope(rope_type=3), ["RoPE scaling type 3"]),
    "rope-type-and-type": (set_("rope_scaling", {"type": "linear", "rope_type": "llama3", "factor": 2.0}),
                           ["'rope_scaling'", "'linear'", "'llama3'"]),
    "rope-parameters-list": (set_("rope_parameters", [10000.0]), ["rope_parameters", "[10000.0]", "object"]),
    "rope-per-layer": (set_("rope_parameters", {"full_attention": {"rope_type": "default"}}), ["per-layer"]),
    "model-type-missing": (drop("model_type"), ["model_type None is not supported"]),
    "model-type-list": (set_("model_type", ["llama"]), ["model_type ['llama']"]),
    "architectures-string": (set_("architectures", "LlamaForCausalLM"), ["architectures", "a list"]),
    "sliding-window-string": (set_("sliding_window", "4096"), ["sliding_window", "'4096'"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_field_is_refused(base: dict[str, Any], name: str) -> None:
    mutate, needles = BAD[name]
    hf = copy.deepcopy(base)
    mutate(hf)
    with pytest.raises(UnsupportedModelError) as err:
        config_from_hf(hf)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_long_values_are_cut_short(base: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        config_from_hf({**base, "eos_token_id": list(range(10**5)) + [-1]})
    assert "eos_token_id" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("doc", [[{"vocab_size": 320}], "llama", 3, None])
def test_config_must_be_an_object(doc: Any) -> None:
    with pytest.raises(UnsupportedModelError, match="config.json must be a JSON object"):
        config_from_hf(doc)


# ------------------------------------------------------------------------------- RoPE spellings
LINEAR2 = {"rope_type": "linear", "factor": 2.0}
CONFLICTS = {
    "factor": (dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_parameters={**LINEAR2, "rope_theta": 1e4}),
               ["rope_scaling.factor = 4.0", "rope_parameters.factor = 2.0"]),
    "type": (dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters={**LLAMA3, "rope_theta": 1e4}),
             ["rope_scaling.rope_type = 'linear'", "rope_parameters.rope_type = 'llama3'"]),
    # rope_scaling without a type is default RoPE to transformers, whatever rope_parameters says
    "untyped-scaling": (dict(rope_scaling={"factor": 2.0}, rope_parameters=LINEAR2),
                        ["rope_scaling.rope_type = 'default' (unset", "rope_parameters.rope_type = 'linear'"]),
    "key-only-in-parameters": (dict(rope_scaling={k: v for k, v in LLAMA3.items()
                                                  if k != "original_max_position_embeddings"},
                                    rope_parameters={**LLAMA3, "rope_theta": 1e4}),
                               ["rope_parameters.original_max_position_embeddings", "rope_scaling does not set"]),
    "theta-top-level-vs-parameters": (dict(rope_theta=500000.0, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 10000.0}),
                                      ["rope_theta", "500000.0 (top-level)", "10000.0 (rope_parameters)"]),
    "theta-top-level-vs-scaling": (dict(rope_theta=500000.0, rope_parameters=None,
                                        rope_scaling={**LINEAR2, "rope_theta": 3.0}),
                                   ["rope_theta", "500000.0 (top-level)", "3.0 (rope_scaling)"]),
    # transformers drops rope_parameters (and its theta) for rope_scaling, then uses the default theta
    "theta-dropped-with-parameters": (dict(rope_scaling=LINEAR2, rope_parameters={**LINEAR2, "rope_theta": 5e5}),
                                      ["500000.0 (rope_parameters)", "transformers would use 10000.0"]),
}


def with_rope(base: dict[str, Any], **rope_fields: Any) -> dict[str, Any]:
    hf = {k: v for k, v in base.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    return {**hf, **copy.deepcopy(rope_fields)}


@pytest.mark.parametrize("name", list(CONFLICTS))
def test_conflicting_rope_spellings_are_refused(base: dict[str, Any], name: str) -> None:
    fields, needles = CONFLICTS[name]
    with pytest.raises(UnsupportedModelError) as err:
        config_from_hf(with_rope(base, **fields))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def load_with_transformers(hf: dict[str, Any], tmp_path: Path) -> Any:
    """The independent reference: transformers reading the same config.json."""
    from transformers import AutoConfig

    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf))
    return AutoConfig.from_pretrained(str(d))


def test_transformers_resolves_rope_as_awqc_assumes(base: dict[str, Any], tmp_path: Path) -> None:
    """The rule config.py's RoPE code is written against: rope_scaling replaces rope_parameters whole,
    and the dict's theta wins over the top-level one. If transformers changes this, revisit _rope."""
    ref = load_with_transformers(with_rope(base, rope_scaling={"type": "linear", "factor": 4.0},
                                           rope_parameters={**LLAMA3, "rope_theta": 5e5}), tmp_path)
    assert ref.rope_parameters["rope_type"] == "linear" and ref.rope_parameters["factor"] == 4.0
    assert ref.rope_parameters["rope_theta"] == 10000.0
    ref = load_with_transformers(with_rope(base, rope_theta=1e6, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 5e5}), tmp_path)
    assert ref.rope_parameters["rope_theta"] == 5e5


def summary(cfg: ModelConfig) -> dict[str, Any]:
    scaling = cfg.rope_scaling
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids, rope_theta=cfg.rope_theta,
                rope_type=scaling.get("rope_type", "default"),
                rope_keys={k: v for k, v in scaling.items() if k != "rope_type"})


def reference(ref: Any) -> dict[str, Any]:
    rp = ref.rope_parameters
    keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(rp["rope_type"], ())
    eos = ref.eos_token_id
    return dict(vocab_size=ref.vocab_size, hidden_size=ref.hidden_size, intermediate_size=ref.intermediate_size,
                num_hidden_layers=ref.num_hidden_layers, num_attention_heads=ref.num_attention_heads,
                num_key_value_heads=ref.num_key_value_heads,
                head_dim=getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads,
                rms_norm_eps=ref.rms_norm_eps, max_position_embeddings=ref.max_position_embeddings,
                tie_word_embeddings=ref.tie_word_embeddings, bos_token_id=ref.bos_token_id,
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
                rope_theta=rp["rope_theta"], rope_type=rp["rope_type"], rope_keys={k: rp[k] for k in keys})


VALID = {
    "llama": lambda: hf_dict(),
    "llama-tied-eos-list": lambda: hf_dict(tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2, 3]),
    "llama3-rope-parameters": lambda: hf_dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0},
                                              max_position_embeddings=256),
    "linear-rope": lambda: hf_dict(rope_scaling=LINEAR2),
    "qwen2": lambda: hf_dict("qwen2", bos_token_id=None, eos_token_id=5),
    "mistral-head-dim": lambda: hf_dict("mistral", sliding_window=None, head_dim=32),
    "qwen3": lambda: hf_dict("qwen3", head_dim=24),
    "phi3": lambda: hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mha-no-kv-heads": lambda: {k: v for k, v in hf_dict(num_key_value_heads=4).items()
                                if k not in ("num_key_value_heads", "head_dim")},
    # transformers 4 spelling: no rope_parameters, top-level theta, legacy "type"
    "transformers4-legacy": lambda: with_rope(hf_dict(), rope_theta=500000.0, rope_scaling={"type": "linear",
                                                                                             "factor": 2.0}),
    # both spellings, consistent: transformers uses rope_scaling and the top-level theta
    "both-spellings-consistent": lambda: with_rope(hf_dict(), rope_theta=500000.0, rope_scaling={**LLAMA3},
                                                   rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_config_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = VALID[name]()
    assert summary(config_from_hf(hf)) == reference(load_with_transformers(hf, tmp_path))


def test_qwen2_and_llama_biases() -> None:
    assert config_from_hf(hf_dict("qwen2")).attention_bias and not config_from_hf(hf_dict("qwen2")).o_proj_bias
    cfg = config_from_hf(hf_dict(attention_bias=True))
    assert cfg.attention_bias and cfg.o_proj_bias


# ------------------------------------------------------------------------------- tokenizer size
def test_check_vocab(base: dict[str, Any]) -> None:
    cfg = config_from_hf(base)
    check_vocab(cfg, 320, "ckpt")  # as many tokens as embedding rows
    check_vocab(cfg, 300, "ckpt")  # fewer: checkpoints pad vocab_size
    with pytest.raises(UnsupportedModelError) as err:
        check_vocab(cfg, 321, "some/ckpt")
    msg = str(err.value)
    assert "the tokenizer of some/ckpt has 321 tokens but the model's vocab_size is 320" in msg
    assert "token ids past 319" in msg and "does not belong to this model" in msg


# ------------------------------------------------------------------------------- end to end
def test_cli_refuses_negative_layers(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpt: Path) -> None:
    from awqc.compiler.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    assert config_from_hf(hf).num_hidden_layers == 2  # the untouched file, as transformers 5 wrote it, loads
    hf["num_hidden_layers"] = -1
    (ckpt / "config.json").write_text(json.dumps(hf))
    out = tmp_path / "out"
    assert main(["compile", "--model", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "num_hidden_layers" in err and "-1" in err and "Traceback" not in err
    assert not out.exists()


SLIDING = {
    "mistral-window": ("mistral", dict(sliding_window=64)),
    "mistral-window-past-positions": ("mistral", dict(sliding_window=512)),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "qwen2-window-unused": ("qwen2", dict(sliding_window=64)),
    "qwen2-window-used": ("qwen2", dict(sliding_window=64, use_sliding_window=True, max_window_layers=1)),
    "qwen2-window-no-layer-slides": ("qwen2", dict(sliding_window=64, use_sliding_window=True, max_window_layers=2)),
}


@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_is_where_transformers_slides(name: str, tmp_path: Path) -> None:
    """The window is recorded exactly where transformers' config makes some layer slide over fewer
    positions than the model has (TINY: 2 layers, 256 positions)."""
    model_type, kw = SLIDING[name]
    hf = hf_dict(model_type, **kw)
    ref = load_with_transformers(hf, tmp_path)
    slides = ref.sliding_window is not None and ref.sliding_window < ref.max_position_embeddings and (
        "sliding_attention" in (getattr(ref, "layer_types", None) or ["sliding_attention"]))
    assert config_from_hf(hf).sliding_window == (ref.sliding_window if slides else None)


def test_partial_rotary_is_refused_outside_phi3() -> None:
    hf = hf_dict("qwen3", head_dim=24)
    hf["rope_parameters"]["partial_rotary_factor"] = 0.75
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor.* is 0.75: RoPE on part of each head is "
                                                    "supported for phi3"):
        config_from_hf(hf)


@pytest.mark.parametrize("factor,rotary", [(0.75, 12), (0.5, 8), (1.0, None)])
def test_phi3_partial_rotary_matches_transformers(factor: float, rotary: int | None, tmp_path: Path) -> None:
    """Phi-4-mini's partial rotation: the rotated dimensions are transformers' own (the size of the
    cos its rotary embedding makes)."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf = hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=factor)
    cfg = config_from_hf(hf)
    cos, _ = Phi3RotaryEmbedding(load_with_transformers(hf, tmp_path))(torch.zeros(1, 3, 64), torch.arange(3)[None])
    assert cfg.rotary_dim == rotary and (cfg.rotary_dim or cfg.head_dim) == cos.shape[-1]


@pytest.mark.parametrize("change,message", [
    ({"partial_rotary_factor": 0.6}, "leaves an even number"),
    ({"partial_rotary_factor": 1.5}, "leaves an even number"),
    ({"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.75}}, "make them agree"),
])
def test_bad_partial_rotary_is_refused(change: dict, message: str) -> None:
    hf = {**hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2), **change}
    if "rope_parameters" not in change:
        hf["rope_parameters"] = {k: v for k, v in hf["rope_parameters"].items() if k != "partial_rotary_factor"}
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf)


# ------------------------------------------------------------------------------- LongRoPE (Phi-3)
SHORT, LONG = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 40.0]
# Phi-3.5-mini's config.json layout (transformers 4 spelling), TINY sizes: head_dim 16, 8 pairs
PHI3_LONGROPE = {"max_position_embeddings": 256, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                 "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}


@pytest.mark.parametrize("spelling", ["longrope", "su", "attention-factor-given", "transformers5"])
def test_longrope_matches_transformers(spelling: str, tmp_path: Path) -> None:
    """awqc's LongRoPE frequencies and cos/sin scale are transformers' own (its rope init function
    on the config it reads from the same file); the context stops where the long factors start."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from awqc.compiler.models.rope import inverse_frequencies

    hf = with_rope(hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2), **PHI3_LONGROPE)
    if spelling == "su":  # Phi-3-mini-128k's older name
        hf["rope_scaling"]["type"] = "su"
    if spelling == "attention-factor-given":
        hf["rope_scaling"]["attention_factor"] = 1.5
    if spelling == "transformers5":  # what transformers 5 writes back
        hf = json.loads(json.dumps(load_with_transformers(hf, tmp_path).to_dict()))
    cfg = config_from_hf(hf)
    ref = load_with_transformers(hf, tmp_path)
    inv, attention = ROPE_INIT_FUNCTIONS["longrope"](ref, None)
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.max_context == 64
    assert cfg.rope_scaling["attention_factor"] == pytest.approx(attention, rel=1e-12)
    assert attention == (1.5 if spelling == "attention-factor-given" else pytest.approx((1 + math.log(4) / math.log(64)) ** 0.5))
    np.testing.assert_allclose(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling["short_factor"]),
                               inv.numpy(), rtol=1e-7)


@pytest.mark.parametrize("change,message", [
    ({"short_factor": SHORT[:-1]}, "rope_scaling.short_factor"),
    ({"long_factor": [*LONG[:-1], 0.0]}, "a list of 8 positive numbers"),
    ({"long_factor": None}, "rope_scaling.long_factor"),
])
def test_bad_longrope_is_refused(change: dict, message: str) -> None:
    hf = with_rope(hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2), **PHI3_LONGROPE)
    hf["rope_scaling"].update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf)


def test_a_context_past_the_original_window_picks_the_long_factors() -> None:
    """The default window is LongRoPE's original one (short factors); a longer one is allowed and
    compiles the long factors (for_context_window), up to max_position_embeddings."""
    from awqc.compiler.cli import context_window
    from awqc.compiler.config import for_context_window

    cfg = config_from_hf(with_rope(hf_dict("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2), **PHI3_LONGROPE))
    assert context_window(None, cfg) == 64 and context_window(65, cfg) == 65
    assert for_context_window(cfg, 64) is cfg
    long = for_context_window(cfg, 65)
    assert long.rope_scaling == {**cfg.rope_scaling, "long_context": True}
    assert long.max_context == cfg.max_position_embeddings


# ------------------------------------------------------------------------------- Gemma 3
# config.json of a Gemma 3 text model as the hub has it (transformers 4 spelling: rope_theta for the
# full layers, rope_local_base_freq for the sliding ones, sliding_window_pattern; TINY sizes)
GEMMA3_HUB = {**TINY, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 32,
              "num_hidden_layers": 7, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 48,
              "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": {"rope_type": "linear",
                                                                                     "factor": 8.0},
              "sliding_window": 64, "sliding_window_pattern": 3, "attn_logit_softcapping": None,
              "final_logit_softcapping": None}


@pytest.mark.parametrize("spelling", ["hub", "transformers5"])
def test_gemma3_config_matches_transformers(spelling: str, tmp_path: Path) -> None:
    """Which layers slide, the window, both RoPE bases, the full layers' scaling and the attention
    scale are those transformers' Gemma3TextConfig resolves, from the hub's legacy spelling and
    from the one transformers 5 writes (rope_parameters per layer type, layer_types)."""
    hf = GEMMA3_HUB if spelling == "hub" else hf_dict("gemma3_text", **{
        k: v for k, v in GEMMA3_HUB.items() if k not in ("architectures", "model_type")})
    ref = load_with_transformers(hf, tmp_path)
    cfg = config_from_hf(hf)
    rope = ref.rope_parameters
    assert cfg.sliding_layers == tuple(i for i, t in enumerate(ref.layer_types) if t == "sliding_attention")
    assert cfg.sliding_layers == (0, 1, 3, 4, 6)  # every third layer attends fully
    assert cfg.sliding_window == ref.sliding_window == 64
    assert (cfg.rope_theta, cfg.rope_local_theta) == (rope["full_attention"]["rope_theta"],
                                                      rope["sliding_attention"]["rope_theta"]) == (1e6, 1e4)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    assert rope["sliding_attention"]["rope_type"] == "default"
    assert cfg.attention_scale == ref.query_pre_attn_scalar ** -0.5 == 48 ** -0.5


@pytest.mark.parametrize("change,message", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported; Gemma 3 uses 'gelu_pytorch_tanh'"),
    ({"rope_scaling": LLAMA3}, "Gemma 3 RoPE scaling 'llama3' is not supported; supported: default, linear"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "RoPE scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"global": {"rope_theta": 1e6}}}, "field 'rope_parameters' is {'global'"),
])
def test_gemma3_options_it_does_not_compute_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_hf({**GEMMA3_HUB, **change})


# ------------------------------------------------------------------------------- Gemma 2
# config.json of a Gemma 2 model as the hub has it (no layer_types: Gemma2Config alternates them;
# TINY sizes)
GEMMA2_HUB = {**TINY, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 32,
              "num_hidden_layers": 5, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 48,
              "rope_theta": 10000.0, "sliding_window": 64, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "cache_implementation": "hybrid"}


@pytest.mark.parametrize("spelling", ["hub", "transformers5"])
def test_gemma2_config_matches_transformers(spelling: str, tmp_path: Path) -> None:
    """Which layers slide (every other one, from the first), the window, both soft-caps, the RoPE
    base and the attention scale are those transformers' Gemma2Config resolves."""
    hf = GEMMA2_HUB if spelling == "hub" else hf_dict("gemma2", **{
        k: v for k, v in GEMMA2_HUB.items() if k not in ("architectures", "model_type")})
    ref = load_with_transformers(hf, tmp_path)
    cfg = config_from_hf(hf)
    assert cfg.sliding_layers == tuple(i for i, t in enumerate(ref.layer_types) if t == "sliding_attention")
    assert cfg.sliding_layers == (0, 2, 4)
    assert cfg.sliding_window == ref.sliding_window == 64
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (
        ref.attn_logit_softcapping, ref.final_logit_softcapping) == (50.0, 30.0)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 1e4 and cfg.rope_local_theta is None
    assert cfg.attention_scale == ref.query_pre_attn_scalar ** -0.5 == 48 ** -0.5
    uncapped = config_from_hf({**hf, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (uncapped.attn_logit_softcapping, uncapped.final_logit_softcapping) == (None, None)


@pytest.mark.parametrize("change,message", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported; Gemma 2 uses 'gelu_pytorch_tanh'"),
    ({"attn_logit_softcapping": 0}, "'attn_logit_softcapping' is 0; expected a finite number > 0"),
    ({"final_logit_softcapping": "30"}, "'final_logit_softcapping' is '30'; expected a finite number > 0"),
    ({"rope_scaling": LLAMA3}, "Gemma 2 RoPE scaling 'llama3' is not supported; supported: default, linear"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
])
def test_gemma2_options_it_does_not_compute_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_hf({**GEMMA2_HUB, **change})
