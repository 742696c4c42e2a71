"""The model configuration awqc compiles: one dataclass for every family in compiler/models/."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .models import SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class UnsupportedModelError(ValueError):
    """The checkpoint declares an architecture or option awqc does not compile."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections
    o_proj_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    model_type: str = "llama"
    # Sliding-window attention: the window (None: every layer attends to the whole sequence) and the
    # layers that use it (the others attend fully).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    # Gemma 3: attention logits scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5),
    # and the RoPE base of the sliding layers (None: rope_theta in every layer).
    query_pre_attn_scalar: int | None = None
    rope_local_theta: float | None = None
    # Phi-4-mini: RoPE rotates the first rotary_dim dimensions of each head (None: all of them)
    rotary_dim: int | None = None
    # Gemma 2: attention scores and the final logits soft-capped to cap * tanh(x / cap) (None: not)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE): in the layers moe_layers the MLP is num_experts
    # experts of moe_intermediate_size, num_experts_per_tok of them chosen per token by a router
    # (softmax, top-k, renormalized over the chosen when norm_topk_prob); the other layers are dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True

    @property
    def max_context(self) -> int:
        """The longest sequence awqc computes as transformers does. A LongRoPE model rotates by its
        short factors up to original_max_position_embeddings and by its long ones past it; an
        artifact picks one set when it is compiled (`for_context_window`), so this is the original
        window unless the long factors were picked."""
        r = self.rope_scaling
        if r.get("rope_type") == "longrope" and not r.get("long_context"):
            return min(self.max_position_embeddings, r["original_max_position_embeddings"])
        return self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_rope_theta(self, layer: int) -> float:
        local = self.rope_local_theta is not None and layer in self.sliding_layers
        return self.rope_local_theta if local else self.rope_theta

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["sliding_layers"] = list(self.sliding_layers)
        out["moe_layers"] = list(self.moe_layers)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)


# ------------------------------------------------------------------------------- validation
# config.json comes from a model hub and is untrusted: every field awqc uses is checked for type,
# range and consistency here, before any weight is read, so that a bad file is one clear
# UnsupportedModelError naming the field, the value and what is expected, never a traceback later.

# Caps well above any released model; they stop absurd sizes before any allocation.
MAX_VOCAB = 2**24
MAX_HIDDEN = 65536
MAX_INTERMEDIATE = 2**20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_POSITIONS = 2**24
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


def _show(value: Any) -> str:
    """repr of a value for a message, cut short: the file may hold anything."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's int-to-str digit limit
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(field: str, value: Any, expected: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json field {field!r} is {_show(value)}; expected {expected}")


def _is_int(value: Any) -> bool:
    # JSON integers only: bool is an int subclass in Python, and 576.0 or "576" is a broken file.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad(field, value, f"an integer from {lo} to {hi}")
    return value


def _int(hf: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    """hf[key] as an integer in [lo, hi]; `default` when absent (no default: the field is required)."""
    if key not in hf:
        if default is None:
            raise UnsupportedModelError(f"config.json lacks the required field {key!r}")
        return default
    return _check_int(key, hf[key], lo, hi)


def _check_positive_float(field: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:  # a JSON integer too large for a float
        number = math.nan
    if not (math.isfinite(number) and number > 0):  # also refuses NaN, which compares false
        raise _bad(field, value, "a finite number > 0")
    return number


def _float(hf: dict[str, Any], key: str, default: float) -> float:
    """hf[key] as a finite float > 0 (an explicit null is refused: transformers would keep None)."""
    return default if key not in hf else _check_positive_float(key, hf[key])


def _bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: never coerce
        raise _bad(key, value, "true or false")
    return value


def _token_ids(hf: dict[str, Any], key: str, vocab: int, allow_list: bool) -> tuple[int, ...]:
    """Token ids awqc feeds to or compares with the embedding: each in [0, vocab_size)."""
    value = hf.get(key)
    if value is None:
        return ()
    ids = value if allow_list and isinstance(value, list) else [value]
    expected = f"a token id from 0 to {vocab - 1} (vocab_size {vocab})" + (", or a list of them" if allow_list else "")
    for i in ids:
        if not _is_int(i) or not 0 <= i < vocab:
            raise _bad(key, value, expected)
    return tuple(ids)


def _check_supported(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _bad("architectures", archs, "a list of model class names such as ['LlamaForCausalLM']")
    model_type = hf.get("model_type")
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModelError(
            f"architecture {', '.join(archs)} is not supported; awqc compiles the Llama family: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {_show(model_type)} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type in GEMMA:
        _check_gemma(hf, model_type)
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {_show(act)} is not supported; the Llama family uses 'silu'")
    if _bool(hf, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias=true is not supported; supported: MLPs without bias")
    return model_type


def _check_gemma(hf: dict[str, Any], model_type: str) -> None:
    """The Gemma options awqc computes: tanh GELU, causal attention."""
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"hidden_activation {_show(act)} is not supported; {GEMMA[model_type]} uses "
                                    "'gelu_pytorch_tanh'")
    if hf.get("use_bidirectional_attention") is not None and _bool(hf, "use_bidirectional_attention", False):
        raise UnsupportedModelError("use_bidirectional_attention=true is not supported; supported: causal attention")


def _softcap(hf: dict[str, Any], key: str) -> float | None:
    return None if hf.get(key) is None else _check_positive_float(key, hf[key])


GEMMA = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
GEMMA_WINDOW = 4096  # transformers' Gemma2Config and Gemma3TextConfig defaults
GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}


def _gemma_layer_types(hf: dict[str, Any], model_type: str, layers: int) -> list[str]:
    """layer_types as Gemma2Config / Gemma3TextConfig derive them when absent: every pattern-th
    layer attends fully (Gemma 2: every 2nd; Gemma 3: sliding_window_pattern, default 6), the
    others slide."""
    if hf.get("layer_types") is not None:
        return hf["layer_types"]
    pattern = GEMMA_PATTERN[model_type]
    if model_type == "gemma3_text":
        pattern = _int(hf, "sliding_window_pattern", 1, MAX_LAYERS, default=pattern)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _attention_window(hf: dict[str, Any], model_type: str, layers: int,
                      max_positions: int) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers that slide) where sliding-window attention narrows some layer, else
    (None, ()). As transformers: `layer_types` where the config lists them; else Mistral slides in
    every layer whenever sliding_window is set, Qwen2/Qwen3 with use_sliding_window in the layers
    from max_window_layers on."""
    gemma = model_type in GEMMA
    window = hf.get("sliding_window", GEMMA_WINDOW if gemma else None)
    if window is None:
        return None, ()
    _check_int("sliding_window", window, 0, 2**31)
    # Gemma always slides in its sliding layers, whose RoPE base also differs in Gemma 3 (so they
    # are kept even when the window spans the whole context).
    default_on = model_type in ("mistral", "mixtral") or gemma
    if not (window and _bool(hf, "use_sliding_window", default_on) and (gemma or window < max_positions)):
        return None, ()
    layer_types = _gemma_layer_types(hf, model_type, layers) if gemma else hf.get("layer_types")
    if layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        if not (isinstance(layer_types, list) and len(layer_types) == layers and all(t in kinds for t in layer_types)):
            raise _bad("layer_types", layer_types, f"a list of {layers} entries (one per layer), each "
                       f"{' or '.join(map(repr, kinds))}")
        sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif model_type in ("mistral", "mixtral"):
        sliding = tuple(range(layers))
    else:
        first = _int(hf, "max_window_layers", 0, MAX_LAYERS, default=28)  # transformers' Qwen2 default
        sliding = tuple(range(first, layers))
    return (window, sliding) if sliding else (None, ())


# ------------------------------------------------------------------------------- RoPE
def _rotary_dim(hf: dict[str, Any], model_type: str, head_dim: int) -> int | None:
    """Dimensions of each head that RoPE rotates, as transformers reads partial_rotary_factor (the
    RoPE dict's, else the top-level one, else 1.0); None for the whole head. Only Phi-3's model
    (Phi-4-mini: 0.75) applies a partial rotation; two spellings that disagree are refused."""
    stated = {}
    for where, holder in (("partial_rotary_factor", hf), ("rope_parameters.partial_rotary_factor", hf.get("rope_parameters")),
                          ("rope_scaling.partial_rotary_factor", hf.get("rope_scaling"))):
        if isinstance(holder, dict) and holder.get("partial_rotary_factor") is not None:
            stated[where] = _check_positive_float(where, holder["partial_rotary_factor"])
    if len(set(stated.values())) > 1:
        raise UnsupportedModelError(f"config.json states partial_rotary_factor as {stated}; make them agree or keep one")
    factor = next(iter(stated.values()), 1.0)
    if factor == 1.0:
        return None
    where = next(iter(stated))
    if model_type != "phi3":
        raise UnsupportedModelError(
            f"config.json field {where!r} is {_show(factor)}: RoPE on part of each head is supported for phi3 "
            f"(Phi-4-mini) only; {model_type} supports 1.0 (RoPE over the whole head)")
    rotary = int(head_dim * factor)
    if factor > 1.0 or rotary < 2 or rotary % 2:
        raise _bad(where, factor, f"a fraction of head_dim {head_dim} that leaves an even number of rotated dimensions")
    return rotary


# transformers 5 (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict / standardize_rope_params in
# modeling_rope_utils.py) resolves RoPE from config.json like this:
#   * the dict used is `rope_scaling or rope_parameters`: a non-empty rope_scaling (the transformers 4
#     spelling) replaces rope_parameters whole; nothing is merged;
#   * in that dict "rope_type" wins over the legacy "type", and neither means "default";
#   * theta is the dict's own "rope_theta", else the top-level "rope_theta", else 10000.
# awqc computes the same, and refuses a file where the spellings disagree instead of silently picking
# one: both dicts given with a different value for a key, or a key that only rope_parameters sets
# (transformers would drop it), "type" and "rope_type" that differ, or a rope_theta stated anywhere
# with a value other than the one transformers uses.  A consistent file gives transformers' RoPE.

_ROPE_KEYS = {  # the keys each supported type reads (what awqc keeps in ModelConfig.rope_scaling)
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor"),
}


def _rope_dict(hf: dict[str, Any], key: str) -> dict[str, Any] | None:
    """rope_scaling or rope_parameters with the legacy "type" folded into "rope_type"; None when absent."""
    value = hf.get(key)
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise _bad(key, value, "an object such as {\"rope_type\": \"linear\", \"factor\": 2.0}, or null")
    if any(isinstance(v, dict) for v in value.values()):
        raise UnsupportedModelError(
            f"config.json field {key!r} holds per-layer RoPE parameters ({', '.join(map(str, value))}); "
            "supported: one RoPE for all layers")
    out = dict(value)
    if "type" in out:
        legacy = out.pop("type")
        if "rope_type" in out and out["rope_type"] != legacy:
            raise UnsupportedModelError(
                f"config.json field {key!r} has type {_show(legacy)} and rope_type {_show(out['rope_type'])}; "
                "they must agree (transformers would use rope_type)")
        out.setdefault("rope_type", legacy)
    out.setdefault("rope_type", "default")
    return out


def _rope(hf: dict[str, Any], model_type: str, rotary_dim: int, max_positions: int) -> tuple[float, dict[str, Any]]:
    """RoPE theta and scaling as transformers resolves them (see above), validated; rotary_dim: the
    dimensions of a head that RoPE rotates."""
    scaling, params = _rope_dict(hf, "rope_scaling"), _rope_dict(hf, "rope_parameters")
    if scaling is not None and params is not None:
        for k, v in params.items():
            if k == "rope_theta":
                continue  # checked with the other thetas below
            if k not in scaling:
                raise UnsupportedModelError(
                    f"config.json has rope_parameters.{k} = {_show(v)} but rope_scaling does not set {k}; "
                    "transformers uses rope_scaling alone when both are given, so it would ignore it: "
                    "keep one of rope_scaling and rope_parameters")
            if scaling[k] != v:
                given = hf["rope_scaling"]
                unset = k == "rope_type" and "rope_type" not in given and "type" not in given
                unset_note = " (unset, which means 'default')" if unset else ""
                raise UnsupportedModelError(
                    f"config.json has rope_scaling.{k} = {_show(scaling[k])}{unset_note} but rope_parameters.{k} = "
                    f"{_show(v)}; they must agree (transformers would use rope_scaling)")
    rope = scaling if scaling is not None else (params or {"rope_type": "default"})

    # Every stated theta must be valid and equal to the one transformers uses.
    stated = {name: d["rope_theta"] for name, d in (("rope_scaling", scaling), ("rope_parameters", params))
              if d is not None and "rope_theta" in d}
    if "rope_theta" in hf:
        stated["top-level"] = hf["rope_theta"]
    for name, value in stated.items():
        _check_positive_float("rope_theta" if name == "top-level" else f"{name}.rope_theta", value)
    theta = float(rope.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA)))
    if any(float(v) != theta for v in stated.values()):
        where = ", ".join(f"{_show(v)} ({name})" for name, v in stated.items())
        raise UnsupportedModelError(
            f"config.json states rope_theta as {where}; transformers would use {theta!r} (the RoPE dict's "
            "own rope_theta, else the top-level one, else 10000, with rope_scaling replacing rope_parameters "
            "when both are given). Make them agree or keep one")

    rope_type = rope["rope_type"]
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's names for LongRoPE
        rope_type = "longrope"
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {_show(rope_type)} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, {}
    name = "rope_scaling" if scaling is not None else "rope_parameters"
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in rope]
    if missing:
        raise UnsupportedModelError(
            f"config.json field {name!r} has rope_type {rope_type!r} but lacks {', '.join(missing)}; "
            f"{rope_type} RoPE needs {', '.join(_ROPE_KEYS[rope_type])}")
    if rope_type == "longrope":
        return theta, _longrope(hf, rope, name, model_type, rotary_dim, max_positions)
    out: dict[str, Any] = {"rope_type": rope_type,
                           "factor": _check_positive_float(f"{name}.factor", rope["factor"])}
    if rope_type == "llama3":
        low = _check_positive_float(f"{name}.low_freq_factor", rope["low_freq_factor"])
        high = _check_positive_float(f"{name}.high_freq_factor", rope["high_freq_factor"])
        if high <= low:  # llama3 divides by (high - low)
            raise _bad(f"{name}.high_freq_factor", rope["high_freq_factor"],
                       f"a number greater than low_freq_factor ({_show(rope['low_freq_factor'])})")
        out.update(low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=_check_int(
                       f"{name}.original_max_position_embeddings", rope["original_max_position_embeddings"],
                       1, MAX_POSITIONS))
    return theta, out


def _longrope(hf: dict[str, Any], rope: dict[str, Any], name: str, model_type: str, rotary_dim: int,
              max_positions: int) -> dict[str, Any]:
    """LongRoPE (Phi-3 128k, Phi-3.5): per-frequency factors and the cos/sin scale, as transformers'
    _compute_longrope_parameters derives them: original_max_position_embeddings from the config's top
    level where Phi3Config has one (default 4096), else the RoPE dict's, else max_position_embeddings;
    factor = max / original unless given; attention_factor sqrt(1 + ln factor / ln original) unless given."""
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = rope[key]
        if (not isinstance(value, list) or len(value) != rotary_dim // 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                           for v in value)):
            raise _bad(f"{name}.{key}", value, f"a list of {rotary_dim // 2} positive numbers (one per pair of "
                       f"the {rotary_dim} dimensions RoPE rotates)")
        factors[key] = [float(v) for v in value]
    if model_type == "phi3" or "original_max_position_embeddings" in hf:
        original = _int(hf, "original_max_position_embeddings", 1, MAX_POSITIONS, default=4096)
    else:
        original = _check_int(f"{name}.original_max_position_embeddings",
                              rope.get("original_max_position_embeddings", max_positions), 1, MAX_POSITIONS)
    factor = (_check_positive_float(f"{name}.factor", rope["factor"]) if rope.get("factor") is not None
              else max_positions / original)
    if rope.get("attention_factor") is not None:
        attention = _check_positive_float(f"{name}.attention_factor", rope["attention_factor"])
    else:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", **factors, "original_max_position_embeddings": original,
            "attention_factor": attention}


GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta


def _gemma3_rope(hf: dict[str, Any], head_dim: int, max_positions: int) -> tuple[float, dict[str, Any], float]:
    """(theta and scaling of the full-attention layers, theta of the sliding layers), resolved as
    Gemma3TextConfig.convert_rope_params_to_dict does: rope_parameters keyed by layer type, else
    the legacy rope_theta, rope_scaling (full layers) and rope_local_base_freq (sliding layers)."""
    params = hf.get("rope_parameters") or {}
    kinds = set(GEMMA3_THETA)
    if not (isinstance(params, dict) and set(params) <= kinds and all(isinstance(v, dict) for v in params.values())):
        raise _bad("rope_parameters", params, "RoPE parameters keyed by layer type, such as "
                   "{\"sliding_attention\": {...}, \"full_attention\": {...}}")
    full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    scaling = _rope_dict(hf, "rope_scaling")
    if scaling is not None:
        full.update(scaling)
    full.setdefault("rope_theta", hf.get("rope_theta", GEMMA3_THETA["full_attention"]))
    theta, full_scaling = _rope({"rope_parameters": full}, "gemma3_text", head_dim, max_positions)
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", GEMMA3_THETA["sliding_attention"]))
    local_theta, local_scaling = _rope({"rope_parameters": local}, "gemma3_text", head_dim, max_positions)
    if local_scaling:
        raise UnsupportedModelError(f"RoPE scaling of Gemma 3's sliding layers ({local_scaling['rope_type']!r}) "
                                    "is not supported; supported: default")
    return theta, full_scaling, local_theta


# ------------------------------------------------------------------------------- experts
MAX_EXPERTS = 4096
MOE_TYPES = ("mixtral", "qwen3_moe")


def _experts(hf: dict[str, Any], model_type: str, layers: int, intermediate: int) -> dict[str, Any]:
    """The ModelConfig fields of a mixture of experts, as MixtralConfig / Qwen3MoeConfig read them
    (Qwen3's hub files say num_experts, transformers 5 writes num_local_experts); {} for a dense
    model."""
    if model_type not in MOE_TYPES:
        return {}
    key = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"
    experts = _int(hf, key, 1, MAX_EXPERTS, default=8 if model_type == "mixtral" else 128)
    top_k = _int(hf, "num_experts_per_tok", 1, experts, default=2 if model_type == "mixtral" else 8)
    if model_type == "mixtral":  # every layer's MLP is a mixture, renormalized over the chosen experts
        return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=intermediate,
                    moe_layers=tuple(range(layers)), norm_topk_prob=True)
    step = _int(hf, "decoder_sparse_step", 1, MAX_LAYERS, default=1)
    dense = hf.get("mlp_only_layers") or []
    if not (isinstance(dense, list) and all(_is_int(i) and 0 <= i < layers for i in dense)):
        raise _bad("mlp_only_layers", dense, f"a list of layer indices from 0 to {layers - 1}")
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=_int(hf, "moe_intermediate_size", 1, MAX_INTERMEDIATE, default=768),
                moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
                norm_topk_prob=_bool(hf, "norm_topk_prob", False))


# ------------------------------------------------------------------------------- public
def config_from_hf(hf: Any) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json (parsed JSON, untrusted), refusing with an
    UnsupportedModelError whatever awqc cannot compile or the file gets wrong."""
    if not isinstance(hf, dict):
        raise UnsupportedModelError(
            f"config.json must be a JSON object of model settings, got a JSON {type(hf).__name__}: {_show(hf)}")
    model_type = _check_supported(hf)

    vocab = _int(hf, "vocab_size", 1, MAX_VOCAB)
    hidden = _int(hf, "hidden_size", 1, MAX_HIDDEN)
    intermediate = _int(hf, "intermediate_size", 1, MAX_INTERMEDIATE)
    layers = _int(hf, "num_hidden_layers", 1, MAX_LAYERS)
    heads = _int(hf, "num_attention_heads", 1, MAX_HEADS)
    # null means "same as num_attention_heads" / "hidden_size // num_attention_heads", as in transformers.
    kv_heads = heads if hf.get("num_key_value_heads") is None else _int(hf, "num_key_value_heads", 1, MAX_HEADS)
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"config.json has num_attention_heads {heads}, not a multiple of num_key_value_heads {kv_heads}; "
            "grouped-query attention needs each KV head to serve a whole group of query heads")
    if hf.get("head_dim") is None:
        if hidden % heads:
            raise UnsupportedModelError(
                f"config.json has no head_dim and hidden_size {hidden} is not a multiple of "
                f"num_attention_heads {heads}; give head_dim or fix the sizes")
        head_dim = hidden // heads
        if head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise UnsupportedModelError(
                f"config.json has no head_dim, and hidden_size {hidden} // num_attention_heads {heads} = "
                f"{head_dim}; expected an even head size from 2 to {MAX_HEAD_DIM} (RoPE rotates pairs)")
    else:
        head_dim = _int(hf, "head_dim", 1, MAX_HEAD_DIM)
        if head_dim % 2:  # RoPE rotates pairs of dimensions
            raise _bad("head_dim", head_dim, f"an even integer from 2 to {MAX_HEAD_DIM} (RoPE rotates pairs)")
    max_positions = _int(hf, "max_position_embeddings", 1, MAX_POSITIONS, default=2048)
    window, sliding = _attention_window(hf, model_type, layers, max_positions)
    rotary_dim = _rotary_dim(hf, model_type, head_dim)
    gemma = model_type in GEMMA
    if model_type == "gemma3_text":
        theta, scaling, local_theta = _gemma3_rope(hf, head_dim, max_positions)
    else:
        (theta, scaling), local_theta = _rope(hf, model_type, rotary_dim or head_dim, max_positions), None
    if gemma and scaling.get("rope_type", "linear") != "linear":  # Gemma's RoPE runs in the graph
        raise UnsupportedModelError(f"{GEMMA[model_type]} RoPE scaling {scaling['rope_type']!r} is not supported; "
                                    "supported: default, linear")
    bos = _token_ids(hf, "bos_token_id", vocab, allow_list=False)
    attention_bias = _bool(hf, "attention_bias", False)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases and none on o_proj; Llama's attention_bias covers all four.
        attention_bias=model_type == "qwen2" or attention_bias,
        o_proj_bias=model_type != "qwen2" and attention_bias,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(hf, "eos_token_id", vocab, allow_list=True),
        model_type=model_type,
        sliding_window=window,
        sliding_layers=sliding,
        query_pre_attn_scalar=_int(hf, "query_pre_attn_scalar", 1, 2**20, default=256) if gemma else None,
        rope_local_theta=local_theta if sliding else None,
        rotary_dim=rotary_dim,
        attn_logit_softcapping=_softcap(hf, "attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=_softcap(hf, "final_logit_softcapping") if gemma else None,
        **_experts(hf, model_type, layers, intermediate),
    )


def for_context_window(cfg: ModelConfig, window: int) -> ModelConfig:
    """The config an artifact of `window` tokens computes: a LongRoPE model compiled for a context
    past original_max_position_embeddings rotates by its long factors at every position, as
    llama.cpp chooses when it creates a context (transformers switches per forward pass once the
    sequence passes the original window, re-rotating nothing it has cached); any other config as
    it is."""
    r = cfg.rope_scaling
    if r.get("rope_type") != "longrope" or window <= r["original_max_position_embeddings"]:
        return cfg
    return dataclasses.replace(cfg, rope_scaling={**r, "long_context": True})


def check_vocab(cfg: ModelConfig, n_tokens: int, source: str) -> None:
    """Refuse a tokenizer that can produce ids the embedding has no row for (fewer tokens is fine:
    checkpoints pad vocab_size)."""
    if n_tokens > cfg.vocab_size:
        raise UnsupportedModelError(
            f"the tokenizer of {source} has {n_tokens} tokens but the model's vocab_size is {cfg.vocab_size}: "
            f"token ids past {cfg.vocab_size - 1} would read outside the embedding; "
            "the tokenizer does not belong to this model")
