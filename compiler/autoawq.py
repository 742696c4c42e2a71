"""Interop with AutoAWQ "GEMM" checkpoints: read them into awqc's QuantizedWeights, and write
awqc's QuantizedWeights in that format.

The format (learned from AutoAWQ's `WQLinear_GEMM.from_linear` and `dequantize_gemm`), for a linear
layer W [N, K] (N outputs, K inputs) with group size G along K and w = (q - zero) * scale:

* `qweight` int32 [K, N/8]: eight 4-bit q along the output dimension per word. Word (k, j) holds
  the columns n = 8j .. 8j+7 of row k of qᵀ, nibble i (bits 4i .. 4i+3) holding column
  8j + ORDER[i] with ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (the interleave its CUDA kernel expects);
* `qzeros` int32 [K/G, N/8]: the zero points, packed the same way;
* `scales` float16 [K/G, N];
* `bias` float16 [N] when the layer has one;
* the quantization config: `quantization_config` in config.json (`quant_method: awq, bits,
  group_size, zero_point, version: gemm`) or the older quant_config.json (`w_bit, q_group_size,
  zero_point, version`).

Checkpoints name the projections separately (q/k/v, gate/up); awqc fuses them by concatenating
output rows, which keeps every (row, group) and its scale and zero point as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from awqc.passes.quantizer import QuantizedWeights, QuantScheme

from .config import ModelConfig, config_from_hf
from .model_import import ImportedModel, ModelImportError, check_weights
from .models import FAMILIES, family

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column ORDER[i] of its 8
PACK = 8  # 4-bit values per int32


class AutoAWQError(ModelImportError):
    """An AutoAWQ checkpoint awqc cannot read (or weights it cannot write); the message names it."""


# ------------------------------------------------------------------------------- packing
def pack_columns(values: np.ndarray) -> np.ndarray:
    """[R, C] integers in [0, 15] → [R, C/8] int32, eight columns per word in AutoAWQ's order."""
    r, c = values.shape
    if c % PACK:
        raise AutoAWQError(f"cannot pack {c} columns: AutoAWQ GEMM needs a multiple of {PACK}")
    v = values.astype(np.uint32).reshape(r, c // PACK, PACK)
    word = np.zeros((r, c // PACK), np.uint32)
    for i, col in enumerate(ORDER):
        word |= v[:, :, col] << np.uint32(4 * i)
    return word.view(np.int32)


def unpack_columns(words: np.ndarray) -> np.ndarray:
    """Inverse of pack_columns: [R, C/8] int32 → [R, C] uint8."""
    w = np.ascontiguousarray(words).view(np.uint32)
    r, cw = w.shape
    out = np.empty((r, cw, PACK), np.uint8)
    for i, col in enumerate(ORDER):
        out[:, :, col] = (w >> np.uint32(4 * i)) & np.uint32(15)
    return out.reshape(r, cw * PACK)


def to_gemm(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, np.ndarray]:
    """awqc's (q [N, K], scale [N, K/G], zero [N, K/G]) → qweight, qzeros, scales."""
    return {"qweight": pack_columns(q.numpy().T),
            "qzeros": pack_columns(zero.round().to(torch.int64).numpy().T),
            "scales": np.ascontiguousarray(scale.numpy().T.astype(np.float16))}


def from_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qweight, qzeros, scales → awqc's (q uint8 [N, K], scale float32 [N, K/G], zero float32 [N, K/G])."""
    q = torch.from_numpy(np.ascontiguousarray(unpack_columns(qweight).T))
    zero = torch.from_numpy(np.ascontiguousarray(unpack_columns(qzeros).T).astype(np.float32))
    scale = torch.from_numpy(np.ascontiguousarray(np.asarray(scales, np.float32).T))
    return q, scale, zero


# ------------------------------------------------------------------------------- names
# AutoAWQ quantizes q/k/v and gate/up as separate linears in these families, and as the fused
# qkv_proj and gate_up_proj that Phi-3's checkpoint itself holds (AutoAWQ's Phi3AWQForCausalLM).
_SEPARATE_LINEARS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_FUSED_LINEARS = ("phi3",)


def _check_layout(cfg: ModelConfig) -> None:
    if cfg.model_type not in _SEPARATE_LINEARS + _FUSED_LINEARS:
        raise AutoAWQError(f"AutoAWQ checkpoints of model_type {cfg.model_type!r} are not supported; supported: "
                           f"{', '.join(_SEPARATE_LINEARS + _FUSED_LINEARS)} (compile the float checkpoint with "
                           "--quant awq-… instead)")


def _linear_params(cfg: ModelConfig) -> set[str]:
    """awqc's names of every linear's weight and bias (the rest are embeddings, norms and the head)."""
    return {n for layer in range(cfg.num_hidden_layers) for fused, _n, _k in _linears(cfg, layer).values()
            for n in (fused, fused.replace(".weight", ".bias"))}


def _linears(cfg: ModelConfig, layer: int) -> dict[str, tuple[str, int, int]]:
    """HF linear prefix → (awqc fused weight name, N, K) for one decoder layer."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    a, m = f"layers.{layer}.self_attn", f"layers.{layer}.mlp"
    o_down = {f"{a}.o_proj": (f"{a}.o_proj.weight", h, cfg.num_attention_heads * hd),
              f"{m}.down_proj": (f"{m}.down_proj.weight", h, i)}
    if cfg.model_type in _FUSED_LINEARS:
        return {f"{a}.qkv_proj": (f"{a}.qkv_proj.weight", cfg.qkv_dim, h),
                f"{m}.gate_up_proj": (f"{m}.gate_up_proj.weight", 2 * i, h), **o_down}
    return {f"{a}.q_proj": (f"{a}.qkv_proj.weight", cfg.num_attention_heads * hd, h),
            f"{a}.k_proj": (f"{a}.qkv_proj.weight", cfg.kv_dim, h),
            f"{a}.v_proj": (f"{a}.qkv_proj.weight", cfg.kv_dim, h),
            f"{m}.gate_proj": (f"{m}.gate_up_proj.weight", i, h),
            f"{m}.up_proj": (f"{m}.gate_up_proj.weight", i, h), **o_down}


# ------------------------------------------------------------------------------- reading
def quant_config(path: Path) -> dict[str, Any] | None:
    """The AWQ quantization config of a checkpoint directory (normalized keys), or None."""
    cfg_file, legacy = path / "config.json", path / "quant_config.json"
    q = None
    if cfg_file.is_file():
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq":
            q = qc
    if q is None and legacy.is_file():
        q = json.loads(legacy.read_text())
    if q is None:
        return None
    return {"bits": int(q.get("bits", q.get("w_bit", 4))), "group_size": int(q.get("group_size", q.get("q_group_size", 128))),
            "zero_point": bool(q.get("zero_point", True)), "version": str(q.get("version", "gemm")).lower(),
            "modules_to_not_convert": q.get("modules_to_not_convert")}


def is_autoawq_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and quant_config(p) is not None


def _check_quant_config(q: dict[str, Any], path: Path) -> None:
    if q["bits"] != 4:
        raise AutoAWQError(f"{path}: {q['bits']}-bit AWQ checkpoints are not supported; awqc reads 4-bit")
    if q["version"] != "gemm":
        raise AutoAWQError(f"{path}: AutoAWQ version {q['version']!r} is not supported; awqc reads 'gemm'")
    if not q["zero_point"]:
        raise AutoAWQError(f"{path}: zero_point=false is not supported; AutoAWQ GEMM checkpoints have zero points")
    if q["group_size"] <= 0:
        raise AutoAWQError(f"{path}: group_size {q['group_size']} is not supported; awqc needs per-group scales")


def _expect(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise AutoAWQError(f"tensor {name} is missing from the AutoAWQ checkpoint")
    got = tuple(tensors[name].shape)
    if got != shape:
        raise AutoAWQError(f"tensor {name} has shape {got} but the checkpoint's config implies {shape}")
    return tensors[name]


def _read_linear(tensors: dict[str, np.ndarray], prefix: str, n: int, k: int, group: int):
    """(q, scale, zero) of a quantized linear, or a float weight for an unconverted one."""
    if f"{prefix}.qweight" not in tensors:
        return torch.from_numpy(np.asarray(_expect(tensors, f"{prefix}.weight", (n, k)), np.float32))
    if k % group or n % PACK:
        raise AutoAWQError(f"{prefix}: {k} inputs / {n} outputs do not fit group size {group} and {PACK}-column packing")
    return from_gemm(_expect(tensors, f"{prefix}.qweight", (k, n // PACK)),
                     _expect(tensors, f"{prefix}.qzeros", (k // group, n // PACK)),
                     _expect(tensors, f"{prefix}.scales", (k // group, n)))


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AutoAWQError(f"{path} has no *.safetensors weight files")
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            out.update({k[len("model."):] if k.startswith("model.") else k: v for k, v in load_file(str(f)).items()})
        except Exception as err:  # safetensors raises several types for a damaged file
            raise AutoAWQError(f"{f} is corrupt or truncated ({err})") from None
    return out


def read_autoawq(path: str | Path) -> tuple[ModelConfig, QuantizedWeights]:
    """An AutoAWQ GEMM checkpoint directory → its config and awqc QuantizedWeights (fused names)."""
    path = Path(path)
    q = quant_config(path)
    if q is None:
        raise AutoAWQError(f"{path} has no AWQ quantization config (config.json quantization_config or quant_config.json)")
    _check_quant_config(q, path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    _check_layout(cfg)
    group = q["group_size"]
    tensors = _read_tensors(path)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    floats: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        parts: dict[str, list] = {}
        for prefix, (fused, n, k) in _linears(cfg, layer).items():
            parts.setdefault(fused, []).append(_read_linear(tensors, prefix, n, k, group))
            if f"{prefix}.bias" in tensors:
                bias = fused.replace(".weight", ".bias")
                parts.setdefault(bias, []).append(torch.from_numpy(tensors[f"{prefix}.bias"].astype(np.float32)))
        for fused, items in parts.items():
            if all(isinstance(x, tuple) for x in items):
                quantized[fused] = tuple(torch.cat([x[j] for x in items], 0) for j in range(3))  # type: ignore
            else:  # a float part (modules_to_not_convert): the fused layer stays float
                floats[fused] = torch.cat([_dequant(x, group) if isinstance(x, tuple) else x for x in items], 0)
    linear_names = _linear_params(cfg)
    for name in family(cfg.model_type).expected_shapes(cfg):  # embeddings, every norm, the LM head
        if name not in linear_names and name in tensors:
            floats[name] = torch.from_numpy(tensors[name].astype(np.float32))
    if cfg.tie_word_embeddings:
        floats.pop("lm_head.weight", None)
    scheme = QuantScheme(4, group) if group in (128, 64, 32) else None
    if scheme is None:
        raise AutoAWQError(f"{path}: group size {group} is not supported; awqc supports 128, 64, 32")
    return cfg, QuantizedWeights(scheme, quantized, floats)


def _dequant(x: tuple[torch.Tensor, torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    q, scale, zero = x
    n, k = q.shape
    return ((q.reshape(n, k // group, group).float() - zero[..., None]) * scale[..., None]).reshape(n, k)


def load_autoawq_model(path: str | Path) -> tuple[ImportedModel, QuantizedWeights]:
    """The checkpoint as an ImportedModel whose float weights are the dequantized ones (what the
    checkpoint computes), plus the quantized weights themselves."""
    from transformers import AutoTokenizer

    cfg, qw = read_autoawq(path)
    weights = {k: v.numpy().astype(np.float32) for k, v in qw.dequantized().items()}
    check_weights(cfg, weights)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise AutoAWQError(f"no usable tokenizer in {path} ({err})") from None
    return ImportedModel(cfg, weights, tok, str(path)), qw


# ------------------------------------------------------------------------------- writing
def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for the model (what config_from_hf reads back)."""
    arch = FAMILIES[cfg.model_type][0]
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": "float16",
    }
    if cfg.model_type in ("llama", "qwen3", "qwen3_moe"):  # Qwen2's q/k/v biases are implied by its type
        out["attention_bias"] = cfg.attention_bias
    if cfg.num_experts:
        out.update(_experts_hf_config(cfg))
    if cfg.model_type in ("gemma2", "gemma3_text"):
        return _gemma_hf_config(cfg, out)
    if cfg.rotary_dim is not None:  # Phi-4-mini
        out["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    if cfg.rope_scaling.get("rope_type") == "longrope":  # Phi3Config reads the original window at the top level
        r = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": r["short_factor"],
                               "long_factor": r["long_factor"], "attention_factor": r["attention_factor"]}
        out["original_max_position_embeddings"] = r["original_max_position_embeddings"]
    if cfg.model_type in ("mistral", "mixtral"):  # they slide in every layer whenever sliding_window is set
        out["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:  # Qwen: layer_types says which layers slide
        out.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                   layer_types=["sliding_attention" if i in cfg.sliding_layers else "full_attention"
                                for i in range(cfg.num_hidden_layers)])
    return out


def _experts_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """hf_config's mixture-of-experts fields, as MixtralConfig / Qwen3MoeConfig read them."""
    if cfg.model_type == "mixtral":
        return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
    return {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layers]}


def _gemma_hf_config(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    """hf_config's Gemma fields, as transformers 5 writes Gemma2Config and Gemma3TextConfig (whose
    rope_parameters are keyed by layer type)."""
    del out["hidden_act"], out["rope_theta"], out["rope_scaling"]
    kinds = ["sliding_attention" if i in cfg.sliding_layers else "full_attention" for i in range(cfg.num_hidden_layers)]
    full = {"rope_type": "default", **cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    rope = full if cfg.model_type == "gemma2" else {"full_attention": full, "sliding_attention": local}
    out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.attention_bias,
               query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
               layer_types=kinds, rope_parameters=rope, attn_logit_softcapping=cfg.attn_logit_softcapping,
               final_logit_softcapping=cfg.final_logit_softcapping)
    return out


def _split_rows(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes, 0))


def write_autoawq(out: str | Path, cfg: ModelConfig, qw: QuantizedWeights, tokenizer: Any = None) -> Path:
    """Write awqc's quantized weights as an AutoAWQ GEMM checkpoint directory (fp16 floats)."""
    from safetensors.numpy import save_file

    _check_layout(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = qw.scheme.group_size
    tensors: dict[str, np.ndarray] = {}
    for layer in range(cfg.num_hidden_layers):
        by_fused: dict[str, list[tuple[str, int]]] = {}
        for prefix, (fused, n, _k) in _linears(cfg, layer).items():
            by_fused.setdefault(fused, []).append((prefix, n))
        for fused, members in by_fused.items():
            sizes = [n for _, n in members]
            if fused in qw.quantized:
                parts = [_split_rows(t, sizes) for t in qw.quantized[fused]]
                for j, (prefix, _n) in enumerate(members):
                    tensors.update({f"model.{prefix}.{k}": v for k, v in to_gemm(*(p[j] for p in parts)).items()})
            else:  # left in float (e.g. not quantized): AutoAWQ's modules_to_not_convert layout
                for (prefix, _n), w in zip(members, _split_rows(qw.floats[fused], sizes)):
                    tensors[f"model.{prefix}.weight"] = w.numpy().astype(np.float16)
            bias = fused.replace(".weight", ".bias")
            if bias in qw.floats:
                for (prefix, _n), b in zip(members, _split_rows(qw.floats[bias], sizes)):
                    tensors[f"model.{prefix}.bias"] = b.numpy().astype(np.float16)
    linear_names = _linear_params(cfg)
    for name, w in qw.floats.items():  # embeddings, norms, LM head
        if name not in linear_names:
            key = name if name == "lm_head.weight" else f"model.{name}"
            tensors[key] = np.ascontiguousarray(w.numpy().astype(np.float16))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": g, "w_bit": 4, "version": "GEMM", "modules_to_not_convert": None}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
