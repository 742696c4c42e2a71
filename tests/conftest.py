"""Tiny random Llama-family checkpoints built in code, for fast tests of every module."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# The artifact verification record (runtime/verified.py) goes to a private directory, not ~/.cache.
os.environ.setdefault("AWQC_CACHE_DIR", tempfile.mkdtemp(prefix="awqc-test-cache-"))

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ["the quick brown fox jumps over the lazy dog", "compilers turn programs into machine code",
        "a haiku has three lines of five seven and five syllables", "tensors flow through kernels"]

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=True)


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on a few lines, saved the way transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def make_checkpoint(out: Path, seed: int = 0, model_type: str = "llama", **overrides: Any) -> Path:
    """A random Hugging Face checkpoint directory (config.json, safetensors, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY, **overrides}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # transformers zero-initialises biases and norms; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(str(out))
    make_tokenizer(out)
    return out


def hf_logits(ckpt: Path, ids: list[int], n_decode: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Reference from transformers: logits of every prompt position, then greedy decode steps
    with the KV cache (their logits and tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prompt_logits = out.logits[0].numpy()
        cache, tokens, steps = out.past_key_values, [int(prompt_logits[-1].argmax())], []
        for _ in range(n_decode):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1].numpy())
            tokens.append(int(steps[-1].argmax()))
    return prompt_logits, steps, tokens


def hf_submodule_outputs(ckpt: Path, samples: list[list[int]], replace: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs of layer 0's self_attn and mlp in transformers' whole model, with the parameters
    `replace` (transformers' names under layers.0) swapped in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        for name, value in replace.items():
            layer.get_parameter(name).copy_(value)
    outs: dict[str, list[torch.Tensor]] = {"self_attn": [], "mlp": []}
    for name in outs:
        layer.get_submodule(name).register_forward_hook(
            lambda m, inp, out, name=name: outs[name].append((out[0] if isinstance(out, tuple) else out)[0]))
    with torch.no_grad():
        for s in samples:
            model(torch.tensor([s]))
    return {k: torch.cat(v) for k, v in outs.items()}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    from awqc.compiler.build import write_artifact
    from awqc.compiler.model_import import load_model
    from awqc.compiler.targets import get_target

    out = tmp_path_factory.mktemp("art") / "tiny-f32"
    return write_artifact(out, load_model(str(tiny_ckpt)), get_target("host"), "float32", context_window=128)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# What awqc's runtime needs besides TVM (runtime/ imports; markupsafe is jinja2's).
RUNTIME_DEPS = ("numpy", "numpy.libs", "tokenizers", "jinja2", "markupsafe")


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a virtual environment with numpy, tokenizers and jinja2 only: no TVM, no
    tvm-ffi, no awqc, no torch (the packages are linked from this environment: no network)."""
    import venv

    root = tmp_path_factory.mktemp("bare-venv")
    venv.create(root, with_pip=False)
    site = next(root.glob("lib/python3*/site-packages"))
    installed = Path(np.__file__).parents[1]
    for name in RUNTIME_DEPS:
        (site / name).symlink_to(installed / name)
    return root / "bin" / "python"


def clean_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH, PYTHONHOME and TVM_* (for bare_python runs)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("TVM_")}


def with_salient_channels(model: Any) -> Any:
    """A copy of an ImportedModel (weights in memory) whose norms give a few hidden channels 20x
    larger activations: the outliers AWQ exists to protect."""
    import dataclasses

    model = dataclasses.replace(model, weights=dict(model.weights))
    for name, w in model.weights.items():
        if name.endswith("layernorm.weight"):
            w[:3] *= 20.0
    return model


def logit_error(engine: Any, held_out: list[list[int]]) -> Any:
    """error(weights): mean squared difference of a FloatEngine's logits with `weights` from its
    own float logits, over the held-out token sequences."""
    ref = [engine.use(None).score(ids) for ids in held_out]

    def error(weights: Any) -> float:
        scored = engine.use(weights)
        return float(np.mean([((scored.score(ids) - r) ** 2).mean() for ids, r in zip(held_out, ref)]))

    return error
